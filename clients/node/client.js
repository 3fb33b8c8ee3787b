// Calling privacy-vault from Node: the services from the .proto files at run time
// (@grpc/proto-loader), promises around the unary calls, and the decoding of the
// google.rpc.Status every error carries in its `grpc-status-details-bin` trailer
// (protobufjs, with google/rpc/*.proto from the google-proto-files package).
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';
import googleProtoFiles from 'google-proto-files';
import protobuf from 'protobufjs';

const here = path.dirname(fileURLToPath(import.meta.url));

/** The directory holding `privacyvault/v1/*.proto`: this repository's `protos/`, or
 * PRIVACY_VAULT_PROTO_DIR (e.g. the site-packages of an installed privacy-vault or
 * privacy-vault-client wheel, which ship the same files). */
export const PROTO_DIR = process.env.PRIVACY_VAULT_PROTO_DIR ?? path.resolve(here, '../../protos');

/** Field names as in the proto (`member_id`, not `memberId`), enums as their names
 * (`PURPOSE_INQUIRY`), 64-bit integers (Timestamp.seconds) as decimal strings, no
 * default values filled in (an absent optional field stays undefined), and the name
 * of the set member of each oneof (`outcome: 'destroyed_at'`). */
export const LOADER_OPTIONS = Object.freeze({
  keepCase: true,
  enums: String,
  longs: String,
  defaults: false,
  oneofs: true,
});

/** The metadata key of the member's session (the member's own rights). */
export const SESSION_KEY = 'x-member-session';

/** The service constructors of package privacyvault.v1 (MemberService,
 * KeyAdminService), loaded from `protoDir`. */
export function loadServices(protoDir = PROTO_DIR) {
  const definition = protoLoader.loadSync(
    ['privacyvault/v1/member.proto', 'privacyvault/v1/key_admin.proto'],
    { ...LOADER_OPTIONS, includeDirs: [protoDir] },
  );
  return grpc.loadPackageDefinition(definition).privacyvault.v1;
}

/** Metadata carrying the member's session token (from Authenticate). */
export function sessionMetadata(token) {
  const metadata = new grpc.Metadata();
  metadata.set(SESSION_KEY, token);
  return metadata;
}

/** A MemberService client whose unary methods return promises:
 * `await members.call('GetMember', {member_id, purpose: 'PURPOSE_INQUIRY'})`. */
export class MemberClient {
  constructor(address, { credentials = grpc.credentials.createInsecure(), protoDir } = {}) {
    const { MemberService } = loadServices(protoDir);
    this.stub = new MemberService(address, credentials);
  }

  /** Call `method` with `request`; `metadata` a grpc.Metadata (e.g.
   * sessionMetadata(token)); the deadline `timeoutMs` from now. Rejects with
   * grpc-js's ServiceError (`code`, `details`, `metadata`: the trailers). */
  call(method, request, { metadata = new grpc.Metadata(), timeoutMs = 10_000 } = {}) {
    const deadline = new Date(Date.now() + timeoutMs);
    return new Promise((resolve, reject) => {
      this.stub[method](request, metadata, { deadline }, (error, reply) =>
        error ? reject(error) : resolve(reply),
      );
    });
  }

  close() {
    this.stub.close();
  }
}

// google.rpc.Status and its detail messages. protobufjs has google/protobuf/*
// (any.proto, duration.proto) built in; google/rpc/*.proto come from
// google-proto-files (the googleapis repository's files, as npm publishes them).
const rpcRoot = new protobuf.Root().loadSync(
  [
    googleProtoFiles.getProtoPath('rpc', 'status.proto'),
    googleProtoFiles.getProtoPath('rpc', 'error_details.proto'),
  ],
  { keepCase: true },
);
const Status = rpcRoot.lookupType('google.rpc.Status');
const TO_OBJECT = { longs: String, enums: String, defaults: false };

/** The google.rpc.Status of a failed call, `{code, message, details}`, each detail
 * decoded into a plain object with its type name in `@type` (as in the JSON form of
 * Any): `{'@type': 'google.rpc.BadRequest', field_violations: [...]}`. A detail of a
 * type not in google/rpc/error_details.proto keeps its bytes in `value`. Null when
 * the error carries no Status (an error of the channel itself). */
export function richStatus(error) {
  const [bytes] = error?.metadata?.get('grpc-status-details-bin') ?? [];
  if (!bytes) return null;
  const status = Status.toObject(Status.decode(bytes), TO_OBJECT);
  const details = (status.details ?? []).map(({ type_url, value }) => {
    const typeName = type_url.slice(type_url.lastIndexOf('/') + 1);
    const type = rpcRoot.lookup(typeName);
    if (!(type instanceof protobuf.Type)) return { '@type': typeName, value };
    return { '@type': typeName, ...type.toObject(type.decode(value), TO_OBJECT) };
  });
  return { code: status.code ?? 0, message: status.message ?? '', details };
}

/** The first detail of the error's Status of type `typeName` (e.g.
 * 'google.rpc.ErrorInfo', 'google.rpc.BadRequest'), or undefined. */
export function errorDetail(error, typeName) {
  return richStatus(error)?.details.find((detail) => detail['@type'] === typeName);
}

/** The BadRequest field violations of an INVALID_ARGUMENT, as {field: description}. */
export function fieldViolations(error) {
  const bad = errorDetail(error, 'google.rpc.BadRequest');
  return Object.fromEntries((bad?.field_violations ?? []).map((v) => [v.field, v.description]));
}

export { grpc };
