// The Node client against a real privacy-vault server (PRIVACY_VAULT_ADDRESS, e.g.
// 127.0.0.1:50051; tests/test_node_client.py starts one and runs this): a member
// signs up, logs in, is read for two purposes by a calling service and by
// themselves, an invalid sign-up's field violations are decoded, and the member
// withdraws (crypto-shredding: NOT_FOUND afterwards).
//
// With PRIVACY_VAULT_CLIENT_TLS_CA, _CERT and _KEY (PEM files) it connects with mTLS,
// presenting that certificate (its SPIFFE ID is the caller), and checks that a purpose
// the caller policy does not grant it is refused.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { after, before, test } from 'node:test';

import { MemberClient, errorDetail, fieldViolations, grpc, richStatus, sessionMetadata } from '../client.js';

const {
  PRIVACY_VAULT_ADDRESS: address,
  PRIVACY_VAULT_CLIENT_TLS_CA: caFile,
  PRIVACY_VAULT_CLIENT_TLS_CERT: certFile,
  PRIVACY_VAULT_CLIENT_TLS_KEY: keyFile,
} = process.env;

function credentials() {
  if (!caFile) return grpc.credentials.createInsecure();
  return grpc.credentials.createSsl(
    readFileSync(caFile),
    readFileSync(keyFile),
    readFileSync(certFile),
  );
}

/** The error a call rejects with (fails when it resolves). */
async function failure(promise) {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  assert.fail('the call succeeded');
}

let members;
before(() => {
  assert.ok(address, 'PRIVACY_VAULT_ADDRESS (host:port of a running server) is not set');
  members = new MemberClient(address, { credentials: credentials() });
});
after(() => members?.close());

test('a member from sign-up to withdrawal', async (t) => {
  const loginId = `node${randomBytes(5).toString('hex')}`;
  const password = randomBytes(18).toString('base64url');
  const email = `${loginId}@example.com`;

  const { member_id: memberId } = await members.call('SignUp', {
    login_id: loginId,
    password,
    name: 'Kim Jisoo',
    email,
    birth_date: '2001-03-14',
    consents: [{ purpose: 'PURPOSE_INQUIRY', granted: true }],
  });
  assert.match(memberId, /^\S+$/);

  const auth = await members.call('Authenticate', {
    login_id: loginId,
    password,
    client_ip: '203.0.113.7',
  });
  assert.equal(auth.member_id, memberId);
  const session = sessionMetadata(auth.session_token);

  await t.test('a calling service reads for identification: login ID, name, e-mail', async () => {
    const { member } = await members.call('GetMember', {
      member_id: memberId,
      purpose: 'PURPOSE_IDENTIFICATION',
    });
    assert.equal(member.member_id, memberId);
    assert.equal(member.login_id, loginId);
    assert.equal(member.name, 'Kim Jisoo');
    assert.equal(member.email, email);
    assert.equal(member.mobile_phone, undefined);
  });

  await t.test('and for an inquiry (consented): name and e-mail, no login ID', async () => {
    const { member } = await members.call('GetMember', {
      member_id: memberId,
      purpose: 'PURPOSE_INQUIRY',
    });
    assert.equal(member.name, 'Kim Jisoo');
    assert.equal(member.email, email);
    assert.equal(member.login_id, undefined);
  });

  await t.test('the member reads everything with their session', async () => {
    const { member } = await members.call(
      'GetMember',
      { member_id: memberId, purpose: 'PURPOSE_MEMBER_REQUEST' },
      { metadata: session },
    );
    assert.equal(member.login_id, loginId);
    assert.equal(typeof member.created_at.seconds, 'string'); // longs: String
    const inquiry = member.consents.find((c) => c.purpose === 'PURPOSE_INQUIRY');
    assert.equal(inquiry.granted, true);
  });

  await t.test(
    'a purpose the caller policy does not grant is refused',
    { skip: !caFile && 'embedded: the caller is local, every purpose allowed' },
    async () => {
      const error = await failure(
        members.call('GetMember', { member_id: memberId, purpose: 'PURPOSE_STATISTICS' }),
      );
      assert.equal(error.code, grpc.status.PERMISSION_DENIED);
      assert.equal(errorDetail(error, 'google.rpc.ErrorInfo').reason, 'CALLER_NOT_ALLOWED');
    },
  );

  await t.test('without the session the own-rights read is refused', async () => {
    const error = await failure(
      members.call('GetMember', { member_id: memberId, purpose: 'PURPOSE_MEMBER_REQUEST' }),
    );
    assert.equal(error.code, grpc.status.UNAUTHENTICATED);
    assert.equal(errorDetail(error, 'google.rpc.ErrorInfo').reason, 'MEMBER_SESSION_REQUIRED');
  });

  await t.test('an invalid sign-up: INVALID_ARGUMENT with BadRequest field violations', async () => {
    const error = await failure(
      members.call('SignUp', {
        login_id: `${loginId}x`,
        password,
        name: 'Kim Jisoo',
        email: 'not-an-address',
        birth_date: '2020-01-01', // under 14
      }),
    );
    assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
    const status = richStatus(error);
    assert.equal(status.code, grpc.status.INVALID_ARGUMENT);
    assert.equal(status.message, error.details);
    const info = errorDetail(error, 'google.rpc.ErrorInfo');
    assert.equal(info.reason, 'INVALID_ARGUMENT');
    assert.equal(info.domain, 'privacyvault.v1');
    const violations = fieldViolations(error);
    assert.deepEqual(Object.keys(violations).sort(), ['birth_date', 'email']);
    for (const description of Object.values(violations)) assert.ok(description.length > 0);
    assert.ok(!JSON.stringify(status).includes('not-an-address')); // no value echoed
  });

  await t.test('the member withdraws; afterwards they are not found', async () => {
    const withdrawn = await members.call(
      'Withdraw',
      { member_id: memberId, password },
      { metadata: session },
    );
    assert.equal(withdrawn.outcome, 'destroyed_at');
    assert.match(withdrawn.destroyed_at.seconds, /^\d+$/);
    const error = await failure(
      members.call('GetMember', { member_id: memberId, purpose: 'PURPOSE_IDENTIFICATION' }),
    );
    assert.equal(error.code, grpc.status.NOT_FOUND);
    assert.equal(errorDetail(error, 'google.rpc.ErrorInfo').reason, 'MEMBER_NOT_FOUND');
  });
});
