"""The service layer's shape (issue 9, item 5): no import cycles, the admin commands
share plumbing instead of borrowing from each other, no private name crosses a
module, the size limits hold, nothing reaches past the vault to the store; and the
sidecar walks the lifecycle's named steps, renewing its lease before each (both
backends)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from service.config import Settings
from service.sidecar import LEASE_NAME
from service.wiring import build_sidecar, open_configured_vault
from vault import FrozenClock, Vault
from vault.facade import NewMember

SERVICE = Path(__file__).resolve().parent.parent / "src" / "service"
T = datetime(2026, 1, 1, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text("utf-8")) for p in sorted(SERVICE.glob("*.py"))}


def _service_imports(tree: ast.Module) -> Iterator[tuple[str, list[str]]]:
    """(module, imported names) of every ``from service... import``, lazy ones too."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [a.name for a in node.names]
            if node.module == "service":
                for name in names:
                    yield name, []
            elif node.module.startswith("service."):
                yield node.module.split(".")[1], names


def _graph() -> dict[str, set[str]]:
    return {m: {dep for dep, _ in _service_imports(t)} for m, t in _modules().items()}


def test_the_service_modules_import_each_other_without_a_cycle() -> None:
    """Function-level imports count: a lazy import that closes a loop is a cycle
    put off, not removed (the server and the sidecar, the CLI and keys_cli)."""
    graph = _graph()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import cycle: " + " -> ".join((*path, module))
        if module in done:
            return
        for dep in sorted(graph.get(module, ())):
            visit(dep, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_the_admin_commands_share_plumbing_and_never_import_one_another() -> None:
    graph = _graph()
    commands = {m for m in graph if m.endswith("_cli")}
    assert {"keys_cli", "retention_cli", "backup_cli", "sidecar_cli"} <= commands
    for module in sorted(commands):
        assert not graph[module] & commands, f"{module} imports {graph[module] & commands}"
        assert "cli" not in graph[module], f"{module} imports the top-level CLI"
        assert "cli_common" in graph[module], f"{module} does not use the shared plumbing"


def test_no_private_name_is_imported_from_another_service_module() -> None:
    """Conversions (timestamps etc.) live in service.convert, not in one servicer."""
    for module, tree in _modules().items():
        for source, names in _service_imports(tree):
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{module} imports {private} from service.{source}"


def _vault_imports(tree: ast.Module) -> Iterator[tuple[str, list[str]]]:
    """(module, imported names) of every import of the vault, lazy ones too."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "vault" or node.module.startswith("vault."):
                yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "vault" or alias.name.startswith("vault."):
                    yield alias.name, []


#: Ways to a whole database: the service is handed built components and slices instead.
_STORE_OPENERS = {"open_store", "open_retention_store", "database_backend"}


def _store_reaches(tree: ast.Module) -> list[str]:
    """Each way ``tree`` reaches past the vault to the store: an import of
    ``vault.store`` (a backend, ``open_store``, a Store Protocol, a row type), a store
    Protocol or opener imported from another vault module, or a read of some
    object's ``store`` or ``parts`` (the vault's store, the parts tests build from)."""
    found = []
    for source, names in _vault_imports(tree):
        if source.startswith("vault.store") or (source == "vault" and "store" in names):
            found.append(f"imports {source}")
        banned = [n for n in names if n.endswith("Store") or n in _STORE_OPENERS]
        if banned:
            found.append(f"imports {banned} from {source}")
    found += [
        f"reads .{node.attr} (line {node.lineno})"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in ("store", "parts")
    ]
    return found


def test_the_service_never_reaches_past_the_vault_to_the_store() -> None:
    """Issue 9, item 1: the vault hands the service layer built components (the
    lifecycle, the lease and outbox slices), and the row types the servicers convert
    come from the vault's public modules (``vault.keyadmin``, ``vault.mail``)."""
    for module, tree in _modules().items():
        assert not _store_reaches(tree), f"{module}: {_store_reaches(tree)}"


def test_the_store_check_finds_each_way_past_the_vault() -> None:
    samples = {
        "from vault.store import open_store": "imports vault.store",
        "from vault.store.base import OutboxMessage": "imports vault.store.base",
        "import vault.store.sqlite": "imports vault.store.sqlite",
        "from vault import store": "imports vault",
        "from vault.bootstrap import open_store": "imports ['open_store'] from vault.bootstrap",
        "from vault.facade import LeaseStore": "imports ['LeaseStore'] from vault.facade",
        "def f():\n    from vault.store.base import Store": "imports vault.store.base",
        "def f(vault):\n    return vault.store": "reads .store (line 2)",
        "def f(vault):\n    return vault.parts.member_keys": "reads .parts (line 2)",
    }
    for code, expected in samples.items():
        assert expected in _store_reaches(ast.parse(code)), code
    assert _store_reaches(ast.parse("from vault.mail import MailOutbox, OutboxMessage")) == []


def test_service_files_and_functions_stay_within_the_limits() -> None:
    for path in sorted(SERVICE.glob("*.py")):
        text = path.read_text("utf-8")
        assert text.count("\n") <= 600, f"{path.name}: {text.count(chr(10))} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{path.name}: {node.name} has {length} lines"


# --- the sidecar walks the lifecycle's steps ------------------------------------------------


async def _sign_up(vault: Vault, n: int) -> str:
    return await vault.sign_up(
        NewMember(
            f"layer{n:04d}", "a long passphrase", f"Name {n}", f"l{n}@example.com", "1990-01-01"
        )
    )


async def test_a_sidecar_that_loses_its_lease_mid_round_stops_before_the_next_step(
    server_settings: Settings,
) -> None:
    """The lease is renewed before each lifecycle step: when another sidecar takes it
    over during the shredding step, this one sends no notice in that round; the
    round after the lease is free again does."""
    clock = FrozenClock(T)
    async with open_configured_vault(server_settings, clock=clock) as vault:
        doomed = await _sign_up(vault, 1)
        clock.set(T + 30 * DAY)
        await _sign_up(vault, 2)
        sidecar = build_sidecar(vault, server_settings, interval=60)
        clock.set(T + 335 * DAY)  # the first is due for a notice, the second not yet
        first = await sidecar.run_round()
        assert first is not None
        assert (first.shredded, first.notices) == (0, 1)

        async def take_over(member_id: str) -> None:
            # Another sidecar, as of a time past this one's lease, takes it.
            later = clock.now() + timedelta(hours=1)
            assert await vault.leases.acquire_lease(LEASE_NAME, "other:2:y", later, DAY)

        vault.add_shred_hook(take_over)
        clock.set(T + 365 * DAY)  # the first is due for expiry, the second for a notice
        lost = await sidecar.run_round()
        assert lost is not None
        assert (lost.shredded, lost.notices) == (1, 0)
        assert [r.member_id for r in await vault.parts.store.list_destruction_records()] == [doomed]

        await vault.leases.release_lease(LEASE_NAME, "other:2:y")
        again = await sidecar.run_round()
        assert again is not None
        assert (again.shredded, again.notices) == (0, 1)
        await sidecar.release()
