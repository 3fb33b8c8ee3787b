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
4. the member's own rows in ``access_log``, ``consents``, ``outbox`` and
   ``password_resets``.

Three kinds of transaction touch a subset only, and keep to the same order: a
sign-up locks the KEK version first, but the rows it then inserts are new (no
one else can hold them); a re-wrap batch updates ``member_keys`` rows alone, in
member_id order; KEK rotation and destruction lock ``kek_versions`` alone. A
deadlock or serialization failure that still happens (between two re-wrap runs,
say) is :class:`Conflict`: the transaction was rolled back whole, so the
caller may retry.

One module per storage domain; each is a part of the store sharing the one
connection layer in ``_db`` (the composite below is the whole :class:`Store`).
"""

from __future__ import annotations

from vault.store.postgres.access_log import PostgresAccessLog
from vault.store.postgres.destruction import PostgresDestruction
from vault.store.postgres.inactivity import PostgresInactivity
from vault.store.postgres.keys import PostgresKeys
from vault.store.postgres.login_failures import PostgresLoginFailures
from vault.store.postgres.members import PostgresMembers
from vault.store.postgres.outbox import PostgresOutbox
from vault.store.postgres.recovery import PostgresRecovery
from vault.store.postgres.retention import PostgresRetentionStore
from vault.store.sql.access_log import SqlAccessLogCount
from vault.store.sql.destruction import SqlDestructionRecords
from vault.store.sql.idempotency import SqlIdempotency
from vault.store.sql.inactivity import SqlInactivity
from vault.store.sql.key_events import SqlKeyEvents
from vault.store.sql.lease import SqlLease
from vault.store.sql.login_failures import SqlLoginFailures
from vault.store.sql.outbox import SqlOutbox
from vault.store.sql.recovery import SqlRecoveryTokens

__all__ = ["PostgresRetentionStore", "PostgresStore"]


class PostgresStore(
    PostgresKeys,
    SqlKeyEvents,
    PostgresMembers,
    PostgresAccessLog,
    SqlAccessLogCount,
    PostgresDestruction,
    SqlDestructionRecords,
    SqlLease,
    PostgresInactivity,
    SqlInactivity,
    PostgresRecovery,
    SqlRecoveryTokens,
    PostgresOutbox,
    SqlOutbox,
    PostgresLoginFailures,
    SqlLoginFailures,
    SqlIdempotency,
):
    """The vault in a PostgreSQL database. Open with :meth:`open`, then ``migrate()``."""
