"""The one way a member row is read: by a checked member id, NotFound for none.

A module of its own, with nothing but the store's row type beneath it, so every
component can import it: vault.members imports retention, which imports
corrections, so corrections could not import it from there.
"""

from __future__ import annotations

from typing import Protocol

from vault import policy
from vault.errors import NotFound
from vault.policy import Violations
from vault.store.base import MemberRow


class MemberReader(Protocol):
    async def get_member(self, member_id: str) -> MemberRow | None: ...


async def load_member(store: MemberReader, member_id: str) -> MemberRow:
    """The member's row; InvalidInput for a malformed id, NotFound for none."""
    v = Violations()
    mid = policy.check_member_id(member_id, v)
    v.raise_if_any()
    assert mid
    row = await store.get_member(mid)
    if row is None:
        raise NotFound
    return row
