"""Which part gets which: the service's components built from :class:`Settings`.

The server, the sidecar command and the admin commands get their vault, sidecar
and lifecycle here, so none of them imports another to borrow its set-up (the
server does not import the CLI, the sidecar does not import the server). Nothing
here runs anything: it only builds, opens and closes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

from service.config import Settings
from service.mail_spool import mail_spool
from service.mailer import build_relay
from service.sidecar import Sidecar
from vault import Clock, SystemClock, Vault, migrate_database, open_vault
from vault.bootstrap import default_database_url, retention_database_url
from vault.lifecycle import Lifecycle, LifecyclePolicy
from vault.store import database_backend, open_retention_store, open_store
from vault.store.base import RetentionStore


def _database_url(settings: Settings) -> str | None:
    return settings.database_url.get_secret_value() if settings.database_url else None


@contextlib.asynccontextmanager
async def open_configured_vault(
    settings: Settings, *, clock: Clock | None = None
) -> AsyncIterator[Vault]:
    """The vault as ``settings`` describe it: the server's and the CLI's one way in."""
    async with open_vault(
        data_dir=settings.data_dir,
        database_url=_database_url(settings),
        key_provider=settings.key_provider_settings,
        argon2=settings.argon2,
        password_workers=settings.password_workers,
        database_pool_size=settings.database_pool_size,
        clock=clock,
        settings=settings.vault_settings,
        retention_url=settings.retention_url,
    ) as vault:
        # A shred in this process deletes the member's spooled .eml mail at once.
        vault.add_shred_hook(mail_spool(settings, vault.clock).forget_member)
        yield vault


async def migrate_configured(settings: Settings) -> list[int]:
    """Apply pending migrations to the configured databases; the versions applied."""
    return await migrate_database(
        data_dir=settings.data_dir,
        database_url=_database_url(settings),
        retention_url=settings.retention_url,
    )


# --- the lifecycle sidecar ------------------------------------------------------------------


def lifecycle_policy(settings: Settings) -> LifecyclePolicy:
    return LifecyclePolicy(
        inactivity=timedelta(days=settings.inactivity_days),
        notice_lead=timedelta(days=settings.inactivity_notice_days),
        access_log_retention=timedelta(days=settings.access_log_retention_days),
    )


def build_sidecar(vault: Vault, settings: Settings, *, interval: float | None = None) -> Sidecar:
    """The sidecar ``settings`` describe, on ``vault``: its lifecycle steps, the mail
    relay, and key maintenance when PRIVACY_VAULT_SIDECAR_KEY_MAINTENANCE is on."""
    lifecycle = Lifecycle(
        vault.store,
        vault.shred,
        vault.clock,
        lifecycle_policy(settings),
        retained=vault.retention.store,
    )
    maintain = settings.sidecar_key_maintenance
    return Sidecar(
        lifecycle,
        vault.store,
        vault.clock,
        interval=settings.sidecar_interval_seconds if interval is None else interval,
        relay=build_relay(settings, vault.store, vault, vault.clock),
        keys=vault.keys if maintain else None,
        rotate_after=timedelta(days=settings.kek_rotation_days) if maintain else None,
    )


def _exists(url: str) -> bool:
    """False for a SQLite file that is not there: opening it would create it, and a
    dry run changes nothing."""
    backend, target = database_backend(url)
    return backend != "sqlite" or Path(target).exists()


@contextlib.asynccontextmanager
async def open_dry_run_lifecycle(settings: Settings) -> AsyncIterator[Lifecycle | None]:
    """A lifecycle on the stores alone, for counting: no key file, no migration, no
    lease, no write. None when the data directory has no database yet."""
    url = _database_url(settings)
    if url is None:
        url = default_database_url(settings.data_dir)
        if not _exists(url):
            yield None
            return
    store = await open_store(url, pool_size=1)
    retained: RetentionStore | None = None
    try:
        retained_url = retention_database_url(settings.data_dir, url, settings.retention_url)
        if retained_url is not None and _exists(retained_url):
            retained = await open_retention_store(retained_url, pool_size=1)
        yield Lifecycle(
            store, _no_shred, SystemClock(), lifecycle_policy(settings), retained=retained
        )
    finally:
        if retained is not None:
            await retained.close()
        await store.close()


async def _no_shred(
    member_id: str, reason: str, *, last_seen_before: datetime | None = None
) -> None:
    raise AssertionError("a dry run never shreds")
