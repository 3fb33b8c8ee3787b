"""Assemble a Vault from plain settings: store URL, key provider, argon2 profile.

The one place the vault's components are wired together (:func:`wire_vault`):
member keys, then the components that share them (key admin, retention,
recovery, export), each given the store slice it asks for, then the facade over
them all. The stores are opened here (and for a dry run's counts,
:func:`open_dry_run_lifecycle`), so the service layer never holds one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

import structlog

from vault import _hazmat
from vault.activity import Activity
from vault.bindings import INDEX_KEY_ID
from vault.cache import DekCache
from vault.calls import INTERNAL
from vault.clock import Clock, SystemClock
from vault.consents import Consents
from vault.corrections import Corrections
from vault.disclosures import Disclosures, NoticePage, count_owed_notices
from vault.errors import DecryptionError, KeyUnavailable, PreconditionFailed
from vault.export import Export
from vault.facade import Vault, VaultParts, VaultSettings
from vault.idempotency import Idempotency
from vault.keyadmin import KeyAdmin
from vault.keyring import Keyring
from vault.lifecycle import Lifecycle, LifecyclePolicy
from vault.login_guard import LoginGuard
from vault.member_keys import MemberKeys
from vault.members import BlindIndexes
from vault.passwords import OWASP, Argon2Profile, PasswordHasher
from vault.providers.base import KeyProvider
from vault.providers.local import LocalKeyProvider
from vault.providers.pkcs11 import Pkcs11KeyProvider
from vault.recovery import Recovery
from vault.retention import Retention
from vault.sessions import MemberSessions
from vault.statistics import Statistics
from vault.store import database_backend, open_retention_store, open_store
from vault.store.base import (
    IndexKeyRow,
    KekVersionRow,
    KeyEvent,
    KeyStore,
    RetentionStore,
    Store,
)

LOCAL_KEY_FILE = "kek.json"
#: What SQLite keeps beside a database file (its pages live in the WAL too).
SQLITE_COMPANIONS = ("", "-wal", "-shm", "-journal")

log = structlog.get_logger("vault.bootstrap")


@dataclass(frozen=True, slots=True)
class KeyProviderSettings:
    """Which key provider holds the KEKs, and how to reach it."""

    kind: Literal["local", "pkcs11"] = "local"
    #: local: a mounted key file (read-only) instead of ``kek.json`` in the data dir.
    local_key_file: Path | None = None
    #: pkcs11: the PKCS#11 module (a shared library), the token and its user PIN.
    pkcs11_module: Path | None = None
    pkcs11_token_label: str = "privacy-vault"  # noqa: S105 - a label, not a secret
    pkcs11_pin: str | None = field(default=None, repr=False)
    #: pkcs11: KEK version N is the key object labelled ``f"{prefix}{N}"``.
    pkcs11_label_prefix: str = "privacy-vault-kek-"
    #: pkcs11: threads calling into the module, each with its own session.
    pkcs11_workers: int = 4

    def __repr__(self) -> str:
        return f"<KeyProviderSettings kind={self.kind}>"


def open_key_provider(settings: KeyProviderSettings, data_dir: Path) -> KeyProvider:
    if settings.kind == "local":
        if settings.local_key_file:
            return LocalKeyProvider(settings.local_key_file, writable=False)
        return LocalKeyProvider(data_dir / LOCAL_KEY_FILE)
    if settings.kind == "pkcs11":
        if settings.pkcs11_module is None:
            raise ValueError("the pkcs11 key provider needs pkcs11_module (the PKCS#11 library)")
        if not settings.pkcs11_pin:
            raise ValueError("the pkcs11 key provider needs pkcs11_pin (the token's user PIN)")
        # python-pkcs11 (a native module) is imported only now, by open().
        return Pkcs11KeyProvider.open(
            settings.pkcs11_module,
            settings.pkcs11_token_label,
            settings.pkcs11_pin,
            label_prefix=settings.pkcs11_label_prefix,
            workers=settings.pkcs11_workers,
        )
    raise ValueError(f"unknown key provider {settings.kind!r}")


def default_database_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'vault.db'}"


def default_retention_url(data_dir: Path) -> str:
    """The embedded default: a second SQLite file beside the vault's."""
    return f"sqlite:///{data_dir / 'retention.db'}"


def retention_database_url(
    data_dir: Path, database_url: str | None, retention_url: str | None
) -> str | None:
    """Where the retention store is: the configured URL; else, beside an embedded
    (SQLite) vault, ``retention.db``; else none (a PostgreSQL vault with no retention
    database configured cannot retain, see open_vault)."""
    if retention_url:
        if retention_url == database_url:
            raise ValueError("retention_database_url must name a database of its own")
        return retention_url
    vault_url = database_url or default_database_url(data_dir)
    if database_backend(vault_url)[0] == "sqlite":
        return default_retention_url(data_dir)
    return None


def sqlite_database_files(
    data_dir: Path, database_url: str | None, retention_url: str | None
) -> list[Path]:
    """The SQLite files (vault, then retention) the settings name; PostgreSQL ones are
    not files of ours."""
    urls = [
        database_url or default_database_url(data_dir),
        retention_database_url(data_dir, database_url, retention_url),
    ]
    files = []
    for url in urls:
        if url is not None:
            backend, target = database_backend(url)
            if backend == "sqlite":
                files.append(Path(target))
    return files


def tighten_permissions(path: Path, what: str) -> None:
    """Take group and others' bits off ``path`` if it is ours; refuse if it is not."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o077:
        return
    tight = mode & ~0o077
    if st.st_uid != os.geteuid():
        # Another user's file: changing its mode is not ours to do.
        raise PreconditionFailed(
            "permissions",
            f"{what} {path} is open to group or others (mode {mode:03o}) and belongs to "
            f"another user, so it cannot be tightened: make it {tight:03o} as its owner, "
            "or use a directory of this user's",
            kind="PERMISSIONS",
        )
    os.chmod(path, tight)
    log.warning(
        "permissions_tightened", file=str(path), mode_was=f"{mode:03o}", mode_now=f"{tight:03o}"
    )


def secure_local_files(data_dir: Path, database_files: Iterable[Path]) -> None:
    """Start-up check: the data directory must be 0700 and the SQLite files 0600.

    What this user owns is tightened, with a log line (a loose umask or a restore
    typically left it so; the files hold ciphertext, the fix is safe); another user's
    is refused. The local key file is refused, not tightened, when others could read
    it (see LocalKeyProvider): its material may have been copied already.
    """
    tighten_permissions(data_dir, "the data directory")
    for database in database_files:
        for suffix in SQLITE_COMPANIONS:
            tighten_permissions(
                database.with_name(database.name + suffix), "the SQLite database file"
            )


async def bootstrap_keys(
    store: KeyStore, provider: KeyProvider, member_keys: MemberKeys, clock: Clock
) -> _hazmat.IndexKey:
    """Make sure the key hierarchy exists (KEK version 1, the index key), and check
    that the provider's keys open this database (fail at start, not at the first
    request); returns the unwrapped blind-index key."""
    now = clock.now()
    rows = await store.list_kek_versions()
    if not rows:
        await provider.create_version(1)
        try:
            created = await store.insert_kek_version(KekVersionRow(1, "active", now))
        except PreconditionFailed:
            # Replicas starting together on an empty database: another one's version 1
            # is active already (the one-active index refused ours). Use it.
            created = False
        if created:
            await store.record_key_event(
                KeyEvent(now, "bootstrap", "create_kek_version", 1, details={}, caller=INTERNAL)
            )
        rows = await store.list_kek_versions()
    keyring = Keyring(rows)
    if not await provider.has_version(keyring.active):
        raise KeyUnavailable(
            f"the {provider.name} key provider does not hold the active KEK version "
            f"{keyring.active}"
        )
    stored = await store.get_index_key()
    if stored is None:
        material = _hazmat.new_key_material()
        wrapped = await member_keys.wrap_index_key(INDEX_KEY_ID, material, keyring.active)
        stored = await store.insert_index_key(
            IndexKeyRow(INDEX_KEY_ID, keyring.active, wrapped, now)
        )
    try:
        material = await member_keys.unwrap_index_key(stored)
    except DecryptionError:
        raise KeyUnavailable(
            "the key provider's KEKs do not open this database (wrong key file?)"
        ) from None
    return _hazmat.IndexKey(stored.key_id, material)


def wire_vault(
    store: Store,
    provider: KeyProvider,
    hasher: PasswordHasher,
    clock: Clock,
    settings: VaultSettings,
    index_key: _hazmat.IndexKey,
    retained: RetentionStore | None = None,
    member_keys: MemberKeys | None = None,
) -> VaultParts:
    """The vault's components, each given the parts it uses."""
    keys = member_keys or MemberKeys(
        store, provider, DekCache(settings.dek_cache_size, settings.dek_cache_ttl)
    )
    indexes = BlindIndexes(index_key)
    decoy_key = _hazmat.SecretKey(0, _hazmat.new_key_material())
    decoy_ct = _hazmat.seal_field(decoy_key, "decoy", "password_hash", b"x" * 97)
    # Page tokens are authenticated under a key of their own, derived from the
    # index key: nothing new to store, and every replica derives the same key.
    page_token_key = _hazmat.derive_mac_key(index_key, "page-token")
    activity = Activity()

    disclosures = Disclosures(store, keys, clock, settings, page_token_key)
    return VaultParts(
        store=store,
        retained=retained,
        provider=provider,
        hasher=hasher,
        clock=clock,
        settings=settings,
        member_keys=keys,
        indexes=indexes,
        page_token_key=page_token_key,
        keys=KeyAdmin(store, provider, keys, clock, retained, activity),
        retention=Retention(store, retained, keys, clock, settings.withdrawal_retention, activity),
        recovery=Recovery(store, keys, hasher, clock, settings, indexes, decoy_key),
        export=Export(store, keys, clock, settings),
        corrections=Corrections(store, keys, clock, page_token_key),
        statistics=Statistics(store, clock, settings.statistics, settings.purposes),
        sessions=MemberSessions(store, clock, settings),
        consents=Consents(store, clock, settings, page_token_key),
        disclosures=disclosures,
        # The IP's and the request id's HMAC keys are derived like the page tokens'.
        guard=LoginGuard(
            store,
            hasher,
            keys,
            clock,
            settings.login_guard,
            _hazmat.derive_mac_key(index_key, "client-ip"),
            # Decrypted when a login ID is unknown, so that path does the same work.
            (decoy_key, decoy_ct),
            activity,
        ),
        idempotency=Idempotency(store, _hazmat.derive_mac_key(index_key, "request-id"), clock),
        activity=activity,
    )


async def assemble_vault(
    store: Store,
    provider: KeyProvider,
    hasher: PasswordHasher,
    clock: Clock,
    settings: VaultSettings | None = None,
    retained: RetentionStore | None = None,
) -> Vault:
    """Migrate the store (and the retention store, when given), bootstrap the key
    hierarchy and wire the vault over already-opened parts."""
    settings = settings or VaultSettings()
    await store.migrate()
    if retained is not None:
        await retained.migrate()
    member_keys = MemberKeys(
        store, provider, DekCache(settings.dek_cache_size, settings.dek_cache_ttl)
    )
    index_key = await bootstrap_keys(store, provider, member_keys, clock)
    return Vault(
        wire_vault(store, provider, hasher, clock, settings, index_key, retained, member_keys)
    )


@contextlib.asynccontextmanager
async def open_vault(
    *,
    data_dir: Path,
    database_url: str | None = None,
    key_provider: KeyProviderSettings | None = None,
    argon2: Argon2Profile = OWASP,
    password_workers: int | None = None,
    database_pool_size: int = 10,
    clock: Clock | None = None,
    settings: VaultSettings | None = None,
    retention_url: str | None = None,
) -> AsyncIterator[Vault]:
    """Open the vault; the embedded default is SQLite and a local key file in ``data_dir``.

    ``key_provider`` chooses where the KEKs live (default: the local key file);
    ``retention_url`` the separated storage for withdrawn members' retained data
    (default: ``retention.db`` in ``data_dir`` beside an embedded vault).
    """
    settings = settings or VaultSettings()
    retained_url = retention_database_url(data_dir, database_url, retention_url)
    if retained_url is None and settings.withdrawal_retention.period:
        raise ValueError(
            "a withdrawal retention period needs a retention database (retention_database_url)"
        )
    secure_local_files(data_dir, sqlite_database_files(data_dir, database_url, retention_url))
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # noqa: ASYNC240 - once, at start
    provider = open_key_provider(key_provider or KeyProviderSettings(), data_dir)
    async with contextlib.AsyncExitStack() as undo:
        # Whatever was opened is closed again if a later step fails.
        undo.push_async_callback(provider.close)
        store = await open_store(
            database_url or default_database_url(data_dir), pool_size=database_pool_size
        )
        undo.push_async_callback(store.close)
        retained = None
        if retained_url is not None:
            retained = await open_retention_store(retained_url)
            undo.push_async_callback(retained.close)
        hasher = PasswordHasher(
            argon2, workers=password_workers, queue_limit=settings.password_queue_limit
        )
        undo.callback(hasher.close)
        vault = await assemble_vault(
            store, provider, hasher, clock or SystemClock(), settings, retained
        )
        undo.pop_all()  # from here on vault.close() owns them
    try:
        yield vault
    finally:
        await vault.close()


async def migrate_database(
    *, data_dir: Path, database_url: str | None = None, retention_url: str | None = None
) -> list[int]:
    """Apply pending migrations (the vault's, then the retention store's); return the
    vault's versions applied now."""
    secure_local_files(data_dir, sqlite_database_files(data_dir, database_url, retention_url))
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # noqa: ASYNC240 - once, at start
    store = await open_store(database_url or default_database_url(data_dir), pool_size=1)
    try:
        applied = await store.migrate()
    finally:
        await store.close()
    retained_url = retention_database_url(data_dir, database_url, retention_url)
    if retained_url is not None:
        retained = await open_retention_store(retained_url, pool_size=1)
        try:
            await retained.migrate()
        finally:
            await retained.close()
    return applied


def _exists(url: str) -> bool:
    """False for a SQLite file that is not there: opening it would create it, and a
    dry run changes nothing."""
    backend, target = database_backend(url)
    return backend != "sqlite" or Path(target).exists()


@contextlib.asynccontextmanager
async def open_dry_run_lifecycle(
    *,
    data_dir: Path,
    policy: LifecyclePolicy,
    database_url: str | None = None,
    retention_url: str | None = None,
) -> AsyncIterator[Lifecycle | None]:
    """A lifecycle on the stores alone, for counting: no key file, no migration, no
    lease, no write. None when the data directory has no database yet."""
    url = database_url
    if url is None:
        url = default_database_url(data_dir)
        if not _exists(url):
            yield None
            return
    store = await open_store(url, pool_size=1)
    retained: RetentionStore | None = None
    try:
        retained_url = retention_database_url(data_dir, url, retention_url)
        if retained_url is not None and _exists(retained_url):
            retained = await open_retention_store(retained_url, pool_size=1)
        notices = functools.partial(_count_notices, store)
        yield Lifecycle(store, _no_shred, SystemClock(), policy, retained=retained, notices=notices)
    finally:
        if retained is not None:
            await retained.close()
        await store.close()


async def _count_notices(store: Store, limit: int, *, dry_run: bool = False) -> NoticePage:
    # A dry run's lifecycle has no key: it only counts the notices owed.
    return await count_owed_notices(store, limit)


async def _no_shred(
    member_id: str, reason: str, *, last_seen_before: datetime | None = None
) -> None:
    raise AssertionError("a dry run never shreds")
