"""The lifecycle sidecar against real databases (both backends), on an injected
FrozenClock: inactivity notices, expiry, access-log purge, leases, crash safety,
dry runs, the in-process sidecar of ``serve`` and the ``sidecar`` CLI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from process_support import cli_env, run_cli

from service.config import Settings
from service.server import run_server
from service.sidecar import LEASE_NAME, Sidecar
from service.wiring import build_sidecar
from vault import CHEAPEST, FrozenClock, Purpose, SystemClock, Vault, open_vault
from vault.facade import NewMember
from vault.lifecycle import NOTICE_ITEMS, BatchHook, Lifecycle, LifecyclePolicy
from vault.store import open_store

T = datetime(2026, 1, 1, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)
PASSWORD = "a long passphrase"


class Boom(Exception):
    """Stands in for a crash part-way through a sweep."""


@pytest.fixture
def lc_clock() -> FrozenClock:
    return FrozenClock(T)


@pytest.fixture
async def vault(store_url: str, tmp_path: Path, lc_clock: FrozenClock) -> AsyncIterator[Vault]:
    async with open_vault(
        data_dir=tmp_path / "data", database_url=store_url, argon2=CHEAPEST, clock=lc_clock
    ) as opened:
        yield opened


def lifecycle(
    vault: Vault, policy: LifecyclePolicy | None = None, on_batch: BatchHook | None = None
) -> Lifecycle:
    return vault.lifecycle(policy, on_batch=on_batch)


async def sign_up(vault: Vault, n: int) -> str:
    return await vault.sign_up(
        NewMember(f"member{n:04d}", PASSWORD, f"Name {n}", f"m{n}@example.com", "1990-01-01")
    )


async def outbox(vault: Vault) -> list[tuple[str, str, dict[str, str]]]:
    far = vault.clock.now() + 10_000 * DAY
    return [
        (m.member_id, m.kind, dict(m.params))
        for m in await vault.parts.store.due_outbox(far, 10_000)
    ]


# --- inactivity -------------------------------------------------------------------------


async def test_one_notice_at_335_days_and_none_on_a_rerun(
    vault: Vault, lc_clock: FrozenClock
) -> None:
    member = await sign_up(vault, 1)
    lc = lifecycle(vault)
    lc_clock.advance(335 * DAY - timedelta(seconds=1))
    assert await lc.send_inactivity_notices() == 0
    lc_clock.advance(timedelta(seconds=1))

    assert await lc.send_inactivity_notices() == 1
    assert await lc.send_inactivity_notices() == 0
    assert await outbox(vault) == [
        (
            member,
            "inactivity_notice",
            {"destroy_at": (T + 365 * DAY).isoformat(), "items": NOTICE_ITEMS},
        )
    ]
    lc_clock.advance(10 * DAY)
    assert await lc.send_inactivity_notices() == 0
    assert len(await outbox(vault)) == 1


async def test_a_login_after_the_notice_cancels_the_destruction(
    vault: Vault, lc_clock: FrozenClock
) -> None:
    member = await sign_up(vault, 1)
    lc = lifecycle(vault)
    lc_clock.advance(335 * DAY)
    assert await lc.send_inactivity_notices() == 1
    lc_clock.advance(5 * DAY)
    assert (await vault.authenticate("member0001", PASSWORD, "192.0.2.1")).member_id == member
    login_at = lc_clock.now()

    lc_clock.set(T + 365 * DAY)
    assert await lc.expire_inactive() == 0
    lc_clock.set(T + 400 * DAY)
    assert await lc.run_round() is not None
    assert await vault.parts.store.get_member(member) is not None
    assert await vault.parts.store.list_destruction_records() == []

    # Later inactivity starts over, from the login.
    lc_clock.set(login_at + 335 * DAY)
    assert await lc.send_inactivity_notices() == 1
    notices = [params for _, _, params in await outbox(vault)]
    assert notices[-1]["destroy_at"] == (login_at + 365 * DAY).isoformat()
    lc_clock.set(login_at + 365 * DAY - timedelta(seconds=1))
    assert await lc.expire_inactive() == 0
    lc_clock.set(login_at + 365 * DAY)
    assert await lc.expire_inactive() == 1
    assert await vault.parts.store.is_destroyed(member)


async def test_inactive_a_year_with_a_notice_is_shredded(
    vault: Vault, lc_clock: FrozenClock
) -> None:
    member = await sign_up(vault, 1)
    lc = lifecycle(vault)
    lc_clock.advance(335 * DAY)
    assert await lc.send_inactivity_notices() == 1
    bystander = await sign_up(vault, 2)  # signed up later: not due

    lc_clock.set(T + 365 * DAY - timedelta(microseconds=1))
    assert await lc.expire_inactive() == 0
    lc_clock.set(T + 365 * DAY)
    assert await lc.expire_inactive() == 1
    assert await lc.expire_inactive() == 0

    (record,) = await vault.parts.store.list_destruction_records()
    assert record.member_id == member
    assert record.reason == "inactivity"
    assert record.destroyed_at == T + 365 * DAY
    assert record.items["member"] == 1
    assert record.items["outbox"] == 1  # the unsent notice went with the member
    assert await vault.parts.store.get_member(member) is None
    assert await vault.parts.store.get_member(bystander) is not None


async def test_a_late_notice_postpones_the_destruction(vault: Vault, lc_clock: FrozenClock) -> None:
    member = await sign_up(vault, 1)
    lc = lifecycle(vault)
    # The service was down: the first sweep comes at 360 days.
    lc_clock.advance(360 * DAY)
    assert await lc.send_inactivity_notices() == 1
    noticed = lc_clock.now()
    ((_, _, params),) = await outbox(vault)
    assert params["destroy_at"] == (noticed + 30 * DAY).isoformat()

    lc_clock.set(T + 365 * DAY)
    assert await lc.expire_inactive() == 0
    lc_clock.set(noticed + 30 * DAY - timedelta(seconds=1))
    assert await lc.expire_inactive() == 0
    lc_clock.set(noticed + 30 * DAY)
    assert await lc.expire_inactive() == 1
    assert await vault.parts.store.is_destroyed(member)


# --- access-log retention ------------------------------------------------------------------


async def test_access_logs_older_than_six_months_are_purged(
    vault: Vault, lc_clock: FrozenClock
) -> None:
    member = await sign_up(vault, 1)
    for days in (0, 10, 100, 190, 199):
        lc_clock.set(T + days * DAY)
        await vault.record_access(member, "read", "192.0.2.7")
    lc_clock.set(T + 200 * DAY)
    lc = lifecycle(vault, LifecyclePolicy(batch_size=1))

    assert await lc.purge_access_logs() == 2  # days 0 and 10: older than 183 days
    assert await lc.purge_access_logs() == 0
    kept = await vault.parts.store.list_access(member, 100)
    assert sorted(e.at for e in kept) == [T + 100 * DAY, T + 190 * DAY, T + 199 * DAY]


# --- concurrency and crashes ----------------------------------------------------------------


@pytest.fixture
async def second_vault(
    vault: Vault, store_url: str, tmp_path: Path, lc_clock: FrozenClock
) -> AsyncIterator[Vault]:
    """Another process's vault on the same database and key file."""
    async with open_vault(
        data_dir=tmp_path / "data", database_url=store_url, argon2=CHEAPEST, clock=lc_clock
    ) as opened:
        yield opened


async def test_two_sidecars_act_exactly_once(
    vault: Vault, second_vault: Vault, lc_clock: FrozenClock
) -> None:
    members = [await sign_up(vault, n) for n in range(6)]
    sidecars = [
        Sidecar(lifecycle(v), v.leases, lc_clock, interval=60, holder=f"host:{n}:x")
        for n, v in enumerate((vault, second_vault))
    ]
    lc_clock.advance(335 * DAY)
    reports = await asyncio.gather(*(s.run_round() for s in sidecars))
    assert sum(r.notices for r in reports if r is not None) == 6
    assert sorted(m for m, _, _ in await outbox(vault)) == sorted(members)

    lc_clock.advance(30 * DAY)
    reports = await asyncio.gather(*(s.run_round() for s in sidecars))
    assert sum(r.shredded for r in reports if r is not None) == 6
    records = await vault.parts.store.list_destruction_records()
    assert sorted(r.member_id for r in records) == sorted(members)


async def test_two_lifecycles_without_a_lease_still_act_once(
    vault: Vault, second_vault: Vault, lc_clock: FrozenClock
) -> None:
    """The conditional writes alone keep the steps exactly-once (the lease only
    saves the duplicated work)."""
    members = [await sign_up(vault, n) for n in range(6)]
    policy = LifecyclePolicy(batch_size=2)
    both = [lifecycle(vault, policy), lifecycle(second_vault, policy)]
    lc_clock.advance(335 * DAY)
    sent = await asyncio.gather(*(lc.send_inactivity_notices() for lc in both))
    assert sum(sent) == 6
    assert sorted(m for m, _, _ in await outbox(vault)) == sorted(members)
    lc_clock.advance(30 * DAY)
    shredded = await asyncio.gather(*(lc.expire_inactive() for lc in both))
    assert sum(shredded) == 6
    assert len(await vault.parts.store.list_destruction_records()) == 6


async def test_a_sweep_killed_part_way_misses_and_repeats_nothing(
    vault: Vault, lc_clock: FrozenClock
) -> None:
    members = [await sign_up(vault, n) for n in range(5)]

    async def crash(step: str, count: int) -> None:
        raise Boom(step)

    policy = LifecyclePolicy(batch_size=2)
    crashing = lifecycle(vault, policy, on_batch=crash)
    steady = lifecycle(vault, policy)

    lc_clock.advance(335 * DAY)
    with pytest.raises(Boom):
        await crashing.send_inactivity_notices()
    assert len(await outbox(vault)) == 2
    assert await steady.send_inactivity_notices() == 3
    assert sorted(m for m, _, _ in await outbox(vault)) == sorted(members)

    lc_clock.advance(30 * DAY)
    with pytest.raises(Boom):
        await crashing.expire_inactive()
    assert len(await vault.parts.store.list_destruction_records()) == 2
    assert await steady.expire_inactive() == 3
    records = await vault.parts.store.list_destruction_records()
    assert sorted(r.member_id for r in records) == sorted(members)


async def test_a_cancelled_purge_resumes(vault: Vault, lc_clock: FrozenClock) -> None:
    member = await sign_up(vault, 1)
    for n in range(5):
        lc_clock.set(T + n * timedelta(minutes=1))
        await vault.record_access(member, "read", "192.0.2.7")
    lc_clock.set(T + 200 * DAY)
    first_batch = asyncio.Event()

    async def stall(step: str, count: int) -> None:
        first_batch.set()
        await asyncio.Event().wait()  # hangs until cancelled: a kill mid-sweep

    sweep = asyncio.create_task(
        lifecycle(vault, LifecyclePolicy(batch_size=2), on_batch=stall).purge_access_logs()
    )
    await first_batch.wait()
    sweep.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sweep
    assert await vault.parts.store.count_access_log_before(T + DAY) == 3
    assert await lifecycle(vault, LifecyclePolicy(batch_size=2)).purge_access_logs() == 3
    assert await vault.parts.store.count_access_log_before(T + DAY) == 0


# --- dry run -------------------------------------------------------------------------------------


async def test_dry_run_counts_and_changes_nothing(vault: Vault, lc_clock: FrozenClock) -> None:
    doomed = await sign_up(vault, 1)
    await vault.record_access(doomed, "read", "192.0.2.7")  # 1 old entry
    lc = lifecycle(vault)
    lc_clock.advance(335 * DAY)
    assert await lc.send_inactivity_notices() == 1
    lc_clock.advance(5 * DAY)
    for n in (2, 3):
        await vault.record_access(await sign_up(vault, n), "read", "192.0.2.8")
    lc_clock.advance(335 * DAY)  # doomed: 675 days; 2 and 3: 335 days

    before = (
        await outbox(vault),
        await vault.parts.store.list_destruction_records(),
        await vault.parts.store.count_access_log_before(lc_clock.now()),
    )
    report = await lc.run_round(dry_run=True)
    assert report.as_dict() == {
        "notices": 2,
        "policy_notices": 0,
        "correction_notices": 0,
        "shredded": 1,
        "access_log_purged": 3,
        "retained_destroyed": 0,
        "counters_purged": 0,
        "kek_rotated": 0,
        "kek_versions_destroyed": 0,
        "mail_sent": 0,
        "mail_dropped": 0,
        "mail_retried": 0,
        "mail_failed": 0,
        "dry_run": True,
    }
    after = (
        await outbox(vault),
        await vault.parts.store.list_destruction_records(),
        await vault.parts.store.count_access_log_before(lc_clock.now()),
    )
    assert after == before
    assert await vault.parts.store.get_member(doomed) is not None

    real = await lc.run_round()
    assert (real.notices, real.shredded) == (2, 1)
    # The doomed member's old entry went with the shred, not the purge.
    assert real.access_log_purged == 2


# --- the sidecar loop, in-process and as a CLI ------------------------------------------------


async def test_the_loop_holds_the_lease_and_releases_it_on_stop(
    vault: Vault, lc_clock: FrozenClock
) -> None:
    sidecar = Sidecar(lifecycle(vault), vault.leases, lc_clock, interval=0.01, holder="a:1:x")
    stop = asyncio.Event()
    task = asyncio.create_task(sidecar.run(stop))
    await _until(lambda: _lease_taken(vault, lc_clock))
    stop.set()
    await asyncio.wait_for(task, 10)
    assert await vault.leases.acquire_lease(LEASE_NAME, "b:2:y", lc_clock.now(), DAY)


async def test_embedded_serve_runs_the_sidecar(
    server_settings: Settings, store_url: str, lc_clock: FrozenClock
) -> None:
    # conftest's test servers run without it; this one has the embedded default.
    embedded = server_settings.model_copy(update={"sidecar_in_process": None})
    assert embedded.sidecar_in_process_enabled
    async with run_server(embedded, clock=lc_clock) as running:
        await _until(lambda: _lease_taken(running.vault, lc_clock))
    # Stopped with the server, and the lease released.
    store = await open_store(store_url)
    try:
        assert await store.acquire_lease(LEASE_NAME, "b:2:y", lc_clock.now(), DAY)
    finally:
        await store.close()


def test_production_serve_does_not_run_the_sidecar() -> None:
    # What production needs to start (paths, not read by Settings).
    needs = {
        "tls_cert_file": Path("server.pem"),
        "tls_key_file": Path("server-key.pem"),
        "tls_client_ca_file": Path("ca.pem"),
        "caller_policy_file": Path("callers.toml"),
    }
    assert not Settings(environment="production", **needs).sidecar_in_process_enabled
    assert Settings(
        environment="production", sidecar_in_process=True, **needs
    ).sidecar_in_process_enabled


async def _lease_taken(vault: Vault, clock: FrozenClock) -> bool:
    """Whether a live lease exists. The probe asks as of two days ago for one day, so
    where no lease is held it leaves only an expired row: it never blocks the sidecar."""
    past = clock.now() - 2 * DAY
    return not await vault.leases.acquire_lease(LEASE_NAME, "probe:0:0", past, DAY)


async def _until(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_cli_dry_run_prints_counts_as_json_lines(tmp_path: Path) -> None:
    data = tmp_path / "data"
    long_ago = FrozenClock(SystemClock().now() - 400 * DAY)
    async with open_vault(data_dir=data, argon2=CHEAPEST, clock=long_ago) as vault:
        member = await sign_up(vault, 1)
        await vault.record_access(member, "read", "192.0.2.7")
        before = await outbox(vault)
    # A configured retention database that does not exist yet is not created.
    missing = tmp_path / "elsewhere" / "retention.db"
    env = cli_env(data, retention_database_url=f"sqlite:///{missing}")
    result = run_cli(["sidecar", "--once", "--dry-run"], env, tmp_path)  # a short CLI run
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert {line["step"]: line["count"] for line in lines} == {
        "shredded": 0,
        "inactivity_notices": 1,
        "policy_notices": 0,
        "correction_notices": 0,
        "retained_destroyed": 0,
        "access_log_purged": 1,
        "counters_purged": 0,
    }
    assert all(line["dry_run"] is True for line in lines)
    assert "member0001" not in result.stdout + result.stderr
    assert not missing.exists()
    assert not missing.parent.exists()
    async with open_vault(data_dir=data, argon2=CHEAPEST, clock=long_ago) as vault:
        assert await outbox(vault) == before  # nothing was sent


async def test_the_sidecar_bounds_the_shredding_horizon_when_asked(
    vault: Vault, lc_clock: FrozenClock, tmp_path: Path
) -> None:
    """With key maintenance on, a round rotates the KEK once the active version is
    KEK_ROTATION_DAYS old, re-wraps every key and destroys the unused old version;
    the members still read. Off (the default), a round touches no key."""
    member_id = await sign_up(vault, 1)
    settings = Settings(data_dir=tmp_path / "mail", kek_rotation_days=90)
    off = build_sidecar(vault, settings, interval=60)
    lc_clock.advance(91 * DAY)
    report = await off.run_round()
    assert report is not None
    assert report.kek_rotated == 0
    await off.release()
    assert [v.state for v in (await vault.keys.status()).versions] == ["active"]

    on = build_sidecar(vault, settings.model_copy(update={"sidecar_key_maintenance": True}))
    report = await on.run_round()
    assert report is not None
    assert (report.kek_rotated, report.kek_versions_destroyed) == (1, 1)
    status = await vault.keys.status()
    assert [(v.version, v.state, v.member_keys) for v in status.versions] == [
        (1, "destroyed", 0),
        (2, "active", 1),
    ]
    assert (await vault.get_member(member_id, Purpose.MEMBER_REQUEST)).member_id == member_id
    lc_clock.advance(30 * DAY)  # not due again yet
    report = await on.run_round()
    assert report is not None
    assert report.kek_rotated == 0
    await on.release()
