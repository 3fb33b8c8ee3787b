"""The vault store's shared parts together: each backend's store is this, its own
few differences in front, and its connection layer behind."""

from __future__ import annotations

from vault.store.sql.access_log import SqlAccessLog
from vault.store.sql.consents import SqlConsents
from vault.store.sql.corrections import SqlCorrections, SqlStatistics
from vault.store.sql.destruction import SqlDestruction
from vault.store.sql.disclosures import SqlDisclosures
from vault.store.sql.idempotency import SqlIdempotency
from vault.store.sql.inactivity import SqlInactivity
from vault.store.sql.key_events import SqlKeyEvents
from vault.store.sql.keys import SqlKeys
from vault.store.sql.lease import SqlLease
from vault.store.sql.login_failures import SqlLoginFailures
from vault.store.sql.members import SqlMembers
from vault.store.sql.outbox import SqlOutbox
from vault.store.sql.passwords import SqlPasswords
from vault.store.sql.recovery import SqlRecoveryTokens
from vault.store.sql.sessions import SqlSessions


class SqlVaultStore(
    SqlKeys,
    SqlKeyEvents,
    SqlMembers,
    SqlConsents,
    SqlDisclosures,
    SqlPasswords,
    SqlAccessLog,
    SqlDestruction,
    SqlLease,
    SqlInactivity,
    SqlRecoveryTokens,
    SqlOutbox,
    SqlSessions,
    SqlLoginFailures,
    SqlIdempotency,
    SqlCorrections,
    SqlStatistics,
):
    """Every statement of the vault store that the dialects agree on."""
