"""Seeding a bench database with COPY: members, their keys, and optional consents and
access-log entries, as the PostgreSQL benchmarks (rewrap.py, sweep.py) want them.

Each member gets random HMACs, ciphertext-sized random blobs (the field ciphertext header
in front) and a fresh DEK wrapped under KEK v1 by the vault's own provider with its real
context, so the service can unwrap every one. What differs between the benchmarks is a
function: per member, its timestamps and whether it gets the extra rows.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

try:
    import vault  # noqa: F401
except ImportError:  # not pip-installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from vault.bindings import dek_context
from vault.providers.base import KeyProvider

SEED_CHUNK = 50_000
MEMBER_COLUMNS = (
    "member_id",
    "created_at",
    "last_seen_at",
    "login_hmac",
    "email_hmac",
    "login_id_ct",
    "password_hash_ct",
    "name_ct",
    "email_ct",
    "mobile_phone_ct",
    "inactivity_notice_at",
)
KEY_COLUMNS = ("member_id", "dek_id", "kek_version", "wrapped_dek")
CONSENT_COLUMNS = ("member_id", "purpose", "granted", "policy_version", "recorded_at")
ACCESS_COLUMNS = ("member_id", "at", "action_ct", "ip_ct")
# Field ciphertext = 0x01 | dek_id (4) | nonce (12) | AES-GCM(plaintext | tag (16)):
# 33 bytes + the plaintext. Plaintext lengths: login id, argon2 PHC string, name, e-mail,
# phone number (always present: empty when not given).
CT_PLAINTEXT = (12, 97, 16, 24, 12)
CT_HEADER = b"\x01\x00\x00\x00\x01"
_CT_LENGTHS = [33 + n for n in CT_PLAINTEXT]
_PER_MEMBER = 64 + sum(n - len(CT_HEADER) for n in _CT_LENGTHS)  # noise bytes a member
TWO_YEARS = 63_072_000  # seconds


@dataclass(frozen=True)
class Activity:
    """One member's timestamps, and whether it gets the extra rows (consents, access log)."""

    created_at: datetime
    last_seen_at: datetime
    inactivity_notice_at: datetime | None = None
    extras: bool = False


#: Called per member with its position (0-based, in seeding order) and the seeding RNG.
ActivityFn = Callable[[int, random.Random], Activity]
#: Called per member after its rows are built: position, member id, plaintext DEK, activity.
MemberHook = Callable[[int, uuid.UUID, bytes, Activity], None]

_BASE = datetime(2024, 1, 1, tzinfo=UTC)


def since_2024(index: int, rng: random.Random) -> Activity:
    """Created at a random moment of 2024-2025, last seen within a day of that; no notice."""
    created = _BASE + timedelta(seconds=rng.randrange(TWO_YEARS))
    return Activity(created, created + timedelta(seconds=rng.randrange(86_400)))


@dataclass(frozen=True)
class SeedOptions:
    members: int
    #: Timestamps (and extras or not) per member; the default is ``since_2024``.
    activity: ActivityFn = since_2024
    #: Consent purposes granted (policy "2024-01", at last_seen_at) by members with extras.
    consents: tuple[str, ...] = ()
    #: Access-log entries (one an hour back from last_seen_at) per member with extras.
    access_log: int = 0
    #: Members per COPY round.
    batch_size: int = SEED_CHUNK
    #: VACUUM (ANALYZE) members and member_keys at the end.
    vacuum: bool = False
    on_member: MemberHook | None = None


async def seed(url: str, provider: KeyProvider, options: SeedOptions) -> None:
    """COPY ``options.members`` members and their keys (a fresh DEK each, wrapped under KEK
    v1 with its real context), and the extra rows ``options`` asks for, ``batch_size`` at a
    time. Progress goes to stderr."""
    members = options.members
    rng = random.Random(secrets.randbits(64))
    with_extras = bool(options.consents) or options.access_log > 0
    conns = [await asyncpg.connect(url) for _ in range(3 if with_extras else 2)]
    members_conn, keys_conn, *extra_conns = conns
    try:
        # The child rows are written alongside their members: the foreign-key checks (one
        # lookup and one row lock per row) are not what is measured here.
        for conn in (keys_conn, *extra_conns):
            await conn.execute("SET session_replication_role = replica")
        done = 0
        while done < members:
            n = min(options.batch_size, members - done)
            noise = rng.randbytes(n * _PER_MEMBER)
            deks = os.urandom(n * 32)
            member_rows: list[tuple[Any, ...]] = []
            key_rows: list[tuple[Any, ...]] = []
            consent_rows: list[tuple[Any, ...]] = []
            access_rows: list[tuple[Any, ...]] = []
            at = 0
            for i in range(n):
                member_id = uuid.uuid4()
                fields: list[bytes] = [noise[at : at + 32], noise[at + 32 : at + 64]]
                at += 64
                for length in _CT_LENGTHS:
                    end = at + length - len(CT_HEADER)
                    fields.append(CT_HEADER + noise[at:end])
                    at = end
                activity = options.activity(done + i, rng)
                seen = activity.last_seen_at
                member_rows.append(
                    (member_id, activity.created_at, seen, *fields, activity.inactivity_notice_at)
                )
                if activity.extras:
                    for purpose in options.consents:
                        consent_rows.append((member_id, purpose, True, "2024-01", seen))
                    for k in range(options.access_log):
                        access_rows.append(
                            (
                                member_id,
                                seen - timedelta(hours=k),
                                CT_HEADER + os.urandom(28 + 8),
                                CT_HEADER + os.urandom(28 + 16),
                            )
                        )
                dek = deks[i * 32 : i * 32 + 32]
                wrapped = await provider.wrap(1, dek, dek_context(str(member_id), 1))
                key_rows.append((member_id, 1, 1, wrapped))
                if options.on_member is not None:
                    options.on_member(done + i, member_id, dek, activity)
            await asyncio.gather(
                members_conn.copy_records_to_table(
                    "members", records=member_rows, columns=MEMBER_COLUMNS
                ),
                keys_conn.copy_records_to_table(
                    "member_keys", records=key_rows, columns=KEY_COLUMNS
                ),
                *(_extras(conn, consent_rows, access_rows) for conn in extra_conns),
            )
            done += n
            print(f"  seeded {done:,}/{members:,}", file=sys.stderr, end="\r")
        print(file=sys.stderr)
        if options.vacuum:
            await members_conn.execute("VACUUM (ANALYZE) members")
            await keys_conn.execute("VACUUM (ANALYZE) member_keys")
    finally:
        for conn in conns:
            await conn.close()


async def _extras(
    conn: asyncpg.Connection, consents: list[tuple[Any, ...]], access: list[tuple[Any, ...]]
) -> None:
    if consents:
        await conn.copy_records_to_table("consents", records=consents, columns=CONSENT_COLUMNS)
    if access:
        await conn.copy_records_to_table("access_log", records=access, columns=ACCESS_COLUMNS)
