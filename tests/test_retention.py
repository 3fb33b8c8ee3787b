"""Withdrawal into the separated retention storage (policy section 6), on both backends
(the retention database is a second database of the same kind), with an injected
clock: the move, unreachability through the member API, the privacy officer's tools,
timed destruction by the sidecar, crash recovery, and key management over it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError

from privacyvault.v1 import key_admin_pb2 as kpb
from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1 import member_pb2_grpc
from privacyvault.v1.key_admin_pb2_grpc import KeyAdminServiceStub
from service.config import Settings
from service.server import run_server
from service.sidecar import Sidecar
from vault import CHEAPEST, FrozenClock, RetentionRule, Vault, VaultSettings, open_vault
from vault.cache import DekCache
from vault.errors import InvalidInput, KeyChanged, NotFound, PreconditionFailed
from vault.facade import MemberChanges, NewMember
from vault.keyadmin import KeyAdmin
from vault.lifecycle import Lifecycle, LifecyclePolicy
from vault.member_keys import MemberKeys
from vault.policy import ConsentChoice, Purpose
from vault.retention import CONFIRM_GRACE, RETENTION_EXPIRED, WITHDRAWAL
from vault.store import open_retention_store
from vault.store.base import (
    RETAINED_FIELDS,
    DestructionRecord,
    MemberRow,
    RetainedMember,
    RetentionCheck,
    RetentionStore,
)

T = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)
RETAIN = 30 * DAY
REASON = "fraud prevention (internal policy 4.2)"
PASSWORD = "a long passphrase"
ADMIN_TOKEN = "retention-test-admin-token-0123"


@pytest.fixture
def r_clock() -> FrozenClock:
    return FrozenClock(T)


def vault_settings(period: timedelta = RETAIN) -> VaultSettings:
    return VaultSettings(withdrawal_retention=RetentionRule(period, REASON))


@pytest.fixture
async def vault(
    store_url: str, retention_url: str, tmp_path: Path, r_clock: FrozenClock
) -> AsyncIterator[Vault]:
    async with open_vault(
        data_dir=tmp_path / "data",
        database_url=store_url,
        retention_url=retention_url,
        argon2=CHEAPEST,
        clock=r_clock,
        settings=vault_settings(),
    ) as opened:
        yield opened


def lifecycle(vault: Vault) -> Lifecycle:
    return vault.lifecycle(LifecyclePolicy())


async def sign_up(vault: Vault, n: int, mobile: str | None = "+82 10-1234-5678") -> str:
    return await vault.sign_up(
        NewMember(
            f"member{n:04d}",
            PASSWORD,
            f"Retained Name {n}",
            f"r{n}@example.com",
            "1990-01-01",
            mobile_phone=mobile,
            consents=[ConsentChoice(Purpose.INQUIRY, True)],
        )
    )


# --- the move ----------------------------------------------------------------------------


async def test_withdrawal_moves_what_the_member_entered_and_shreds_the_rest(
    vault: Vault, r_clock: FrozenClock
) -> None:
    member = await sign_up(vault, 1)
    await vault.record_access(member, "order.view", "192.0.2.7")
    r_clock.advance(DAY)
    await vault.authenticate("member0001", PASSWORD, "198.51.100.1")

    outcome = await vault.withdraw(member, PASSWORD)

    assert outcome.destroyed_at is None
    assert outcome.retained_until == r_clock.now() + RETAIN
    # Gone from the vault: no row, no key, a tombstone, one record saying until when.
    assert await vault.parts.store.get_member(member) is None
    assert await vault.parts.store.is_destroyed(member)
    (record,) = await vault.parts.store.list_destruction_records(member)
    assert record.reason == WITHDRAWAL
    assert record.retained_until == outcome.retained_until
    assert record.items["member_keys"] == 1
    assert record.items["access_log"] == 2
    # In the separated storage: ciphertexts only, without the password hash.
    retained = vault.parts.retained
    assert retained is not None
    copy = await retained.get_retained(member)
    assert copy is not None
    assert copy.confirmed
    assert set(copy.ciphertexts) == set(RETAINED_FIELDS)
    assert "password_hash" not in copy.ciphertexts
    assert len(copy.access_log) == 2
    assert copy.reason == REASON
    assert copy.destroy_after == outcome.retained_until
    for blob in copy.ciphertexts.values():
        assert b"Retained Name" not in blob
        assert b"example.com" not in blob


async def test_retained_data_is_unreachable_through_the_member_api(
    vault: Vault,
) -> None:
    member = await sign_up(vault, 1)
    await vault.withdraw(member, PASSWORD)

    for call in (
        vault.get_member(member, Purpose.MEMBER_REQUEST),
        vault.export_member(member),
        vault.list_access(member, 10, ""),
        vault.record_access(member, "x", "192.0.2.1"),
    ):
        with pytest.raises(NotFound):
            await call
    with pytest.raises(NotFound):
        await vault.withdraw(member, PASSWORD)
    # Nothing can find the copy by login ID or e-mail: the blind indexes are gone, so
    # both are free for a new sign-up.
    again = await sign_up(vault, 1)
    assert again != member


async def test_the_officer_discloses_with_a_basis_and_every_disclosure_is_recorded(
    vault: Vault, r_clock: FrozenClock
) -> None:
    member = await sign_up(vault, 1)
    await vault.record_access(member, "order.view", "192.0.2.7")
    await vault.consents.update(member, [ConsentChoice("INQUIRY", False)])
    await vault.consents.update(member, [ConsentChoice("INQUIRY", True)])
    await vault.withdraw(member, PASSWORD)
    # The consent history went with the member: nothing of it is left in the vault.
    assert await vault.parts.store.list_consent_events(member, 100) == []

    with pytest.raises(InvalidInput) as bad:
        await vault.retention.disclose(member, "officer", "  ")
    assert [v.field for v in bad.value.violations] == ["basis"]
    assert await vault.retention.events(member) == []  # nothing disclosed, nothing recorded

    document = await vault.retention.disclose(member, "officer", "court order 2026-117")
    assert document["member"] == {
        "login_id": "member0001",
        "name": "Retained Name 1",
        "email": "r1@example.com",
        "mobile_phone": "+821012345678",  # as the vault normalised it
    }
    assert [e["action"] for e in document["access_history"]] == ["order.view"]
    assert [e["ip"] for e in document["access_history"]] == ["192.0.2.7"]
    assert {c["purpose"]: c["granted"] for c in document["consents"]}["INQUIRY"] is True
    # The whole consent history was copied: sign-up's answers, then the two changes.
    inquiry = [e["granted"] for e in document["consent_history"] if e["purpose"] == "INQUIRY"]
    assert inquiry == [True, False, True]
    assert {e["recorded_by"] for e in document["consent_history"]} == {"member"}
    assert document["basis"] == "court order 2026-117"
    (event,) = await vault.retention.events(member)
    assert (event.actor, event.operation, event.basis) == (
        "officer",
        "disclose",
        "court order 2026-117",
    )
    with pytest.raises(NotFound):
        await vault.retention.disclose("00000000-0000-4000-8000-000000000000", "o", "b")


async def test_a_member_without_a_mobile_phone_is_disclosed_without_one(vault: Vault) -> None:
    member = await sign_up(vault, 1, mobile=None)
    await vault.withdraw(member, PASSWORD)
    document = await vault.retention.disclose(member, "officer", "request 9")
    assert document["member"]["mobile_phone"] is None


async def test_retention_zero_shreds_at_once_and_keeps_nothing(
    store_url: str, retention_url: str, tmp_path: Path, r_clock: FrozenClock
) -> None:
    async with open_vault(
        data_dir=tmp_path / "data",
        database_url=store_url,
        retention_url=retention_url,
        argon2=CHEAPEST,
        clock=r_clock,
        settings=vault_settings(timedelta(0)),
    ) as vault:
        member = await sign_up(vault, 1)
        outcome = await vault.withdraw(member, PASSWORD)
        assert outcome.destroyed_at == r_clock.now()
        assert outcome.retained_until is None
        assert vault.parts.retained is not None
        assert await vault.retention.list_retained() == []
        (record,) = await vault.parts.store.list_destruction_records(member)
        assert record.retained_until is None


# --- timed destruction -----------------------------------------------------------------


async def test_the_sidecar_destroys_the_copy_when_its_date_passes_once(
    vault: Vault, r_clock: FrozenClock
) -> None:
    member = await sign_up(vault, 1)
    other = await sign_up(vault, 2)
    await vault.withdraw(member, PASSWORD)
    r_clock.advance(DAY)
    await vault.withdraw(other, PASSWORD)
    lc = lifecycle(vault)

    r_clock.set(T + RETAIN - timedelta(microseconds=1))
    assert (await lc.run_round()).retained_destroyed == 0
    assert (await lc.run_round(dry_run=True)).retained_destroyed == 0
    r_clock.set(T + RETAIN)
    assert (await lc.run_round(dry_run=True)).retained_destroyed == 1
    assert len(await vault.retention.list_retained()) == 2  # a dry run changes nothing
    assert (await lc.run_round()).retained_destroyed == 1
    assert (await lc.run_round()).retained_destroyed == 0

    retained = vault.parts.retained
    assert retained is not None
    assert await retained.get_retained(member) is None
    assert [r.member_id for r in await vault.retention.list_retained()] == [other]
    reasons = [r.reason for r in await vault.parts.store.list_destruction_records(member)]
    assert reasons == [WITHDRAWAL, RETENTION_EXPIRED]
    expired = (await vault.parts.store.list_destruction_records(member))[-1]
    assert expired.items == {
        "retained_member": 1,
        "member_keys": 1,
        "consents": 3,
        "consent_history": 3,
        "access_log": 0,
        "disclosure_ledger": 0,
        "corrections": 0,
    }
    with pytest.raises(NotFound):
        await vault.retention.disclose(member, "officer", "too late")


async def test_an_early_destruction_needs_a_basis_and_is_recorded(
    vault: Vault,
) -> None:
    member = await sign_up(vault, 1)
    await vault.withdraw(member, PASSWORD)
    with pytest.raises(InvalidInput):
        await vault.retention.destroy(member, "officer", "")
    record = await vault.retention.destroy(member, "officer", "dispute closed, ref 88")
    assert record.reason == "retention_destroyed_early"
    assert await vault.retention.list_retained() == []
    assert [e.operation for e in await vault.retention.events(member)] == ["destroy_early"]
    with pytest.raises(NotFound):
        await vault.retention.destroy(member, "officer", "again")
    # The sidecar finds nothing left to do, and writes no second record.
    assert (await lifecycle(vault).run_round()).retained_destroyed == 0
    reasons = [r.reason for r in await vault.parts.store.list_destruction_records(member)]
    assert reasons == [WITHDRAWAL, "retention_destroyed_early"]


async def test_retained_access_log_entries_still_go_after_six_months(
    vault: Vault, r_clock: FrozenClock, store_url: str, retention_url: str, tmp_path: Path
) -> None:
    member = await sign_up(vault, 1)
    await vault.record_access(member, "old", "192.0.2.1")
    r_clock.advance(20 * DAY)
    await vault.record_access(member, "newer", "192.0.2.2")
    await vault.withdraw(member, PASSWORD)
    lc = vault.lifecycle(LifecyclePolicy(access_log_retention=10 * DAY))
    assert (await lc.run_round(dry_run=True)).access_log_purged == 1
    assert (await lc.run_round()).access_log_purged == 1
    document = await vault.retention.disclose(member, "officer", "request 1")
    assert [e["action"] for e in document["access_history"]] == ["newer"]


# --- crash recovery ----------------------------------------------------------------------


async def crashed_move(
    vault: Vault, attempt: str
) -> tuple[str, RetentionStore, MemberRow, RetainedMember]:
    """A member, and the move's first step for them (the copy, unconfirmed), after
    which the move "crashes": the member is untouched in the vault."""
    member = await sign_up(vault, 1)
    retained = vault.parts.retained
    assert retained is not None
    row = await vault.parts.store.get_member(member)
    assert row is not None
    now = vault.clock.now()
    copy = await vault.retention._copy(row, now, attempt)
    assert await retained.put_retained(copy, stale_before=now - CONFIRM_GRACE)
    return member, retained, row, copy


async def test_a_copy_left_by_a_crash_before_the_shred_is_deleted_and_the_member_kept(
    vault: Vault, r_clock: FrozenClock
) -> None:
    member, retained, _, _ = await crashed_move(vault, "crashed-attempt")

    # Within the grace period it may be a withdrawal in flight: left alone, and a new
    # withdrawal of the member is refused rather than race it.
    assert (await lifecycle(vault).run_round()).retained_destroyed == 0
    assert await retained.get_retained(member) is not None
    with pytest.raises(KeyChanged):
        await vault.withdraw(member, PASSWORD)

    r_clock.advance(CONFIRM_GRACE + timedelta(seconds=1))
    await lifecycle(vault).run_round()
    assert await retained.get_retained(member) is None
    assert await vault.parts.store.get_member(member) is not None
    # And the member can withdraw normally afterwards.
    outcome = await vault.withdraw(member, PASSWORD)
    assert outcome.retained_until is not None


async def test_a_stale_copy_is_replaced_by_a_later_withdrawal(
    vault: Vault, r_clock: FrozenClock
) -> None:
    member, retained, _, _ = await crashed_move(vault, "crashed-attempt")
    r_clock.advance(CONFIRM_GRACE + timedelta(seconds=1))

    await vault.withdraw(member, PASSWORD)
    fresh = await retained.get_retained(member)
    assert fresh is not None
    assert fresh.confirmed
    assert fresh.attempt != "crashed-attempt"


async def test_a_copy_left_by_a_crash_after_the_shred_is_confirmed_and_kept(
    vault: Vault, r_clock: FrozenClock
) -> None:
    member, retained, row, copy = await crashed_move(vault, "attempt-1")
    record = await vault.parts.store.shred_member(
        member,
        r_clock.now(),
        WITHDRAWAL,
        retention=RetentionCheck(
            row.key.dek_id,
            row.ciphertexts,
            frozenset(),
            copy.key.kek_version,
            copy.destroy_after,
            frozenset(e.event_id for e in copy.consent_history),
        ),
    )
    assert record is not None  # ... and the crash: never confirmed

    r_clock.advance(CONFIRM_GRACE + timedelta(seconds=1))
    await lifecycle(vault).run_round()
    kept = await retained.get_retained(member)
    assert kept is not None
    assert kept.confirmed
    document = await vault.retention.disclose(member, "officer", "request 2")
    assert document["member"]["login_id"] == "member0001"
    r_clock.set(copy.destroy_after)
    assert (await lifecycle(vault).run_round()).retained_destroyed == 1


async def test_the_shred_refuses_a_copy_that_is_no_longer_current(vault: Vault) -> None:
    member = await sign_up(vault, 1)
    row = await vault.parts.store.get_member(member)
    assert row is not None
    active = row.key.kek_version
    until = vault.clock.now() + RETAIN
    events = await vault.parts.store.list_consent_events(member, 100)
    assert events  # sign-up's answers are the first events
    good = RetentionCheck(
        row.key.dek_id,
        row.ciphertexts,
        frozenset(),
        active,
        until,
        frozenset(e.event_id for e in events),
    )
    stale_field = replace(good, ciphertexts={**row.ciphertexts, "name": b"\x00" * 40})
    for check in (
        stale_field,
        replace(good, dek_id=row.key.dek_id + 1),
        replace(good, access_entry_ids=frozenset({12345})),
        replace(good, kek_version=active + 1),
        replace(good, consent_event_ids=frozenset({12345})),
    ):
        with pytest.raises(KeyChanged):
            await vault.parts.store.shred_member(
                member, vault.clock.now(), WITHDRAWAL, retention=check
            )
        assert await vault.parts.store.get_member(member) is not None  # nothing changed
    await vault.consents.update(member, [ConsentChoice("STATISTICS", True)])
    with pytest.raises(KeyChanged):  # a consent answer was recorded since the copy
        await vault.parts.store.shred_member(member, vault.clock.now(), WITHDRAWAL, retention=good)
    events = await vault.parts.store.list_consent_events(member, 100)
    good = replace(good, consent_event_ids=frozenset(e.event_id for e in events))
    await vault.record_access(member, "order.new", "192.0.2.9")
    with pytest.raises(KeyChanged):  # an access-log entry arrived since the copy
        await vault.parts.store.shred_member(member, vault.clock.now(), WITHDRAWAL, retention=good)
    assert await vault.parts.store.list_destruction_records(member) == []


async def withdraw_with(
    vault: Vault, member: str, between: Callable[[], Awaitable[object]]
) -> None:
    """Withdraw, running ``between`` once, right after the copy is written and before
    the vault's shred: a deterministic interleaving of a concurrent write."""
    retained = vault.parts.retained
    assert retained is not None
    original_put = retained.put_retained
    done = False

    async def put_then(copy: RetainedMember, stale_before: datetime) -> bool:
        nonlocal done
        stored = await original_put(copy, stale_before)
        if not done:
            done = True
            await between()
        return stored

    retained.put_retained = put_then  # type: ignore[method-assign]
    try:
        await vault.withdraw(member, PASSWORD)
    finally:
        del retained.put_retained  # type: ignore[method-assign]
    assert done


async def test_a_correction_during_the_move_lands_in_the_copy(vault: Vault) -> None:
    """A write between the copy and the shred makes the shred refuse; the move reads
    again, so the copy holds the corrected name, never the stale one."""
    member = await sign_up(vault, 1)
    await withdraw_with(
        vault,
        member,
        lambda: vault.update_member(
            member, MemberChanges(frozenset({"name"}), name="Corrected Name")
        ),
    )
    document = await vault.retention.disclose(member, "officer", "request 3")
    assert document["member"]["name"] == "Corrected Name"


async def test_two_withdrawals_at_once_retain_one_copy(vault: Vault) -> None:
    member = await sign_up(vault, 1)
    results = await asyncio.gather(
        vault.withdraw(member, PASSWORD),
        vault.withdraw(member, PASSWORD),
        return_exceptions=True,
    )
    outcomes = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(outcomes) == 1
    assert all(isinstance(e, NotFound | KeyChanged) for e in errors)
    (summary,) = await vault.retention.list_retained()
    assert summary.confirmed
    records = await vault.parts.store.list_destruction_records(member)
    assert [r.reason for r in records] == [WITHDRAWAL]


# --- key management over the retention store -------------------------------------------------


async def test_rewrap_moves_retained_keys_and_the_guard_counts_them(vault: Vault) -> None:
    member = await sign_up(vault, 1)
    await vault.withdraw(member, PASSWORD)
    await vault.keys.rotate("security")
    status = await vault.keys.status()
    v1 = next(v for v in status.versions if v.version == 1)
    assert (v1.member_keys, v1.retained_keys) == (0, 1)

    # Move the vault's own keys only (a key admin that does not know the retention
    # store): version 1 then wraps nothing in the vault, but still the copy's DEK.
    provider = vault.parts.provider
    vault_only = KeyAdmin(
        vault.parts.store,
        provider,
        MemberKeys(vault.parts.store, provider, DekCache(10, 1.0)),
        vault.clock,
    )
    async for _ in vault_only.rewrap("security"):
        pass
    usage = {u.version: (u.member_keys, u.index_keys) for u in await vault.parts.store.kek_usage()}
    assert usage[1] == (0, 0)
    plan = await vault.keys.plan_destroy(1)
    assert not plan.allowed
    assert "1 retained member keys" in plan.reason
    with pytest.raises(PreconditionFailed, match="still wraps 1 retained member keys"):
        await vault.keys.destroy_version(1, "security")
    assert await vault.keys.maintain("sidecar", rotate_after=365 * DAY) == {
        "rotated": 0,
        "rewrapped": 1,  # the copy's DEK
        "destroyed": 1,
    }
    status = await vault.keys.status()
    assert {v.version: (v.state, v.retained_keys) for v in status.versions} == {
        1: ("destroyed", 0),
        2: ("active", 1),
    }
    # Still readable after the old version's material is gone.
    document = await vault.retention.disclose(member, "officer", "request 4")
    assert document["member"]["email"] == "r1@example.com"


async def test_a_withdrawal_during_a_rotation_never_keeps_a_copy_under_an_old_version(
    vault: Vault,
) -> None:
    """The copy's key must be under the version active when the shred commits; a
    rotation in between makes the move redo the copy under the new version."""
    member = await sign_up(vault, 1)
    await withdraw_with(vault, member, lambda: vault.keys.rotate("security"))
    retained = vault.parts.retained
    assert retained is not None
    copy = await retained.get_retained(member)
    assert copy is not None
    assert copy.key.kek_version == 2


# --- configuration and the officer's CLI --------------------------------------------------


def test_settings_refuse_a_shared_or_missing_retention_database(tmp_path: Path) -> None:
    pg = "postgresql://postgres@127.0.0.1/x"
    with pytest.raises(ValidationError, match="retention_database_url"):
        Settings(database_url=pg, withdrawal_retention_days=30)
    with pytest.raises(ValidationError, match="of its own"):
        Settings(database_url=pg, retention_database_url=pg)
    assert Settings(database_url=pg).withdrawal_retention_days == 0
    with pytest.raises(ValidationError, match="scheme"):
        Settings(database_url="mysql://user:secret-pw@h/db")
    embedded = Settings(data_dir=tmp_path, withdrawal_retention_days=30)
    assert embedded.vault_settings.withdrawal_retention == RetentionRule(
        30 * DAY, "information security (internal policy)"
    )


async def test_the_retention_store_refuses_the_vaults_own_database(
    store_url: str, tmp_path: Path
) -> None:
    async with open_vault(data_dir=tmp_path / "d", database_url=store_url, argon2=CHEAPEST):
        pass
    shared = await open_retention_store(store_url)
    try:
        with pytest.raises(ValueError, match="must not be the vault's database"):
            await shared.migrate()
    finally:
        await shared.close()


def test_a_bad_setting_between_settings_is_named_without_its_value(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "migrate"],
        env={
            **os.environ,
            "PRIVACY_VAULT_DATA_DIR": str(tmp_path),
            "PRIVACY_VAULT_DATABASE_URL": "mysql://user:secret-pw@h/db",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "unsupported database URL scheme 'mysql'" in result.stderr
    assert "secret-pw" not in result.stdout + result.stderr


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", "retention", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_the_officer_cli_lists_without_personal_data_and_discloses_on_a_basis(
    store_url: str, retention_url: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    async with open_vault(
        data_dir=data,
        database_url=store_url,
        retention_url=retention_url,
        argon2=CHEAPEST,
        settings=vault_settings(),
    ) as vault:
        member = await sign_up(vault, 1)
        await vault.withdraw(member, PASSWORD)
    env = {
        "PRIVACY_VAULT_DATA_DIR": str(data),
        "PRIVACY_VAULT_DATABASE_URL": store_url,
        "PRIVACY_VAULT_RETENTION_DATABASE_URL": retention_url,
        "PRIVACY_VAULT_WITHDRAWAL_RETENTION_DAYS": "30",
    }

    listed = await asyncio.to_thread(_cli, env, "list")
    assert listed.returncode == 0, listed.stderr
    (line,) = [json.loads(x) for x in listed.stdout.splitlines()]
    assert line["member_id"] == member
    assert line["reason"] == REASON
    assert "Retained Name" not in listed.stdout
    assert "example.com" not in listed.stdout

    missing = await asyncio.to_thread(_cli, env, "disclose", member)
    assert missing.returncode == 2  # --basis is required
    disclosed = await asyncio.to_thread(
        _cli, env, "disclose", member, "--basis", "warrant 42", "--actor", "dpo"
    )
    assert disclosed.returncode == 0, disclosed.stderr
    assert json.loads(disclosed.stdout)["member"]["name"] == "Retained Name 1"

    events = await asyncio.to_thread(_cli, env, "events", member)
    (event,) = [json.loads(x) for x in events.stdout.splitlines()]
    assert (event["actor"], event["operation"], event["basis"]) == ("dpo", "disclose", "warrant 42")

    unknown = await asyncio.to_thread(
        _cli, env, "destroy", "00000000-0000-4000-8000-000000000000", "--basis", "x"
    )
    assert unknown.returncode == 4
    destroyed = await asyncio.to_thread(_cli, env, "destroy", member, "--basis", "case closed")
    assert destroyed.returncode == 0, destroyed.stderr
    assert json.loads(destroyed.stdout)["member_id"] == member


# --- over gRPC ------------------------------------------------------------------------------


async def test_withdraw_over_grpc_says_until_when_and_the_member_is_gone(
    server_settings: Settings, retention_url: str, r_clock: FrozenClock
) -> None:
    settings = Settings(
        **server_settings.model_dump()
        | {
            "retention_database_url": retention_url,
            "withdrawal_retention_days": 30,
            "withdrawal_retention_reason": REASON,
            "admin_token": ADMIN_TOKEN,
        }
    )
    async with (
        run_server(settings, clock=r_clock) as running,
        grpc.aio.insecure_channel(running.target) as channel,
    ):
        stub = member_pb2_grpc.MemberServiceStub(channel)
        signed = await stub.SignUp(
            pb.SignUpRequest(
                login_id="grpc0001",
                password=PASSWORD,
                name="Grpc Name",
                email="g@example.com",
                birth_date="1990-01-01",
            )
        )
        auth = await stub.Authenticate(
            pb.AuthenticateRequest(login_id="grpc0001", password=PASSWORD),
            metadata=(("x-client-ip", "192.0.2.1"),),
        )
        session = (("x-member-session", auth.session_token),)
        reply = await stub.Withdraw(
            pb.WithdrawRequest(member_id=signed.member_id, password=PASSWORD), metadata=session
        )
        assert reply.WhichOneof("outcome") == "retained_until"
        assert reply.retained_until.ToDatetime(UTC) == r_clock.now() + RETAIN
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await stub.GetMember(
                pb.GetMemberRequest(member_id=signed.member_id, purpose=pb.PURPOSE_IDENTIFICATION)
            )
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as ended:  # the sessions went with the member
            await stub.GetMember(
                pb.GetMemberRequest(member_id=signed.member_id, purpose=pb.PURPOSE_MEMBER_REQUEST),
                metadata=session,
            )
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as login:
            await stub.Authenticate(
                pb.AuthenticateRequest(login_id="grpc0001", password=PASSWORD),
                metadata=(("x-client-ip", "192.0.2.1"),),
            )
        assert login.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # The security team sees the retained key, and a re-wrap moves it.
        keys = KeyAdminServiceStub(channel)
        admin = (("authorization", f"Bearer {ADMIN_TOKEN}"), ("x-actor", "sec"))
        status = await keys.GetKeyStatus(kpb.GetKeyStatusRequest(), metadata=admin)
        assert [(v.version, v.retained_member_keys) for v in status.versions] == [(1, 1)]
        await keys.RotateKek(kpb.RotateKekRequest(), metadata=admin)
        progress = [
            p async for p in keys.RewrapMemberKeys(kpb.RewrapMemberKeysRequest(), metadata=admin)
        ]
        assert progress[-1].progress.done
        assert progress[-1].progress.rewrapped == 2  # the index key and the retained DEK
        status = await keys.GetKeyStatus(kpb.GetKeyStatusRequest(), metadata=admin)
        assert [(v.version, v.retained_member_keys) for v in status.versions] == [(1, 0), (2, 1)]


async def test_the_sidecar_round_destroys_due_copies_and_dry_runs_count_them(
    vault: Vault, r_clock: FrozenClock
) -> None:
    member = await sign_up(vault, 1)
    await vault.withdraw(member, PASSWORD)
    sidecar = Sidecar(lifecycle(vault), vault.leases, r_clock, interval=60, holder="h:1:x")
    r_clock.set(T + RETAIN)
    dry = await sidecar.run_round(dry_run=True)
    assert dry is not None
    assert dry.retained_destroyed == 1
    assert len(await vault.retention.list_retained()) == 1
    report = await sidecar.run_round()
    assert report is not None
    assert report.retained_destroyed == 1
    assert await vault.retention.list_retained() == []
    await sidecar.release()


async def test_a_crash_between_the_record_and_the_deletion_leaves_one_record(
    vault: Vault, r_clock: FrozenClock
) -> None:
    member = await sign_up(vault, 1)
    await vault.withdraw(member, PASSWORD)
    r_clock.set(T + RETAIN)
    # The destruction's first step (the vault's record), then the crash.
    written = await vault.parts.store.record_destruction(
        DestructionRecord(member, r_clock.now(), RETENTION_EXPIRED, {"retained_member": 1})
    )
    assert written
    assert (await lifecycle(vault).run_round()).retained_destroyed == 1
    retained = vault.parts.retained
    assert retained is not None
    assert await retained.get_retained(member) is None
    reasons = [r.reason for r in await vault.parts.store.list_destruction_records(member)]
    assert reasons == [WITHDRAWAL, RETENTION_EXPIRED]


async def test_two_sidecars_destroying_at_once_destroy_each_copy_once(
    vault: Vault, r_clock: FrozenClock
) -> None:
    withdrawn = [await sign_up(vault, n) for n in range(1, 6)]
    for member in withdrawn:
        await vault.withdraw(member, PASSWORD)
    r_clock.set(T + RETAIN)
    counts = await asyncio.gather(
        lifecycle(vault).destroy_retained(), lifecycle(vault).destroy_retained()
    )
    assert sum(counts) == len(withdrawn)
    assert await vault.retention.list_retained() == []
    for member in withdrawn:
        reasons = [r.reason for r in await vault.parts.store.list_destruction_records(member)]
        assert reasons == [WITHDRAWAL, RETENTION_EXPIRED]


async def test_the_officer_ending_a_copy_the_sidecar_recorded_writes_no_second_record(
    vault: Vault, r_clock: FrozenClock
) -> None:
    member = await sign_up(vault, 1)
    await vault.withdraw(member, PASSWORD)
    r_clock.set(T + RETAIN)
    # The sidecar's record, then a crash before it deleted the copy.
    await vault.parts.store.record_destruction(
        DestructionRecord(member, r_clock.now(), RETENTION_EXPIRED, {"retained_member": 1})
    )
    await vault.retention.destroy(member, "officer", "case closed")
    assert await vault.retention.list_retained() == []
    reasons = [r.reason for r in await vault.parts.store.list_destruction_records(member)]
    assert reasons == [WITHDRAWAL, RETENTION_EXPIRED]
