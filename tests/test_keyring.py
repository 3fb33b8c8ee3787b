"""The keyring's rules in one type (issue 9, item 4): its invariants are checked when
it is built, and "which version may be destroyed" is decided by one method. The
end-to-end behaviour (GetKeyStatus, DestroyKekVersion over gRPC) is in
test_key_admin_api.py; these name one case each."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from vault.errors import NotFound, PreconditionFailed
from vault.keyring import KekVersionStatus, Keyring, next_version
from vault.store.base import KekVersionRow

AT = datetime(2026, 6, 15, tzinfo=UTC)


def _row(version: int, state: str) -> KekVersionRow:
    return KekVersionRow(version, state, AT)  # type: ignore[arg-type]


def _usage(version: int, state: str, member_keys: int = 0, retained: int = 0) -> KekVersionStatus:
    return KekVersionStatus(version, state, AT, None, member_keys, 0, retained)


def test_a_keyring_knows_its_active_version_and_keeps_version_order() -> None:
    keyring = Keyring([_row(3, "active"), _row(1, "destroyed"), _row(2, "decrypt_only")])
    assert keyring.active == 3
    assert [r.version for r in keyring.versions] == [1, 2, 3]
    assert next_version(keyring.versions) == 4
    with pytest.raises(AttributeError):
        keyring.active = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "rows",
    [
        [],
        [_row(1, "decrypt_only")],
        [_row(1, "active"), _row(2, "active")],
        [_row(1, "active"), _row(1, "decrypt_only")],
        [_row(0, "active")],
        [_row(1, "active"), _row(2, "retired")],
    ],
    ids=["empty", "no-active", "two-active", "duplicate", "non-positive", "unknown-state"],
)
def test_an_invalid_keyring_is_refused(rows: list[KekVersionRow]) -> None:
    with pytest.raises(PreconditionFailed):
        Keyring(rows)


def test_which_version_may_be_destroyed() -> None:
    keyring = Keyring([_row(1, "destroyed"), _row(2, "decrypt_only"), _row(3, "active")])
    assert keyring.plan_destroy(_usage(1, "destroyed")).allowed
    assert keyring.plan_destroy(_usage(2, "decrypt_only")).allowed
    in_use = keyring.plan_destroy(_usage(2, "decrypt_only", member_keys=4, retained=1))
    assert not in_use.allowed
    assert "4 member keys" in in_use.reason
    assert "1 retained member keys" in in_use.reason
    assert not keyring.plan_destroy(_usage(3, "active")).allowed
    with pytest.raises(NotFound):
        keyring.plan_destroy(_usage(9, "decrypt_only"))


def test_the_guard_before_the_stores_own_refuses_active_and_retained_keys() -> None:
    keyring = Keyring([_row(1, "destroyed"), _row(2, "decrypt_only"), _row(3, "active")])
    with pytest.raises(PreconditionFailed) as active:
        keyring.require_destroyable(3, retained_keys=0)
    assert active.value.kind == "ACTIVE"
    with pytest.raises(PreconditionFailed) as retained:
        keyring.require_destroyable(2, retained_keys=2)
    assert retained.value.kind == "IN_USE"
    keyring.require_destroyable(2, retained_keys=0)
    keyring.require_destroyable(1, retained_keys=2)  # destroyed already: nothing to guard
    keyring.require_destroyable(9, retained_keys=0)  # unknown: the store answers NotFound
