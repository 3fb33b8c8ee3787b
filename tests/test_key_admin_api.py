"""KeyAdminService over a real gRPC channel, on SQLite and PostgreSQL: status, rotation,
online re-wrap, guarded destruction, member key rotation, the audit trail, admin
authentication, and the issue's requirement: rotate + re-wrap + destroy while
clients keep reading and writing, with zero failed calls."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_support import (
    ADMIN_TOKEN,
    CLIENT_IP,
    admin_metadata,
    field_violations,
    precondition_violation,
    sign_up_request,
)

from privacyvault.v1 import key_admin_pb2 as kpb
from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1.key_admin_pb2_grpc import KeyAdminServiceStub
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from service.config import Settings
from service.server import run_server
from vault import FrozenClock

Code = grpc.StatusCode
ACTOR = "alice@security"
ADMIN = admin_metadata(ACTOR)


@pytest.fixture
def keys(admin_channel: grpc.aio.Channel) -> KeyAdminServiceStub:
    return KeyAdminServiceStub(admin_channel)


@pytest.fixture
def admin_members(admin_channel: grpc.aio.Channel) -> MemberServiceStub:
    return MemberServiceStub(admin_channel)


async def _fails(call: object, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    return caught.value


async def _status(keys: KeyAdminServiceStub) -> dict[int, kpb.KekVersion]:
    reply = await keys.GetKeyStatus(kpb.GetKeyStatusRequest(), metadata=ADMIN)
    return {v.version: v for v in reply.versions}


async def _rewrap(
    keys: KeyAdminServiceStub, batch_size: int = 0, dry_run: bool = False
) -> list[kpb.RewrapProgress]:
    call = keys.RewrapMemberKeys(
        kpb.RewrapMemberKeysRequest(batch_size=batch_size, dry_run=dry_run), metadata=ADMIN
    )
    return [reply.progress async for reply in call]


@contextlib.asynccontextmanager
async def _restarted(settings: Settings, clock: FrozenClock) -> AsyncIterator[MemberServiceStub]:
    """A second server on the same data: nothing cached, every key unwrapped afresh."""
    async with (
        run_server(settings, clock=clock) as running,
        grpc.aio.insecure_channel(running.target) as ch,
    ):
        yield MemberServiceStub(ch)


async def _sign_up(members: MemberServiceStub, n: int) -> dict[str, pb.SignUpRequest]:
    signed: dict[str, pb.SignUpRequest] = {}
    for _ in range(n):
        request = sign_up_request(mobile_phone="+82 10-1234-5678")
        signed[(await members.SignUp(request)).member_id] = request
    return signed


async def _reads_back(members: MemberServiceStub, signed: dict[str, pb.SignUpRequest]) -> None:
    """Every member authenticates and reads back exactly what was signed up."""
    for member_id, request in signed.items():
        auth = await members.Authenticate(
            pb.AuthenticateRequest(login_id=request.login_id, password=request.password),
            metadata=CLIENT_IP,
        )
        assert auth.member_id == member_id
        member = (
            await members.GetMember(
                pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_MEMBER_REQUEST),
                metadata=(("x-member-session", auth.session_token),),
            )
        ).member
        assert (member.login_id, member.name, member.email) == (
            request.login_id,
            request.name,
            request.email,
        )


# --- status ----------------------------------------------------------------------------------


async def test_status_on_a_fresh_vault(keys: KeyAdminServiceStub) -> None:
    reply = await keys.GetKeyStatus(kpb.GetKeyStatusRequest(), metadata=ADMIN)
    assert reply.provider == "local"
    assert reply.active_version == 1
    assert len(reply.versions) == 1
    v1 = reply.versions[0]
    assert (v1.version, v1.state, v1.member_keys, v1.index_keys) == (
        1,
        kpb.KEK_STATE_ACTIVE,
        0,
        1,
    )
    assert v1.created_at.seconds > 0
    assert not v1.HasField("destroyed_at")


# --- the whole life of a KEK version -----------------------------------------------------------


async def test_rotate_rewrap_destroy(
    keys: KeyAdminServiceStub,
    admin_members: MemberServiceStub,
    admin_settings: Settings,
    clock: FrozenClock,
) -> None:
    signed = await _sign_up(admin_members, 5)

    rotated = await keys.RotateKek(kpb.RotateKekRequest(), metadata=ADMIN)
    assert (rotated.version.version, rotated.version.state, rotated.previous_version) == (
        2,
        kpb.KEK_STATE_ACTIVE,
        1,
    )
    status = await _status(keys)
    assert status[1].state == kpb.KEK_STATE_DECRYPT_ONLY
    assert (status[1].member_keys, status[1].index_keys) == (5, 1)
    assert (status[2].member_keys, status[2].index_keys) == (0, 0)

    # The very next sign-up is wrapped under the new version; old members still read.
    signed |= await _sign_up(admin_members, 1)
    status = await _status(keys)
    assert (status[1].member_keys, status[2].member_keys) == (5, 1)
    await _reads_back(admin_members, signed)

    # Destroying a version still in use, or the active one, is refused and says why.
    in_use = await _fails(
        keys.DestroyKekVersion(kpb.DestroyKekVersionRequest(version=1), metadata=ADMIN),
        Code.FAILED_PRECONDITION,
    )
    violation = precondition_violation(in_use)
    assert violation.type == "IN_USE"
    assert "5 member keys" in violation.description
    assert "1 index keys" in violation.description
    active = await _fails(
        keys.DestroyKekVersion(kpb.DestroyKekVersionRequest(version=2), metadata=ADMIN),
        Code.FAILED_PRECONDITION,
    )
    assert precondition_violation(active).type == "ACTIVE"
    await _fails(
        keys.DestroyKekVersion(kpb.DestroyKekVersionRequest(version=7), metadata=ADMIN),
        Code.NOT_FOUND,
    )
    plan = await keys.DestroyKekVersion(
        kpb.DestroyKekVersionRequest(version=1, dry_run=True), metadata=ADMIN
    )
    assert (plan.allowed, plan.destroyed) == (False, False)
    assert "5 member keys" in plan.reason

    # Dry runs change nothing.
    before = await _status(keys)
    (dry,) = await _rewrap(keys, dry_run=True)
    assert (dry.done, dry.dry_run, dry.total, dry.rewrapped) == (True, True, 6, 0)
    assert await _status(keys) == before

    progress = await _rewrap(keys, batch_size=2)
    assert [p.done for p in progress] == [False] * (len(progress) - 1) + [True]
    last = progress[-1]
    assert (last.target_version, last.total, last.rewrapped, last.skipped) == (2, 6, 6, 0)
    assert last.batches == 3  # 5 member keys in batches of 2; the index key goes first
    assert [p.rewrapped for p in progress] == sorted(p.rewrapped for p in progress)
    status = await _status(keys)
    assert (status[1].member_keys, status[1].index_keys) == (0, 0)
    assert (status[2].member_keys, status[2].index_keys) == (6, 1)

    plan = await keys.DestroyKekVersion(
        kpb.DestroyKekVersionRequest(version=1, dry_run=True), metadata=ADMIN
    )
    assert (plan.allowed, plan.destroyed) == (True, False)
    assert (await _status(keys))[1].state == kpb.KEK_STATE_DECRYPT_ONLY
    destroyed = await keys.DestroyKekVersion(
        kpb.DestroyKekVersionRequest(version=1), metadata=ADMIN
    )
    assert (destroyed.version, destroyed.destroyed) == (1, True)
    status = await _status(keys)
    assert status[1].state == kpb.KEK_STATE_DESTROYED
    assert status[1].HasField("destroyed_at")
    assert (status[1].member_keys, status[1].index_keys) == (0, 0)
    kek_file = json.loads((admin_settings.data_dir / "kek.json").read_text())
    assert set(kek_file["versions"]) == {"2"}  # the material is gone too

    # Nothing left to move; destroying again is a no-op.
    (again,) = await _rewrap(keys)
    assert (again.done, again.total, again.rewrapped) == (True, 0, 0)
    assert (
        await keys.DestroyKekVersion(kpb.DestroyKekVersionRequest(version=1), metadata=ADMIN)
    ).destroyed

    await _reads_back(admin_members, signed)
    # A restarted server (nothing cached) opens every key under version 2 alone.
    async with _restarted(admin_settings, clock) as fresh:
        await _reads_back(fresh, signed)


async def test_rewrap_validates_batch_size(keys: KeyAdminServiceStub) -> None:
    error = await _fails(_rewrap(keys, batch_size=10_001), Code.INVALID_ARGUMENT)
    assert set(field_violations(error)) == {"batch_size"}


# --- per-member rotation ---------------------------------------------------------------------


async def test_rotate_member_key_keeps_fields_and_history(
    keys: KeyAdminServiceStub, admin_members: MemberServiceStub
) -> None:
    request = sign_up_request(mobile_phone="+82 10-9876-5432")
    member_id = (await admin_members.SignUp(request)).member_id
    auth = await admin_members.Authenticate(
        pb.AuthenticateRequest(login_id=request.login_id, password=request.password),
        metadata=CLIENT_IP,
    )
    session = (("x-member-session", auth.session_token),)
    for action in ("order.view", "order.pay"):
        await admin_members.RecordAccess(
            pb.RecordAccessRequest(member_id=member_id, action=action, ip="198.51.100.4")
        )

    async def snapshot() -> tuple[pb.Member, list[tuple[str, str]]]:
        member = (
            await admin_members.GetMember(
                pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_MEMBER_REQUEST),
                metadata=session,
            )
        ).member
        history = await admin_members.ListAccessHistory(
            pb.ListAccessHistoryRequest(member_id=member_id), metadata=session
        )
        return member, [(e.action, e.ip) for e in history.entries]

    before = await snapshot()
    assert len(before[1]) == 3
    first = await keys.RotateMemberKey(
        kpb.RotateMemberKeyRequest(member_id=member_id), metadata=ADMIN
    )
    second = await keys.RotateMemberKey(
        kpb.RotateMemberKeyRequest(member_id=member_id), metadata=ADMIN
    )
    assert (first.dek_id, second.dek_id) == (2, 3)
    assert await snapshot() == before
    auth = await admin_members.Authenticate(
        pb.AuthenticateRequest(login_id=request.login_id, password=request.password),
        metadata=CLIENT_IP,
    )
    assert auth.member_id == member_id

    await _fails(
        keys.RotateMemberKey(
            kpb.RotateMemberKeyRequest(member_id="00000000-0000-4000-8000-000000000000"),
            metadata=ADMIN,
        ),
        Code.NOT_FOUND,
    )
    await _fails(
        keys.RotateMemberKey(kpb.RotateMemberKeyRequest(member_id=""), metadata=ADMIN),
        Code.INVALID_ARGUMENT,
    )


# --- the audit trail -----------------------------------------------------------------------


async def test_every_key_operation_is_recorded_without_key_bytes(
    keys: KeyAdminServiceStub, admin_members: MemberServiceStub, admin_settings: Settings
) -> None:
    member_id = next(iter(await _sign_up(admin_members, 3)))
    material = set(
        json.loads((admin_settings.data_dir / "kek.json").read_text())["versions"].values()
    )
    other = (("authorization", f"Bearer {ADMIN_TOKEN}"), ("x-actor", "bob.ops"))
    await keys.RotateKek(kpb.RotateKekRequest(), metadata=ADMIN)
    material |= set(
        json.loads((admin_settings.data_dir / "kek.json").read_text())["versions"].values()
    )
    await _rewrap(keys, batch_size=2)
    await keys.DestroyKekVersion(kpb.DestroyKekVersionRequest(version=1), metadata=other)
    await keys.RotateMemberKey(kpb.RotateMemberKeyRequest(member_id=member_id), metadata=other)
    await _rewrap(keys, dry_run=True)  # a dry run changes nothing and records nothing

    events = list((await keys.ListKeyEvents(kpb.ListKeyEventsRequest(), metadata=ADMIN)).events)
    summary = [(e.operation, e.actor, e.kek_version, e.member_id) for e in events]
    assert summary == [
        ("rotate_member_key", "bob.ops", 0, member_id),
        ("destroy_kek_version", "bob.ops", 1, ""),
        ("rewrap", ACTOR, 2, ""),
        ("rotate_kek", ACTOR, 2, ""),
        ("create_kek_version", "bootstrap", 1, ""),  # the first start
    ]
    assert dict(events[0].details) == {"dek_id": "2"}
    assert dict(events[2].details) == {"rewrapped": "4", "skipped": "0", "batches": "2"}
    assert dict(events[3].details) == {"previous_active": "1"}
    assert all(e.at.seconds > 0 for e in events)
    limited = await keys.ListKeyEvents(kpb.ListKeyEventsRequest(limit=1), metadata=ADMIN)
    assert [e.operation for e in limited.events] == ["rotate_member_key"]

    text = str(events)
    wire = b"".join(e.SerializeToString() for e in events)
    assert material
    for secret in material:
        assert secret not in text
        assert base64.b64decode(secret) not in wire


# --- authentication --------------------------------------------------------------------------


async def test_admin_api_is_off_without_a_token(channel: grpc.aio.Channel) -> None:
    stub = KeyAdminServiceStub(channel)
    await _fails(stub.GetKeyStatus(kpb.GetKeyStatusRequest(), metadata=ADMIN), Code.UNIMPLEMENTED)
    await _fails(stub.RotateKek(kpb.RotateKekRequest(), metadata=ADMIN), Code.UNIMPLEMENTED)


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong-token-0123456789abcdef",
        f"Basic {ADMIN_TOKEN}",
        ADMIN_TOKEN,
        "Bearer ",
        f"Bearer {ADMIN_TOKEN}x",
    ],
)
async def test_a_wrong_or_missing_token_is_unauthenticated(
    keys: KeyAdminServiceStub, authorization: str | None
) -> None:
    metadata = (("x-actor", ACTOR),)
    if authorization is not None:
        metadata += (("authorization", authorization),)
    status = await _fails(
        keys.GetKeyStatus(kpb.GetKeyStatusRequest(), metadata=metadata), Code.UNAUTHENTICATED
    )
    assert status.details() == "the key admin API needs a valid admin token"
    rotate = await _fails(
        keys.RotateKek(kpb.RotateKekRequest(), metadata=metadata), Code.UNAUTHENTICATED
    )
    assert rotate.details() == status.details()
    await _fails(_rewrap_with(keys, metadata), Code.UNAUTHENTICATED)
    # Nothing happened.
    assert (await _status(keys)).keys() == {1}


async def _rewrap_with(keys: KeyAdminServiceStub, metadata: tuple[tuple[str, str], ...]) -> None:
    async for _ in keys.RewrapMemberKeys(kpb.RewrapMemberKeysRequest(), metadata=metadata):
        pass


@pytest.mark.parametrize("actor", [None, "", "two words", "x" * 65, "a/b"])
async def test_the_actor_must_be_named(keys: KeyAdminServiceStub, actor: str | None) -> None:
    metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    if actor is not None:
        metadata += (("x-actor", actor),)
    error = await _fails(
        keys.RotateKek(kpb.RotateKekRequest(), metadata=metadata), Code.INVALID_ARGUMENT
    )
    assert set(field_violations(error)) == {"x-actor"}
    assert (await _status(keys)).keys() == {1}


# --- the requirement: rotation while serving ---------------------------------------------


@dataclass
class _Client:
    """One client task's own members (so its reads must see its own last writes)."""

    members: dict[str, dict[str, str]] = field(default_factory=dict)
    calls: int = 0
    failures: list[str] = field(default_factory=list)


_unique = itertools.count(1)


async def _client_loop(
    stub: MemberServiceStub, client: _Client, seed: int, stop: asyncio.Event
) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        op = rng.choice(("get", "get", "update", "authenticate", "access", "sign_up"))
        member_id = rng.choice(sorted(client.members))
        data = client.members[member_id]
        client.calls += 1
        try:
            if op == "get":  # IDENTIFICATION: these three fields, no member session
                member = (
                    await stub.GetMember(
                        pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_IDENTIFICATION)
                    )
                ).member
                seen = {"login_id": member.login_id, "name": member.name, "email": member.email}
                if seen != {k: data[k] for k in seen}:
                    client.failures.append(f"get: stale or wrong data for {member_id}")
            elif op == "update":
                n = next(_unique)
                name, email = f"Renamed Member{n}", f"renamed{n:06d}@example.com"
                login = await stub.Authenticate(  # the member's own right: their session
                    pb.AuthenticateRequest(login_id=data["login_id"], password=data["password"]),
                    metadata=CLIENT_IP,
                )
                await stub.UpdateMember(
                    pb.UpdateMemberRequest(
                        member_id=member_id,
                        name=name,
                        email=email,
                        update_mask=FieldMask(paths=["name", "email"]),
                        current_password=data["password"],
                    ),
                    metadata=(("x-member-session", login.session_token),),
                )
                data.update(name=name, email=email)
            elif op == "authenticate":
                auth = await stub.Authenticate(
                    pb.AuthenticateRequest(login_id=data["login_id"], password=data["password"]),
                    metadata=CLIENT_IP,
                )
                if auth.member_id != member_id:
                    client.failures.append("authenticate: another member")
            elif op == "access":
                await stub.RecordAccess(
                    pb.RecordAccessRequest(
                        member_id=member_id, action="order.view", ip="198.51.100.7"
                    )
                )
            else:
                request = sign_up_request()
                new_id = (await stub.SignUp(request)).member_id
                client.members[new_id] = {
                    "login_id": request.login_id,
                    "password": request.password,
                    "name": request.name,
                    "email": request.email,
                }
        except grpc.aio.AioRpcError as error:
            client.failures.append(f"{op}: {error.code().name} {error.details()}")


async def _admin_call(call: object) -> object:
    """An admin call, retried when the member kept changing under it (ABORTED)."""
    for _ in range(5):
        try:
            return await call()  # type: ignore[operator]
        except grpc.aio.AioRpcError as error:
            if error.code() != Code.ABORTED:
                raise
    raise AssertionError("still ABORTED after 5 attempts")


async def test_rotation_rewrap_and_destroy_while_serving(
    keys: KeyAdminServiceStub,
    admin_members: MemberServiceStub,
    admin_settings: Settings,
    clock: FrozenClock,
) -> None:
    clients = [_Client() for _ in range(4)]
    for client in clients:
        for member_id, request in (await _sign_up(admin_members, 12)).items():
            client.members[member_id] = {
                "login_id": request.login_id,
                "password": request.password,
                "name": request.name,
                "email": request.email,
            }
    some_members = [next(iter(c.members)) for c in clients] + [list(c.members)[5] for c in clients]

    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(_client_loop(admin_members, c, seed, stop))
        for seed, c in enumerate(clients)
    ]
    try:
        await asyncio.sleep(0.2)  # traffic first
        rotated = await keys.RotateKek(kpb.RotateKekRequest(), metadata=ADMIN)
        assert rotated.version.version == 2

        async def rotate_members() -> list[int]:
            dek_ids = []
            for member_id in some_members:
                reply = await _admin_call(
                    lambda m=member_id: keys.RotateMemberKey(
                        kpb.RotateMemberKeyRequest(member_id=m), metadata=ADMIN
                    )
                )
                dek_ids.append(reply.dek_id)  # type: ignore[attr-defined]
            return dek_ids

        # Member key rotations race the re-wrap itself, as well as the clients.
        progress, dek_ids = await asyncio.gather(_rewrap(keys, batch_size=7), rotate_members())
        last = progress[-1]
        assert last.done
        assert last.batches >= 5
        assert last.rewrapped + last.skipped >= 49  # 48 members and the index key, at least
        assert dek_ids == [2] * len(some_members)

        destroyed = await keys.DestroyKekVersion(
            kpb.DestroyKekVersionRequest(version=1), metadata=ADMIN
        )
        assert destroyed.destroyed
        await asyncio.sleep(0.2)  # and traffic after
    finally:
        stop.set()
        await asyncio.gather(*tasks)

    failures = [f for c in clients for f in c.failures]
    assert failures == []
    assert sum(c.calls for c in clients) > 100
    assert sum(len(c.members) for c in clients) > 48  # sign-ups ran throughout

    status = await _status(keys)
    assert status[1].state == kpb.KEK_STATE_DESTROYED
    total = sum(len(c.members) for c in clients)
    assert (status[2].member_keys, status[2].index_keys) == (total, 1)

    # Every member's data is intact, read by a fresh server with nothing cached.
    async with _restarted(admin_settings, clock) as stub:
        for client in clients:
            for member_id, data in client.members.items():
                member = (
                    await stub.GetMember(
                        pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_IDENTIFICATION)
                    )
                ).member
                assert (member.login_id, member.name, member.email) == (
                    data["login_id"],
                    data["name"],
                    data["email"],
                )
                auth = await stub.Authenticate(
                    pb.AuthenticateRequest(login_id=data["login_id"], password=data["password"]),
                    metadata=CLIENT_IP,
                )
                assert auth.member_id == member_id
