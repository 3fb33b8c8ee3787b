"""Rows and helpers the storage contract tests share (tests/test_store_*.py)."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from vault.mail import PASSWORD_RESET
from vault.store import (
    ENCRYPTED_FIELDS,
    ConsentRow,
    KekVersionRow,
    MemberKeyRow,
    MemberRow,
    NewAccessEntry,
    Store,
)
from vault.store.base import OutboxMessage

T0 = datetime(2024, 5, 17, 12, 30, 45, 123457, tzinfo=UTC)


def ts(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def new_member(
    *,
    login_hmac: bytes | None = None,
    email_hmac: bytes | None = None,
    kek_version: int = 1,
    ciphertexts: dict[str, bytes] | None = None,
) -> MemberRow:
    member_id = str(uuid.uuid4())
    cts = {f: f"ct-{f}-".encode() + secrets.token_bytes(8) for f in ENCRYPTED_FIELDS}
    cts.update(ciphertexts or {})
    return MemberRow(
        member_id=member_id,
        created_at=T0,
        last_seen_at=T0,
        ciphertexts=cts,
        blind_indexes={
            "login_id": login_hmac or secrets.token_bytes(32),
            "email": email_hmac or secrets.token_bytes(32),
        },
        key=MemberKeyRow(
            member_id=member_id,
            dek_id=1,
            kek_version=kek_version,
            wrapped_dek=b"wrapped-" + secrets.token_bytes(40),
        ),
    )


CONSENTS = [
    ConsentRow(purpose="STATISTICS", granted=False, policy_version="2024-05", recorded_at=T0),
    ConsentRow(purpose="INQUIRY", granted=True, policy_version="2024-05", recorded_at=ts(1)),
]


def entry(at: datetime, n: int = 0) -> NewAccessEntry:
    return NewAccessEntry(at=at, action_ct=f"action-{n}".encode(), ip_ct=f"ip-{n}".encode())


async def with_active_kek(store: Store, version: int = 1) -> Store:
    assert await store.insert_kek_version(KekVersionRow(version, "active", T0))
    return store


def assert_utc(value: datetime) -> None:
    assert value.tzinfo is not None
    assert value.utcoffset() == timedelta(0)


DAY = timedelta(days=1)


def message(member_id: str, at: datetime = T0, kind: str = "inactivity_notice") -> OutboxMessage:
    return OutboxMessage(
        message_id=f"{uuid.uuid4()}@privacy-vault",
        member_id=member_id,
        kind=kind,
        params={"destroy_at": (at + 30 * DAY).isoformat()},
        created_at=at,
    )


async def member_seen_at(vault: Store, last_seen_at: datetime) -> MemberRow:
    member = replace(new_member(), last_seen_at=last_seen_at)
    await vault.insert_member(member)
    return member


def reset_mail(member_id: str, kind: str = PASSWORD_RESET) -> OutboxMessage:
    """A recovery mail (password reset by default) whose token expires in 30 minutes."""
    return OutboxMessage(
        message_id=str(uuid.uuid4()),
        member_id=member_id,
        kind=kind,
        params={"expires_at": ts(1800).isoformat()},
        created_at=T0,
    )
