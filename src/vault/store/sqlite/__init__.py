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

The statements and transaction bodies both dialects agree on are written once in
:mod:`vault.store.sql` (a body runs on the writer thread in one hand-off, see
``sql.executor.run_now``); a module here keeps what SQLite does its own way (the
member read's JSON, the quota list, the purge by rowid), over the one connection
layer in ``_db``. The composite below is the whole :class:`Store`.
"""

from __future__ import annotations

from vault.store.sql.store import SqlVaultStore
from vault.store.sqlite._db import _SqliteDatabase
from vault.store.sqlite.members import SqliteMembers
from vault.store.sqlite.recovery import SqliteRecovery
from vault.store.sqlite.retention import SqliteRetentionStore

__all__ = ["SqliteRetentionStore", "SqliteStore"]


class SqliteStore(SqliteMembers, SqliteRecovery, SqlVaultStore, _SqliteDatabase):
    """The vault in one SQLite file. Open with :meth:`open`, then ``migrate()``.
    The statements both dialects agree on are in :class:`SqlVaultStore`; in front of
    it only what SQLite does its own way."""
