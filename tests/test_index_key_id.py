"""The blind-index key is bound to its own key id, whatever that id is (issue 9, item 7).

The index key's wrapping binds ``index-key|<key_id>``. A database whose index key
has an id other than 1 must open, find members by login ID, survive a KEK rotation
and re-wrap (which must re-wrap under the key's own id, not the default), and open
again after the old KEK version is destroyed. Over real gRPC, on both backends.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_support import CLIENT_IP, sign_up_request
from pydantic import SecretStr

from privacyvault.v1 import key_admin_pb2 as kpb
from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1.key_admin_pb2_grpc import KeyAdminServiceStub
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from service.config import Settings
from service.server import run_server
from vault import FrozenClock
from vault._hazmat import new_key_material
from vault.bindings import index_key_context
from vault.providers.local import LocalKeyProvider
from vault.store import open_store
from vault.store.base import IndexKeyRow, KekVersionRow

TOKEN = "test-admin-token-0123456789abcdef"
ADMIN = (("authorization", f"Bearer {TOKEN}"), ("x-actor", "alice@security"))
INDEX_KEY_ID = 7  # anything but the default, 1


async def _prepare(data_dir: Path, store_url: str, clock: FrozenClock) -> bytes:
    """A database bootstrapped with KEK version 1 and an index key of id 7 (as a
    future index-key rotation would leave it); returns the index key material."""
    data_dir.mkdir(mode=0o700, parents=True)  # noqa: ASYNC240 - test setup
    provider = LocalKeyProvider(data_dir / "kek.json")
    store = await open_store(store_url)
    try:
        await store.migrate()
        await provider.create_version(1)
        assert await store.insert_kek_version(KekVersionRow(1, "active", clock.now()))
        material = new_key_material()
        wrapped = await provider.wrap(1, material, index_key_context(INDEX_KEY_ID))
        await store.insert_index_key(IndexKeyRow(INDEX_KEY_ID, 1, wrapped, clock.now()))
    finally:
        await store.close()
        await provider.close()
    return material


async def _authenticates(members: MemberServiceStub, request: pb.SignUpRequest) -> str:
    reply = await members.Authenticate(
        pb.AuthenticateRequest(login_id=request.login_id, password=request.password),
        metadata=CLIENT_IP,
    )
    return reply.member_id


async def test_an_index_key_id_other_than_1_survives_rotation_rewrap_and_destroy(
    server_settings: Settings, store_url: str, clock: FrozenClock
) -> None:
    settings = server_settings.model_copy(update={"admin_token": SecretStr(TOKEN)})
    material = await _prepare(settings.data_dir, store_url, clock)
    request = sign_up_request()
    async with (
        run_server(settings, clock=clock) as running,
        grpc.aio.insecure_channel(running.target) as ch,
    ):
        members, keys = MemberServiceStub(ch), KeyAdminServiceStub(ch)
        member_id = (await members.SignUp(request)).member_id
        assert await _authenticates(members, request) == member_id
        await keys.RotateKek(kpb.RotateKekRequest(), metadata=ADMIN)
        call = keys.RewrapMemberKeys(kpb.RewrapMemberKeysRequest(), metadata=ADMIN)
        last = [reply.progress async for reply in call][-1]
        assert (last.done, last.rewrapped, last.skipped) == (True, 2, 0)
        await keys.DestroyKekVersion(kpb.DestroyKekVersionRequest(version=1), metadata=ADMIN)
    # The index key kept its id, moved to version 2, and opens under its own id.
    store = await open_store(store_url)
    provider = LocalKeyProvider(settings.data_dir / "kek.json")
    try:
        stored = await store.get_index_key()
        assert stored is not None
        assert (stored.key_id, stored.kek_version) == (INDEX_KEY_ID, 2)
        opened = await provider.unwrap(2, stored.wrapped_key, index_key_context(INDEX_KEY_ID))
        assert opened == material
    finally:
        await store.close()
        await provider.close()
    # A fresh server (nothing cached) opens the database and finds the member by
    # login ID: the blind indexes are still those of the same key.
    async with (
        run_server(settings, clock=clock) as running,
        grpc.aio.insecure_channel(running.target) as ch,
    ):
        assert await _authenticates(MemberServiceStub(ch), request) == member_id
