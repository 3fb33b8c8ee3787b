"""PostgreSQL only: the access log partitioned by month, partition maintenance, and
the retention purge that drops whole months (migration 0006)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from store_support import entry, new_member, with_active_kek

from vault.clock import FrozenClock
from vault.lifecycle import Lifecycle, LifecyclePolicy
from vault.store import AccessEntryRow, MemberRow
from vault.store._migrations import load_migrations
from vault.store.postgres import PostgresStore
from vault.store.postgres._db import _CREATE_SCHEMA_MIGRATIONS

pytestmark = pytest.mark.postgres

PARTITIONED_VERSION = 6


def month(year: int, month_: int, day: int = 1) -> datetime:
    return datetime(year, month_, day, 12, tzinfo=UTC)


@pytest.fixture
async def db_url(make_postgres_database: Callable[[], Awaitable[str]]) -> str:
    return await make_postgres_database()


@pytest.fixture
async def pg(db_url: str) -> AsyncIterator[PostgresStore]:
    store = await PostgresStore.open(db_url)
    try:
        await store.migrate()
        await with_active_kek(store)
        yield store
    finally:
        await store.close()


@pytest.fixture
async def sql(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A raw connection to look at the catalog behind the store's back."""
    conn = await asyncpg.connect(db_url)
    try:
        yield conn
    finally:
        await conn.close()


async def partitions(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'access_log'::regclass"
    )
    return {str(r["relname"]) for r in rows}


async def month_tables(conn: asyncpg.Connection) -> set[str]:
    """Every access_log_yYYYYmMM table, attached or not."""
    rows = await conn.fetch(
        "SELECT relname FROM pg_class WHERE relkind = 'r' AND relname ~ '^access_log_y'"
    )
    return {str(r["relname"]) for r in rows}


async def home(conn: asyncpg.Connection, entry_id: int) -> str:
    """The partition an entry is stored in."""
    return str(
        await conn.fetchval(
            "SELECT tableoid::regclass::text FROM access_log WHERE entry_id = $1", entry_id
        )
    )


def name(at: datetime) -> str:
    return f"access_log_y{at.year:04d}m{at.month:02d}"


async def add_member(store: PostgresStore) -> MemberRow:
    member = new_member()
    await store.insert_member(member)
    return member


async def append(store: PostgresStore, member: MemberRow, at: datetime, n: int = 0) -> None:
    assert await store.append_access(member.member_id, entry(at, n), dek_id=1)


async def append_before_0011(
    sql: asyncpg.Connection, member: MemberRow, at: datetime, n: int
) -> None:
    """An entry as the store wrote it before 0011 (no caller): today's store needs 0011."""
    e = entry(at, n)
    await sql.execute(
        "INSERT INTO access_log (member_id, at, action_ct, ip_ct) VALUES ($1, $2, $3, $4)",
        uuid.UUID(member.member_id),
        e.at,
        e.action_ct,
        e.ip_ct,
    )


async def list_before_0011(sql: asyncpg.Connection, member: MemberRow) -> list[AccessEntryRow]:
    rows = await sql.fetch(
        "SELECT entry_id, at, action_ct, ip_ct FROM access_log WHERE member_id = $1 "
        "ORDER BY at DESC, entry_id DESC",
        uuid.UUID(member.member_id),
    )
    return [AccessEntryRow(r[0], r[1], bytes(r[2]), bytes(r[3])) for r in rows]


# 2025-01 .. 2025-08 with partitions (3 entries each), plus one 2024-06 entry that
# has no partition (the default takes it). Cutoff 2025-05-15: January to April are
# dropped whole (12 entries); May 1 and 10 and the 2024 entry go in batches.
CUTOFF = datetime(2025, 5, 15, tzinfo=UTC)
DAYS = (1, 10, 20)


async def eight_months(store: PostgresStore) -> MemberRow:
    for first in (month(2025, 1), month(2025, 4), month(2025, 7)):
        await store.ensure_access_log_partitions(first)
    member = await add_member(store)
    n = 0
    for m in range(1, 9):
        for day in DAYS:
            await append(store, member, month(2025, m, day), n)
            n += 1
    await append(store, member, month(2024, 6), n)
    return member


# --- schema -----------------------------------------------------------------------


async def test_migrate_partitions_by_month_with_a_default(
    pg: PostgresStore, sql: asyncpg.Connection
) -> None:
    strategy = await sql.fetchval(
        "SELECT partstrat::text FROM pg_partitioned_table WHERE partrelid = 'access_log'::regclass"
    )
    assert strategy == "r"
    now = await sql.fetchval("SELECT now()")
    this_month = datetime(now.year, now.month, 1, tzinfo=UTC)
    expected = {
        name(this_month),
        name((this_month + timedelta(days=40)).replace(day=1)),
        name((this_month + timedelta(days=70)).replace(day=1)),
        "access_log_default",
    }
    assert await partitions(sql) == expected
    # Nothing to do right after the migration.
    assert await pg.ensure_access_log_partitions() == []
    # The key the code relies on: (entry_id, at), and the listing index.
    key = await sql.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'access_log_pkey'"
    )
    assert key == "PRIMARY KEY (entry_id, at)"
    indexes = {
        str(r["indexname"])
        for r in await sql.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'access_log'")
    }
    assert {"access_log_member_at_idx", "access_log_at_idx"} <= indexes


async def test_entries_go_to_their_month_or_the_default(
    pg: PostgresStore, sql: asyncpg.Connection
) -> None:
    member = await eight_months(pg)
    rows = await pg.list_access(member.member_id, 100)
    assert len(rows) == 8 * 3 + 1
    # Newest first, across partitions.
    assert [r.at for r in rows] == sorted((r.at for r in rows), reverse=True)
    assert await home(sql, rows[0].entry_id) == name(month(2025, 8))
    assert await home(sql, rows[-1].entry_id) == "access_log_default"
    # Paging with a cursor crosses partition boundaries.
    first = await pg.list_access(member.member_id, 5)
    rest = await pg.list_access(member.member_id, 100, (first[-1].at, first[-1].entry_id))
    assert first + rest == rows


# --- purge ------------------------------------------------------------------------


async def test_purge_drops_old_months_and_batches_the_boundary(
    pg: PostgresStore, sql: asyncpg.Connection
) -> None:
    member = await eight_months(pg)
    before = await pg.list_access(member.member_id, 100)
    assert await pg.count_access_log_before(CUTOFF) == 4 * 3 + 2 + 1

    # First call: four whole months (12) plus a batch of 2 (the two oldest left:
    # the 2024 entry in the default partition, then May 1).
    assert await pg.purge_access_log(CUTOFF, 2) == 12 + 2
    tables = await month_tables(sql)
    for m in range(1, 5):
        assert name(month(2025, m)) not in tables
    for m in range(5, 10):
        assert name(month(2025, m)) in tables
    assert await pg.count_access_log_before(CUTOFF) == 1
    # Then the rest of the boundary month, a short batch, and nothing.
    assert await pg.purge_access_log(CUTOFF, 2) == 1
    assert await pg.purge_access_log(CUTOFF, 2) == 0
    assert await pg.count_access_log_before(CUTOFF) == 0

    left = await pg.list_access(member.member_id, 100)
    assert left == [r for r in before if r.at >= CUTOFF]
    assert len(left) == 1 + 3 * 3  # May 20, June to August


async def test_lifecycle_loop_counts_dropped_and_batched_entries(pg: PostgresStore) -> None:
    member = await eight_months(pg)
    batches: list[int] = []

    async def on_batch(step: str, count: int) -> None:
        batches.append(count)

    async def no_shred(member_id: str, reason: str, **_: object) -> None:
        raise AssertionError("not expected")

    lifecycle = Lifecycle(
        pg,
        no_shred,
        FrozenClock(CUTOFF + timedelta(days=10)),
        LifecyclePolicy(access_log_retention=timedelta(days=10), batch_size=2),
        on_batch=on_batch,
    )
    assert await lifecycle.purge_access_logs(dry_run=True) == 15
    assert await lifecycle.purge_access_logs() == 15
    # The drop's large count does not end the loop early; the short batch ends it.
    assert batches == [14, 1]
    assert len(await pg.list_access(member.member_id, 100)) == 10


async def test_purge_whole_default_and_partitions_with_a_large_limit(
    pg: PostgresStore,
) -> None:
    member = await eight_months(pg)
    cutoff = datetime(2025, 9, 1, tzinfo=UTC)
    assert await pg.purge_access_log(cutoff, 500) == 8 * 3 + 1
    assert await pg.list_access(member.member_id, 100) == []
    assert await pg.purge_access_log(cutoff, 500) == 0


async def test_purge_drops_a_month_table_left_detached(
    pg: PostgresStore, sql: asyncpg.Connection
) -> None:
    """A purge that stopped between detach and drop: the next one drops it."""
    await eight_months(pg)
    await sql.execute("ALTER TABLE access_log DETACH PARTITION access_log_y2025m01")
    assert await pg.purge_access_log(datetime(2024, 1, 1, tzinfo=UTC), 10) == 3
    assert name(month(2025, 1)) not in await month_tables(sql)


# --- maintenance ------------------------------------------------------------------


async def test_new_partition_takes_its_rows_from_the_default(
    pg: PostgresStore, sql: asyncpg.Connection
) -> None:
    member = await add_member(pg)
    await append(pg, member, month(2023, 3, 5), 1)
    await append(pg, member, month(2023, 4, 5), 2)
    await append(pg, member, month(2023, 9, 5), 3)  # stays in the default
    rows = await pg.list_access(member.member_id, 10)
    assert {await home(sql, r.entry_id) for r in rows} == {"access_log_default"}

    created = await pg.ensure_access_log_partitions(month(2023, 3, 15))
    assert created == [name(month(2023, 3)), name(month(2023, 4)), name(month(2023, 5))]
    assert await pg.list_access(member.member_id, 10) == rows
    homes = [await home(sql, r.entry_id) for r in rows]
    assert homes == ["access_log_default", name(month(2023, 4)), name(month(2023, 3))]
    # The moved-to partition is a full one: new entries go there, the foreign key
    # still cascades, and a second call has nothing to do.
    await append(pg, member, month(2023, 3, 6), 4)
    assert await pg.ensure_access_log_partitions(month(2023, 3, 15)) == []
    fk = await sql.fetchval(
        "SELECT count(*) FROM pg_constraint WHERE conrelid = $1::regclass AND contype = 'f'",
        name(month(2023, 3)),
    )
    assert fk == 1
    await sql.execute("DELETE FROM members WHERE member_id = $1::uuid", member.member_id)
    assert await sql.fetchval("SELECT count(*) FROM access_log") == 0


async def test_key_replacement_updates_entries_across_partitions(
    pg: PostgresStore,
) -> None:
    await pg.ensure_access_log_partitions(month(2025, 1))
    member = await add_member(pg)
    for n, at in enumerate((month(2025, 1), month(2025, 2), month(2024, 6))):
        await append(pg, member, at, n)
    rows = await pg.list_access(member.member_id, 10)
    new_key = replace(member.key, dek_id=2)
    resealed = {r.entry_id: (b"a2-" + r.action_ct, b"i2-" + r.ip_ct) for r in rows}
    with_callers = {entry_id: (a, i, None) for entry_id, (a, i) in resealed.items()}
    assert await pg.replace_member_key(
        member.member_id,
        1,
        new_key,
        dict(member.ciphertexts),
        with_callers,
        old_ciphertexts=dict(member.ciphertexts),
    )
    after = await pg.list_access(member.member_id, 10)
    assert {r.entry_id: (r.action_ct, r.ip_ct) for r in after} == resealed


# --- migration ----------------------------------------------------------------------


async def test_migration_keeps_every_row_and_the_sequence(
    db_url: str, sql: asyncpg.Connection
) -> None:
    # The schema as it was before 0006 (whatever came before it).
    await sql.execute(_CREATE_SCHEMA_MIGRATIONS.format(table="schema_migrations"))
    for migration in load_migrations("postgres"):
        if migration.version < PARTITIONED_VERSION:
            await sql.execute(migration.sql)
            await sql.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
    store = await PostgresStore.open(db_url)
    try:
        await with_active_kek(store)
        member = await add_member(store)
        for n, at in enumerate(
            (month(2025, 1), month(2025, 1, 20), month(2025, 3), month(2025, 3, 2), month(2025, 4))
        ):
            await append_before_0011(sql, member, at, n)
        old = await list_before_0011(sql, member)
        # The newest entry goes: its id must still never come back.
        await sql.execute("DELETE FROM access_log WHERE entry_id = $1", old[0].entry_id)
        old = old[1:]
        assert await sql.fetchval(
            "SELECT NOT EXISTS (SELECT 1 FROM pg_partitioned_table "
            "WHERE partrelid = 'access_log'::regclass)"
        )

        # 0006, and whatever later migrations there are.
        assert await store.migrate() == [
            m.version for m in load_migrations("postgres") if m.version >= PARTITIONED_VERSION
        ]
        assert await store.list_access(member.member_id, 10) == old
        assert {await home(sql, r.entry_id) for r in old} == {
            name(month(2025, 1)),
            name(month(2025, 3)),
        }
        assert await sql.fetchval("SELECT to_regclass('access_log_pre0006')") is None
        await append(store, member, month(2025, 3, 3), 9)
        newest = await store.list_access(member.member_id, 1, None)
        assert newest[0].entry_id > max(r.entry_id for r in old) + 1
        assert await store.migrate() == []
    finally:
        await store.close()


async def test_a_long_transaction_on_members_delays_the_drop_not_the_logins(
    pg: PostgresStore, sql: asyncpg.Connection
) -> None:
    """Dropping a detached month locks members (the month still carries its foreign
    key). Behind a long transaction on members the drop gives up at once and the
    next purge drops it; the purge neither waits long nor queues ahead of reads."""
    member = await eight_months(pg)
    january = name(month(2025, 1))
    async with sql.transaction():
        await sql.execute("LOCK TABLE members IN ACCESS SHARE MODE")  # a long reader
        started = asyncio.get_running_loop().time()
        purged = await pg.purge_access_log(datetime(2025, 2, 1, tzinfo=UTC), 100)
        waited = asyncio.get_running_loop().time() - started
        # Another reader of members is not held up meanwhile.
        assert await pg.get_member(member.member_id) is not None
    assert waited < 5
    assert january not in await partitions(sql)  # detached: out of the log already
    assert purged == 1  # the 2024 entry (default partition); January not dropped yet
    assert january in await month_tables(sql)
    assert await pg.purge_access_log(datetime(2025, 2, 1, tzinfo=UTC), 100) == len(DAYS)
    assert january not in await month_tables(sql)


async def test_every_start_makes_the_coming_months(
    pg: PostgresStore, sql: asyncpg.Connection
) -> None:
    now = await sql.fetchval("SELECT now()")
    ahead = name(PostgresStore._add_months(now.astimezone(UTC), 2))
    assert ahead in await partitions(sql)
    await sql.execute(f'DROP TABLE "{ahead}"')  # as if the months had moved on
    assert ahead not in await partitions(sql)
    assert await pg.migrate() == []  # nothing to apply, yet the month is back
    assert ahead in await partitions(sql)
