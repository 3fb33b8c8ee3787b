"""PostgreSQL backend on asyncpg: production, and the base for scale-out.

Every method runs in one transaction on one pooled connection. Member ids are
``uuid`` columns (canonical lowercase strings at the boundary), timestamps
``timestamptz``, bytes ``bytea``. Connection failures become
:class:`StorageUnavailable` raised ``from None``: asyncpg's messages can hold
the DSN, and unique-violation details hold the HMAC, so neither is chained.

Lock order. Every transaction that touches an existing member takes that
member's row locks in this one order, never backwards, so no two of them can
wait for each other (a deadlock):

1. the ``members`` row: FOR UPDATE to change the member's key or destroy the
   member (a key rotation, a shred, the withdrawal's shred, the expiry sweep's
   shred); the UPDATE itself for the member's own writes; FOR SHARE or FOR KEY
   SHARE (the foreign key check of an insert) to add a row that belongs to it;
2. the ``member_keys`` row: FOR SHARE to check that the DEK a write sealed
   under is still the member's, FOR UPDATE to replace or delete it;
3. ``kek_versions`` rows: FOR SHARE, so a version stays active or undestroyed
   until commit;
4. the member's own rows in ``access_log``, ``consents``, ``consent_events``,
   ``outbox`` and ``password_resets``.

Three kinds of transaction touch a subset only, and keep to the same order: a
sign-up locks the KEK version first, but the rows it then inserts are new (no
one else can hold them); a re-wrap batch updates ``member_keys`` rows alone, in
member_id order; KEK rotation and destruction lock ``kek_versions`` alone. A
deadlock or serialization failure that still happens (between two re-wrap runs,
say) is :class:`Conflict`: the transaction was rolled back whole, so the
caller may retry.

The statements and transaction bodies both dialects agree on are written once in
:mod:`vault.store.sql`; a module here keeps what PostgreSQL does its own way (the
member read's record array, access-log partitions, the quota array, SKIP LOCKED),
over the one connection layer in ``_db``. The composite below is the whole
:class:`Store`.
"""

from __future__ import annotations

from vault.store.postgres._db import _PostgresDatabase
from vault.store.postgres.access_log import PostgresAccessLog
from vault.store.postgres.inactivity import PostgresInactivity
from vault.store.postgres.members import PostgresMembers
from vault.store.postgres.recovery import PostgresRecovery
from vault.store.postgres.retention import PostgresRetentionStore
from vault.store.sql.store import SqlVaultStore

__all__ = ["PostgresRetentionStore", "PostgresStore"]


class PostgresStore(
    PostgresMembers,
    PostgresAccessLog,
    PostgresInactivity,
    PostgresRecovery,
    SqlVaultStore,
    _PostgresDatabase,
):
    """The vault in a PostgreSQL database. Open with :meth:`open`, then ``migrate()``.
    The statements both dialects agree on are in :class:`SqlVaultStore`; in front of
    it only what PostgreSQL does its own way."""
