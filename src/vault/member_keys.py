"""Member keys: the only caller of the key provider's wrap and unwrap.

A member's DEK is wrapped under a KEK version and bound to ``dek|member|dek_id``
(the blind-index key to ``index-key|key_id``, see :mod:`vault.bindings`). This
component unwraps DEKs through the bounded cache, wraps new ones under the active
version, re-wraps them for rotation, re-wrap and retention, and runs reads and
writes under a member's current DEK, following a per-member key rotation that
commits meanwhile. The facade, KeyAdmin and Retention share one instance.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from vault import _hazmat
from vault.bindings import dek_context, index_key_context
from vault.cache import DekCache
from vault.errors import (
    Conflict,
    DecryptionError,
    KeyChanged,
    KeyUnavailable,
    NotFound,
    PreconditionFailed,
)
from vault.keyring import Keyring
from vault.providers.base import KeyProvider
from vault.store.base import IndexKeyRow, KekVersionRow, MemberKeyRow, MemberRow, RewrapUpdate

T = TypeVar("T")
#: Reads and writes that find the member's key changed under them try this often.
KEY_CHANGE_RETRIES = 3


class MemberKeyStore(Protocol):
    """The store slice member keys read: members (for their key rows) and the keyring."""

    async def get_member(self, member_id: str) -> MemberRow | None: ...

    async def list_kek_versions(self) -> list[KekVersionRow]: ...


class MemberKeys:
    def __init__(self, store: MemberKeyStore, provider: KeyProvider, deks: DekCache) -> None:
        self._store = store
        self._provider = provider
        self._deks = deks

    def __repr__(self) -> str:
        return f"<MemberKeys provider={self._provider.name} cached={len(self._deks)}>"

    @property
    def cache(self) -> DekCache:
        return self._deks

    # --- the keyring -------------------------------------------------------------------
    async def active_version(self) -> int:
        """Read from the database each time: a rotation by any process applies to
        the very next wrap, with no restart."""
        return Keyring(await self._store.list_kek_versions()).active

    # --- member DEKs -------------------------------------------------------------------
    async def dek(self, key_row: MemberKeyRow) -> _hazmat.SecretKey:
        """The member's DEK, from the cache or unwrapped (and then cached)."""
        key = self._deks.get(key_row.member_id, key_row.dek_id)
        if key is None:
            key = await self.unwrap(key_row)
            self._deks.put(key_row.member_id, key)
        return key

    async def unwrap(self, key_row: MemberKeyRow) -> _hazmat.SecretKey:
        """The DEK unwrapped afresh, not cached (rotation, retained copies)."""
        material = await self._provider.unwrap(
            key_row.kek_version,
            key_row.wrapped_dek,
            dek_context(key_row.member_id, key_row.dek_id),
        )
        return _hazmat.SecretKey(key_row.dek_id, material)

    async def wrap(
        self, member_id: str, dek_id: int, material: bytes, version: int
    ) -> MemberKeyRow:
        wrapped = await self._provider.wrap(version, material, dek_context(member_id, dek_id))
        return MemberKeyRow(member_id, dek_id, version, wrapped)

    async def rewrapped(self, key_row: MemberKeyRow, target: int) -> MemberKeyRow:
        """The same DEK wrapped under KEK version ``target``."""
        context = dek_context(key_row.member_id, key_row.dek_id)
        material = await self._provider.unwrap(key_row.kek_version, key_row.wrapped_dek, context)
        wrapped = await self._provider.wrap(target, material, context)
        return MemberKeyRow(key_row.member_id, key_row.dek_id, target, wrapped)

    async def rewrap_update(self, key_row: MemberKeyRow, target: int) -> RewrapUpdate:
        moved = await self.rewrapped(key_row, target)
        return RewrapUpdate(
            key_row.member_id, key_row.dek_id, key_row.kek_version, target, moved.wrapped_dek
        )

    async def insert_under_active(
        self,
        member_id: str,
        dek_id: int,
        material: bytes,
        insert: Callable[[MemberKeyRow], Awaitable[None]],
    ) -> None:
        """Wrap a new DEK under the active version and ``insert`` it. The store refuses
        a version rotated away and destroyed while we wrapped (PreconditionFailed):
        read the active version again and wrap again."""
        for attempt in range(KEY_CHANGE_RETRIES):
            key_row = await self.wrap(member_id, dek_id, material, await self.active_version())
            try:
                await insert(key_row)
                return
            except PreconditionFailed:
                if attempt == KEY_CHANGE_RETRIES - 1:
                    raise

    def cache_key(self, member_id: str, key: _hazmat.SecretKey) -> None:
        self._deks.put(member_id, key)

    def evict(self, member_id: str) -> None:
        self._deks.evict(member_id)

    def clear(self) -> None:
        self._deks.clear()

    # --- the blind-index key -----------------------------------------------------------
    async def wrap_index_key(self, key_id: int, material: bytes, version: int) -> bytes:
        return await self._provider.wrap(version, material, index_key_context(key_id))

    async def unwrap_index_key(self, stored: IndexKeyRow) -> bytes:
        # Bound to the key's own id: the default id is not necessarily it.
        return await self._provider.unwrap(
            stored.kek_version, stored.wrapped_key, index_key_context(stored.key_id)
        )

    # --- reads and writes under the current key ------------------------------------------
    async def _fresh(self, member_id: str) -> MemberRow:
        row = await self._store.get_member(member_id)
        if row is None:
            raise NotFound
        return row

    async def read_under_key(
        self,
        row: MemberRow,
        read: Callable[[MemberRow, _hazmat.SecretKey], Awaitable[T]],
    ) -> T:
        """Run a read with the member's DEK. A per-member key rotation (or a re-wrap
        and destroy) that commits between reading ``row`` and the rest makes the
        key and the data disagree: read the row again and retry, only then fail."""
        for attempt in range(KEY_CHANGE_RETRIES):
            try:
                return await read(row, await self.dek(row.key))
            except (DecryptionError, KeyUnavailable):
                fresh = await self._fresh(row.member_id)
                if fresh.key == row.key or attempt == KEY_CHANGE_RETRIES - 1:
                    raise
                self._deks.evict(row.member_id)
                row = fresh
        raise AssertionError("unreachable")

    async def under_current_key(
        self,
        member_id: str,
        write: Callable[[MemberRow, _hazmat.SecretKey], Awaitable[bool]],
        first: tuple[MemberRow, _hazmat.SecretKey] | None = None,
    ) -> None:
        """Run a write encrypted under the member's current DEK. A per-member key
        rotation in between makes the store refuse it (KeyChanged): read again,
        encrypt again. A write the database rolled back in a conflict with a
        concurrent transaction (Conflict: nothing of it was written) is run again
        the same way. False from ``write`` means the member is gone."""
        last: KeyChanged | Conflict = KeyChanged()
        for _ in range(KEY_CHANGE_RETRIES):
            if first is None:
                row = await self._fresh(member_id)
                current = (row, await self.dek(row.key))
            else:
                current, first = first, None
            try:
                if not await write(*current):
                    raise NotFound
                return
            except KeyChanged as exc:
                self._deks.evict(member_id)
                last = exc
            except Conflict as exc:
                last = exc
        raise last
