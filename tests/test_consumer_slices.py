"""Issue 9, item 1: each consumer takes the store slice it calls, never the whole Store.

mypy proves a consumer calls nothing outside its slice; this keeps the slices from
growing back into the sum unnoticed (a constructor retyped with ``Store`` type-checks).
"""

from __future__ import annotations

import typing

import pytest

from service.mailer import OutboxRelay
from service.sidecar import Sidecar
from vault.export import Export, ExportStores
from vault.idempotency import Idempotency
from vault.keyadmin import KeyAdmin, KeyAdminStores
from vault.lifecycle import Lifecycle, LifecycleStores
from vault.login_guard import LoginGuard, LoginGuardStores
from vault.mail import MailOutbox
from vault.member_keys import MemberKeys, MemberKeyStore
from vault.recovery import Recovery, RecoveryStores
from vault.retention import Retention, RetentionStores
from vault.sessions import MemberSessions
from vault.store.base import IdempotencyStore, LeaseStore, SessionStore, Store

#: consumer, its store argument, the slice it takes
SLICES = [
    (Lifecycle, "store", LifecycleStores),
    (KeyAdmin, "store", KeyAdminStores),
    (Retention, "store", RetentionStores),
    (Recovery, "store", RecoveryStores),
    (Export, "store", ExportStores),
    (MemberKeys, "store", MemberKeyStore),
    (LoginGuard, "store", LoginGuardStores),
    (Idempotency, "store", IdempotencyStore),
    (OutboxRelay, "store", MailOutbox),
    (MemberSessions, "store", SessionStore),
]


def _methods(protocol: type) -> set[str]:
    return {name for name in dir(protocol) if not name.startswith("_")}


@pytest.mark.parametrize(("consumer", "argument", "expected"), SLICES)
def test_a_consumer_takes_its_slice_and_the_slice_is_less_than_the_store(
    consumer: type, argument: str, expected: type
) -> None:
    taken = typing.get_type_hints(consumer.__init__)[argument]
    assert taken is expected
    assert _methods(expected) < _methods(Store), f"{expected.__name__} is the whole store"


def test_the_sidecar_takes_the_lease_alone() -> None:
    taken = typing.get_type_hints(Sidecar.__init__)["leases"]
    assert _methods(taken) == _methods(LeaseStore) == {"acquire_lease", "release_lease"}
