"""Per-member key rotation racing the member's own writes and reads.

A hook in the store lets another operation land exactly between the rotation's
read and its write (the window a busy server hits by chance), so the race is
reproduced every time instead of once in many runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from grpc_support import sign_up_request

from vault import CHEAPEST, FrozenClock, MemberChanges, NewMember, Purpose, Vault, open_vault
from vault.keyadmin import KeyAdmin


class _Interleave:
    """The real store; the first ``list_access`` call first runs ``during``."""

    def __init__(self, store: Any, during: Callable[[], Awaitable[None]]) -> None:
        self._store, self._during, self.fired = store, during, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def list_access(self, *args: Any, **kwargs: Any) -> Any:
        if not self.fired:
            self.fired = True
            await self._during()
        return await self._store.list_access(*args, **kwargs)


async def _member(vault: Vault) -> str:
    r = sign_up_request()
    return await vault.sign_up(NewMember(r.login_id, r.password, r.name, r.email, r.birth_date))


async def test_an_update_during_a_member_key_rotation_is_kept(
    store_url: str, tmp_path: Path, clock: FrozenClock
) -> None:
    async with open_vault(
        data_dir=tmp_path / "d", database_url=store_url, argon2=CHEAPEST, clock=clock
    ) as vault:
        mid = await _member(vault)

        async def update() -> None:
            await vault.update_member(mid, MemberChanges(frozenset({"name"}), name="Changed Name"))

        store = _Interleave(vault.parts.store, update)
        keys = KeyAdmin(store, vault.parts.provider, vault.parts.member_keys, clock)  # type: ignore[arg-type]
        # The first attempt finds the field changed under it and starts again.
        assert await keys.rotate_member_key(mid, "test") == 2
        assert store.fired
        view = await vault.get_member(mid, Purpose.MEMBER_REQUEST)
        assert view.name == "Changed Name"


async def test_an_access_entry_during_a_member_key_rotation_is_kept(
    store_url: str, tmp_path: Path, clock: FrozenClock
) -> None:
    async with open_vault(
        data_dir=tmp_path / "d", database_url=store_url, argon2=CHEAPEST, clock=clock
    ) as vault:
        mid = await _member(vault)

        async def record() -> None:
            await vault.record_access(mid, "order.view", "192.0.2.1")

        store = _Interleave(vault.parts.store, record)
        keys = KeyAdmin(store, vault.parts.provider, vault.parts.member_keys, clock)  # type: ignore[arg-type]
        assert await keys.rotate_member_key(mid, "test") == 2
        page = await vault.list_access(mid, 10, "")
        assert [e.action for e in page.entries] == ["order.view"]
