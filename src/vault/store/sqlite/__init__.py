"""SQLite backend: the embedded default.

Writes go through one connection used only from one worker thread: each write
method hands all its SQL to that thread in one call, in ``BEGIN IMMEDIATE`` ...
``COMMIT``, so it never half-applies and never blocks the event loop on fsync.
Every write holds the database's one write lock from its first statement, so
writes take turns and cannot deadlock (the PostgreSQL backend's lock order does
not arise); a write that waits past ``busy_timeout`` on another process is
:class:`StorageUnavailable`.
Reads run inline on the event loop on a second, query-only connection: they are
indexed point reads served from the page cache in microseconds, less than a
thread hand-off costs, and WAL lets them run beside the writer without waiting.
Timestamps are INTEGER microseconds since the Unix epoch (UTC). ``secure_delete``
zeroes deleted content in the file, and a shred is followed by a WAL checkpoint so
old page images leave the WAL as well.

One module per storage domain; each is a part of the store sharing the one
connection layer in ``_db`` (the composite below is the whole :class:`Store`).
"""

from __future__ import annotations

from vault.store.sql.access_log import SqlAccessLogCount
from vault.store.sql.destruction import SqlDestructionRecords
from vault.store.sql.idempotency import SqlIdempotency
from vault.store.sql.inactivity import SqlInactivity
from vault.store.sql.key_events import SqlKeyEvents
from vault.store.sql.lease import SqlLease
from vault.store.sql.login_failures import SqlLoginFailures
from vault.store.sql.outbox import SqlOutbox
from vault.store.sql.recovery import SqlRecoveryTokens
from vault.store.sqlite.access_log import SqliteAccessLog
from vault.store.sqlite.destruction import SqliteDestruction
from vault.store.sqlite.inactivity import SqliteInactivity
from vault.store.sqlite.keys import SqliteKeys
from vault.store.sqlite.login_failures import SqliteLoginFailures
from vault.store.sqlite.members import SqliteMembers
from vault.store.sqlite.outbox import SqliteOutbox
from vault.store.sqlite.recovery import SqliteRecovery
from vault.store.sqlite.retention import SqliteRetentionStore

__all__ = ["SqliteRetentionStore", "SqliteStore"]


class SqliteStore(
    SqliteKeys,
    SqlKeyEvents,
    SqliteMembers,
    SqliteAccessLog,
    SqlAccessLogCount,
    SqliteDestruction,
    SqlDestructionRecords,
    SqlLease,
    SqliteInactivity,
    SqlInactivity,
    SqliteRecovery,
    SqlRecoveryTokens,
    SqliteOutbox,
    SqlOutbox,
    SqliteLoginFailures,
    SqlLoginFailures,
    SqlIdempotency,
):
    """The vault in one SQLite file. Open with :meth:`open`, then ``migrate()``."""
