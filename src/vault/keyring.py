"""The KEK keyring's rules, in one immutable type.

Like HashiCorp Vault's ``keyring.go`` and Tink's ``_validate_keyset``: the
invariants of the KEK versions as recorded (versions unique and positive, states
known, exactly one active) are checked in one function, when a :class:`Keyring`
is built, and "which version may be destroyed" is decided in one method. The
store keeps one guard of its own inside the destroying transaction (no key may
still be wrapped under the version), since only it sees the counts of that moment.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from vault.errors import NotFound, PreconditionFailed
from vault.store.base import KekVersionRow

KEK_STATES = frozenset({"active", "decrypt_only", "destroyed"})


@dataclass(frozen=True, slots=True)
class KekVersionStatus:
    version: int
    state: str
    created_at: datetime
    destroyed_at: datetime | None
    member_keys: int
    index_keys: int
    #: Withdrawn members' DEKs in the separated retention storage.
    retained_keys: int = 0

    @property
    def wraps_keys(self) -> bool:
        return bool(self.member_keys or self.index_keys or self.retained_keys)


@dataclass(frozen=True, slots=True)
class DestroyPlan:
    version: int
    allowed: bool
    reason: str


@dataclass(frozen=True, slots=True, init=False)
class Keyring:
    """KEK versions as recorded, in version order; valid by construction."""

    versions: tuple[KekVersionRow, ...]
    active: int

    def __init__(self, rows: Iterable[KekVersionRow]) -> None:
        versions = tuple(sorted(rows, key=lambda r: r.version))
        object.__setattr__(self, "versions", versions)
        object.__setattr__(self, "active", _validate(versions))

    def get(self, version: int) -> KekVersionRow:
        for row in self.versions:
            if row.version == version:
                return row
        raise NotFound(f"KEK version {version}")

    def state(self, version: int) -> str | None:
        """The version's state, None for a version the keyring does not hold."""
        return next((r.state for r in self.versions if r.version == version), None)

    def plan_destroy(self, usage: KekVersionStatus) -> DestroyPlan:
        """Whether ``usage``'s version may be destroyed: never the active one, never
        one still wrapping a key (member, index or retained); a destroyed one is."""
        version = usage.version
        state = self.get(version).state
        if state == "destroyed":
            return DestroyPlan(version, True, "already destroyed")
        if state == "active":
            return DestroyPlan(version, False, "it is the active version; rotate first")
        if usage.wraps_keys:
            return DestroyPlan(version, False, _in_use(usage) + "; re-wrap first")
        return DestroyPlan(version, True, "no key is wrapped under it")

    def require_destroyable(self, version: int, retained_keys: int) -> None:
        """The guard for what the store's own destroy transaction cannot see: the
        version is not active, and no retained member key (in the separate retention
        database) is wrapped under it. A version the keyring does not hold passes:
        the store answers NotFound for it."""
        state = self.state(version)
        if state == "active":
            raise PreconditionFailed(
                "kek_version", f"KEK version {version} is active; rotate first", "ACTIVE"
            )
        if retained_keys and state not in (None, "destroyed"):
            raise PreconditionFailed(
                "kek_version",
                f"KEK version {version} still wraps {retained_keys} retained member keys; "
                "re-wrap them to the active version first",
                "IN_USE",
            )


def next_version(rows: Iterable[KekVersionRow]) -> int:
    """The number a rotation gives its new version (also on a keyring that does not
    validate: rotating makes exactly one version active again)."""
    return max((r.version for r in rows), default=0) + 1


def _validate(versions: tuple[KekVersionRow, ...]) -> int:
    """The keyring's invariants; returns the active version."""
    numbers = [r.version for r in versions]
    if len(set(numbers)) != len(numbers) or any(n < 1 for n in numbers):
        raise PreconditionFailed("kek_versions", "KEK versions must be unique positive numbers")
    if any(r.state not in KEK_STATES for r in versions):
        raise PreconditionFailed("kek_versions", "a KEK version has an unknown state")
    active = [r.version for r in versions if r.state == "active"]
    if len(active) != 1:
        raise PreconditionFailed(
            "kek_versions", f"exactly one KEK version must be active, found {len(active)}"
        )
    return active[0]


def _in_use(v: KekVersionStatus) -> str:
    text = f"it still wraps {v.member_keys} member keys and {v.index_keys} index keys"
    if v.retained_keys:
        text += f" and {v.retained_keys} retained member keys"
    return text
