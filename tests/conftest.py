"""Shared fixtures: real databases for every test, never mocks.

PostgreSQL: the server at ``PRIVACY_VAULT_TEST_PG_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``; a URL with a superuser or
CREATEDB role). Each test gets a fresh database that is dropped afterwards.
When the server is unreachable, PostgreSQL tests are skipped with a loud
warning, or fail when ``PRIVACY_VAULT_REQUIRE_POSTGRES=1`` (set it in CI).

SoftHSM2 (the pkcs11 key provider): a token initialised per session in a private
token directory; without SoftHSM2 its tests skip loudly, or fail when
``PRIVACY_VAULT_REQUIRE_SOFTHSM=1`` (set it in CI).

Order: the suite runs in a random order (pytest-randomly); the seed is printed in
the header and, after a failure, in a replay line (``--randomly-seed=N``).
``-p no:randomly`` runs it in file order. No test may depend on another: every
test starts from the same logging configuration, and test servers run no
lifecycle sidecar on real time unless the test asks for one.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
import uvloop
from grpc_support import ADMIN_TOKEN, embedded_settings
from mail_support import RecordingHandler, SmtpServer
from process_support import free_port
from pydantic import SecretStr
from store_support import with_active_kek

from privacyvault.v1 import member_pb2_grpc
from service.config import Settings
from service.logs import configure_logging
from service.server import RunningServer, run_server
from vault import FrozenClock
from vault.store import Store, open_store

# --- The event loop ------------------------------------------------------------


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The in-process servers run on uvloop, the loop `serve` and `sidecar` use by
    default (the event_loop setting); tests/test_server_process.py also runs a server
    on asyncio's own loop."""
    return {"uvloop": uvloop.new_event_loop}


# --- PostgreSQL availability ---------------------------------------------------

PG_ADMIN_DSN = os.environ.get(
    "PRIVACY_VAULT_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REQUIRE_POSTGRES = os.environ.get("PRIVACY_VAULT_REQUIRE_POSTGRES") == "1"
# Every PostgreSQL skip reason starts with this; the terminal summary counts them.
PG_SKIP_REASON = "PostgreSQL unavailable"

# Probed once per session: None when reachable, else the error's type name.
_pg_probe: dict[str, str | None] = {}


async def require_postgres() -> str:
    """The admin DSN, or skip (fail, when required) the calling test."""
    if "error" not in _pg_probe:
        try:
            conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            _pg_probe["error"] = type(exc).__name__
        else:
            await conn.close()
            _pg_probe["error"] = None
    error = _pg_probe["error"]
    if error is not None:
        # The DSN itself is not shown: it may hold a password.
        reason = f"{PG_SKIP_REASON} at PRIVACY_VAULT_TEST_PG_DSN ({error})"
        if REQUIRE_POSTGRES:
            pytest.fail(f"{reason}, and PRIVACY_VAULT_REQUIRE_POSTGRES=1", pytrace=False)
        pytest.skip(reason)
    return PG_ADMIN_DSN


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    _replay_line(terminalreporter)
    skipped = [
        report
        for report in terminalreporter.stats.get("skipped", [])
        if PG_SKIP_REASON in str(getattr(report, "longrepr", ""))
    ]
    if skipped:
        terminalreporter.write_sep(
            "!", f"{len(skipped)} PostgreSQL TESTS WERE SKIPPED", red=True, bold=True
        )
        terminalreporter.write_line(
            "The PostgreSQL backend was NOT tested. Start PostgreSQL or set "
            "PRIVACY_VAULT_TEST_PG_DSN; set PRIVACY_VAULT_REQUIRE_POSTGRES=1 to make this fail.",
            red=True,
        )
    softhsm_skipped = [
        report
        for report in terminalreporter.stats.get("skipped", [])
        if SOFTHSM_SKIP_REASON in str(getattr(report, "longrepr", ""))
    ]
    if softhsm_skipped:
        terminalreporter.write_sep(
            "!", f"{len(softhsm_skipped)} SOFTHSM2 TESTS WERE SKIPPED", red=True, bold=True
        )
        terminalreporter.write_line(
            "The pkcs11 key provider was NOT tested. Install softhsm2 (apt-get install "
            "softhsm2); set PRIVACY_VAULT_REQUIRE_SOFTHSM=1 to make this fail.",
            red=True,
        )
    skip_reasons = [
        str(getattr(report, "longrepr", "")) for report in terminalreporter.stats.get("skipped", [])
    ]
    for reason, title, line in _LOUD_SKIPS:
        if any(reason in skipped for skipped in skip_reasons):
            terminalreporter.write_sep("!", title, red=True, bold=True)
            terminalreporter.write_line(line, red=True)


#: (skip reason, banner, what to do): single tests whose skip the summary shouts.
_LOUD_SKIPS = (
    (
        "container test unavailable",
        "THE CONTAINER TEST WAS SKIPPED",
        "The image was NOT run. Build it with scripts/container_build.sh (podman, runc, "
        "mmdebstrap); set PRIVACY_VAULT_REQUIRE_CONTAINER=1 to make this fail.",
    ),
    (
        "node client test unavailable",
        "THE NODE CLIENT TEST WAS SKIPPED",
        "The Node client was NOT run. Install node and npm (apt-get install nodejs npm); "
        "set PRIVACY_VAULT_REQUIRE_NODE=1 to make this fail.",
    ),
)


def _replay_line(terminalreporter: pytest.TerminalReporter) -> None:
    """After a failure in a random order, the option that replays that order."""
    config = terminalreporter.config
    failed = terminalreporter.stats.get("failed", []) + terminalreporter.stats.get("error", [])
    if not failed or not config.pluginmanager.hasplugin("randomly"):
        return
    seed = config.getoption("randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_sep("!", "the tests ran in a random order", red=True)
        terminalreporter.write_line(f"Replay this order with: -p randomly --randomly-seed={seed}")


# --- logging: the same configuration at the start of every test -------------------------


@pytest.fixture(autouse=True)
def _baseline_logging() -> None:
    """Info level, JSON, to whatever stderr is at the time (pytest's capture).

    Tests that reconfigure (the canary's debug capture) leave no trace in the next
    test, and ``structlog.testing.capture_logs`` sees every logger whichever test
    used it first: service.logs keeps one processor list and one output that
    cached loggers share.
    """
    configure_logging(level="info", fmt="json")


@pytest.fixture
async def postgres_admin_dsn() -> str:
    """The admin DSN of a reachable server (skips or fails the test otherwise)."""
    return await require_postgres()


@pytest.fixture
async def make_postgres_database() -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """A factory: each call creates an empty database ``pv_test_<hex>`` and returns
    its URL. All of them are dropped (WITH (FORCE)) at teardown."""
    created: list[str] = []

    async def make() -> str:
        admin_dsn = await require_postgres()
        name = f"pv_test_{secrets.token_hex(8)}"
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        created.append(name)
        return urlunsplit(urlsplit(admin_dsn)._replace(path=f"/{name}"))

    yield make

    if created:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            for name in created:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


# --- stores ----------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite database URL (absolute path: ``sqlite:////...``)."""
    return f"sqlite:///{tmp_path / 'vault.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    """The storage backend under test; store_url and store follow it."""
    return str(request.param)


@pytest.fixture
async def store_url(
    backend: str,
    sqlite_url: str,
    make_postgres_database: Callable[[], Awaitable[str]],
) -> str:
    """A fresh, empty (unmigrated) database URL for the backend under test."""
    if backend == "postgres":
        return await make_postgres_database()
    return sqlite_url


@pytest.fixture
async def retention_url(
    backend: str, tmp_path: Path, make_postgres_database: Callable[[], Awaitable[str]]
) -> str:
    """The separated retention storage for the backend under test: a second database
    of the same kind (SQLite: ``retention.db`` in the data directory)."""
    if backend == "postgres":
        return await make_postgres_database()
    return f"sqlite:///{tmp_path / 'data' / 'retention.db'}"


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """A migrated, empty store for the backend under test."""
    opened = await open_store(store_url)
    try:
        await opened.migrate()
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def vault(store: Store) -> Store:
    """The store with KEK version 1 active, which members need (the store contract
    modules; test_lifecycle and test_retention override it with a whole Vault)."""
    return await with_active_kek(store)


# --- the gRPC server, in-process over a real channel ------------------------------

# A fixed, known "now" so age checks and timestamps are deterministic.
TEST_NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(TEST_NOW)


@pytest.fixture
def server_settings(store_url: str, tmp_path: Path) -> Settings:
    """Embedded-mode settings on the backend under test, with the cheapest argon2.

    Without the in-process lifecycle sidecar: it would run rounds on real time (its
    relay writing .eml files into the data directory while a test reads it, its
    loggers first used at a moment no test chooses). Tests of the sidecar ask for
    it (``sidecar_in_process=True``) or drive ``Sidecar.run_round`` themselves.
    """
    return embedded_settings(tmp_path / "data", database_url=store_url)


@pytest.fixture
async def server(server_settings: Settings, clock: FrozenClock) -> AsyncIterator[RunningServer]:
    async with run_server(server_settings, clock=clock) as running:
        yield running


@pytest.fixture
async def channel(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture
def members(channel: grpc.aio.Channel) -> member_pb2_grpc.MemberServiceStub:
    return member_pb2_grpc.MemberServiceStub(channel)


@pytest.fixture
def admin_settings(server_settings: Settings) -> Settings:
    """``server_settings`` with KeyAdminService on (``grpc_support.ADMIN_TOKEN``)."""
    return server_settings.model_copy(update={"admin_token": SecretStr(ADMIN_TOKEN)})


@pytest.fixture
async def admin_server(
    admin_settings: Settings, clock: FrozenClock
) -> AsyncIterator[RunningServer]:
    async with run_server(admin_settings, clock=clock) as running:
        yield running


@pytest.fixture
async def admin_channel(admin_server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(admin_server.target) as ch:
        yield ch


# --- a real SMTP server (aiosmtpd) ---------------------------------------------------


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """Listening on a free port of 127.0.0.1; what it accepts is in ``handler.received``."""
    server = SmtpServer(RecordingHandler(), free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- SoftHSM2: a real PKCS#11 token for the pkcs11 key provider ---------------------

REQUIRE_SOFTHSM = os.environ.get("PRIVACY_VAULT_REQUIRE_SOFTHSM") == "1"
# Every SoftHSM skip reason starts with this; the terminal summary counts them.
SOFTHSM_SKIP_REASON = "SoftHSM2 unavailable"
SOFTHSM_MODULES = (
    Path("/usr/lib/softhsm/libsofthsm2.so"),  # Debian, Ubuntu
    Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib64/pkcs11/libsofthsm2.so"),  # Fedora
    Path("/usr/local/lib/softhsm/libsofthsm2.so"),  # built from source
)


@dataclass(frozen=True, slots=True)
class SoftHsmToken:
    """An initialised SoftHSM2 token, private to this test session."""

    module: Path
    token_label: str
    pin: str = field(repr=False)


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsmToken]:
    """A fresh token in a private token directory (``SOFTHSM2_CONF`` is set for the
    session). Skips loudly without SoftHSM2, or fails when
    ``PRIVACY_VAULT_REQUIRE_SOFTHSM=1`` (set it in CI)."""
    module = next((m for m in SOFTHSM_MODULES if m.is_file()), None)
    util = shutil.which("softhsm2-util")
    if module is None or util is None:
        missing = "softhsm2-util" if util is None else "libsofthsm2.so"
        reason = f"{SOFTHSM_SKIP_REASON} ({missing} not found)"
        if REQUIRE_SOFTHSM:
            pytest.fail(f"{reason}, and PRIVACY_VAULT_REQUIRE_SOFTHSM=1", pytrace=False)
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir(mode=0o700)
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        token = SoftHsmToken(module, f"pv-test-{secrets.token_hex(4)}", secrets.token_hex(8))
        init = subprocess.run(
            [
                util,
                "--init-token",
                "--free",
                "--label",
                token.token_label,
                "--pin",
                token.pin,
                "--so-pin",
                secrets.token_hex(8),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if init.returncode != 0:
            pytest.fail(f"softhsm2-util --init-token failed: {init.stderr.strip()}", pytrace=False)
        yield token
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous
