"""Which part gets which: the service's components built from :class:`Settings`.

The server, the sidecar command and the admin commands get their vault, sidecar
and lifecycle here, so none of them imports another to borrow its set-up (the
server does not import the CLI, the sidecar does not import the server). Nothing
here runs anything: it only builds, opens and closes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from datetime import timedelta

from service.config import Settings
from service.mail_spool import mail_spool
from service.mailer import build_relay
from service.metrics import Metrics
from service.sidecar import Sidecar
from vault import Clock, Vault, bootstrap, migrate_database, open_vault
from vault.lifecycle import Lifecycle, LifecyclePolicy


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


def build_sidecar(
    vault: Vault,
    settings: Settings,
    *,
    interval: float | None = None,
    metrics: Metrics | None = None,
) -> Sidecar:
    """The sidecar ``settings`` describe, on ``vault``: its lifecycle steps, the mail
    relay, and key maintenance when PRIVACY_VAULT_SIDECAR_KEY_MAINTENANCE is on. With
    ``metrics``, its rounds are counted and the database-backed gauges served."""
    maintain = settings.sidecar_key_maintenance
    sidecar = Sidecar(
        vault.lifecycle(lifecycle_policy(settings)),
        vault.leases,
        vault.clock,
        interval=settings.sidecar_interval_seconds if interval is None else interval,
        relay=build_relay(settings, vault.outbox, vault, vault.clock),
        keys=vault.keys if maintain else None,
        rotate_after=timedelta(days=settings.kek_rotation_days) if maintain else None,
        on_round=None if metrics is None else metrics.sidecar_round,
    )
    if metrics is not None:
        metrics.watch_store(
            vault.keys,
            vault.outbox,
            sidecar.lifecycle,
            refresh_seconds=settings.metrics_refresh_seconds,
            now=vault.clock.now,
        )
    return sidecar


@contextlib.asynccontextmanager
async def serving_metrics(settings: Settings, vault: Vault) -> AsyncIterator[Metrics | None]:
    """The metrics endpoint PRIVACY_VAULT_METRICS_ADDRESS asks for, with the vault's
    counts; None (and no endpoint) when it is unset."""
    if settings.metrics_address is None:
        yield None
        return
    metrics = Metrics()
    metrics.watch_vault(vault.activity)
    metrics.serve(settings.metrics_address)
    try:
        yield metrics
    finally:
        await metrics.close()


def open_dry_run_lifecycle(settings: Settings) -> AbstractAsyncContextManager[Lifecycle | None]:
    """A lifecycle on the configured stores alone, for counting (see
    :func:`vault.bootstrap.open_dry_run_lifecycle`); None when there is no database."""
    return bootstrap.open_dry_run_lifecycle(
        data_dir=settings.data_dir,
        policy=lifecycle_policy(settings),
        database_url=_database_url(settings),
        retention_url=settings.retention_url,
    )
