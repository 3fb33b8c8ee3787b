"""Count the store's SQL statements: how many are written once (``store/sql/``) and
how many per backend, and how many per-backend ones are still the same text.

Reads the source only (``ast``), never imports it. A statement is a string
expression (a literal, an implicit concatenation, an f-string) whose text starts
with an SQL keyword. Names of module-level string constants are resolved into the
f-strings that use them; a constant used only inside other statements is a
fragment (``_SELECT_MEMBER``), not a statement of its own. Other interpolations
stay as ``{...}``.

Normalised for the comparison: placeholders (``$n``, ``?n``, ``?``), casts
(``::uuid``, ``::int[]``), the dialect layer's fragments (``{share}``...), row-lock
clauses (FOR SHARE / FOR UPDATE / FOR NO KEY UPDATE, but not SKIP LOCKED),
whitespace and case.

    python scripts/sql_census.py [--root src/vault/store] [--list]
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Upper case only, as the store writes SQL: prose ("Drop every ...") is not SQL.
_KEYWORDS = re.compile(
    r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH|CREATE|ALTER|DROP|LOCK|SET|PRAGMA)\b"
)
_BACKENDS = ("postgres", "sqlite")


@dataclass
class Module:
    scope: str  # "sql", "postgres" or "sqlite"
    path: Path
    tree: ast.Module
    constants: dict[str, ast.expr] = field(default_factory=dict)


def _modules(root: Path) -> list[Module]:
    found: list[Module] = []
    for scope in ("sql", *_BACKENDS):
        for path in sorted((root / scope).glob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            module = Module(scope, path, tree)
            for node in tree.body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1:
                    target = node.targets[0]
                    if isinstance(target, ast.Name):
                        module.constants[target.id] = node.value
            found.append(module)
    return found


def _text(node: ast.expr, names: dict[str, ast.expr], depth: int = 0) -> str | None:
    """The string an expression spells, with unknown interpolations as ``{...}``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts: list[str] = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            elif isinstance(value, ast.FormattedValue):
                inner = value.value
                resolved = None
                if isinstance(inner, ast.Name) and inner.id in names and depth < 5:
                    resolved = _text(names[inner.id], names, depth + 1)
                parts.append(resolved if resolved is not None else "{" + ast.unparse(inner) + "}")
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _text(node.left, names, depth), _text(node.right, names, depth)
        return None if left is None or right is None else left + right
    return None


def _is_sql(text: str | None) -> bool:
    return text is not None and bool(_KEYWORDS.match(text))


def _string_nodes(tree: ast.AST) -> Iterator[ast.expr]:
    """Outermost string expressions (an f-string's parts are not visited again);
    docstrings are skipped."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.Constant | ast.JoinedStr):
            yield node
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            yield node
            yield from _string_nodes(node)
        else:
            yield from _string_nodes(node)


def _fragment_names(modules: list[Module], names: dict[str, ast.expr]) -> set[str]:
    """SQL constants referenced only from inside other SQL strings."""
    inside: set[str] = set()
    outside: set[str] = set()
    for module in modules:
        in_strings: set[int] = set()
        local = {**names, **module.constants}
        for node in ast.walk(module.tree):
            if isinstance(node, ast.JoinedStr) and _is_sql(_text(node, local)):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Name):
                        inside.add(sub.id)
                        in_strings.add(id(sub))
        for node in ast.walk(module.tree):
            if (
                isinstance(node, ast.Name)
                and isinstance(node.ctx, ast.Load)
                and id(node) not in in_strings
            ):
                outside.add(node.id)
    return {n for n in inside - outside if n in names and _is_sql(_text(names[n], names))}


_PLACEHOLDERS = re.compile(r"\$\d+|\?\d*")
_CASTS = re.compile(r"::\w+(\[\])?")
_FRAGMENTS = re.compile(r"\{(share|update|jsonb|text|uuid|no_key_update)\}")
_LOCKS = re.compile(r"\s+FOR\s+(SHARE|UPDATE|NO\s+KEY\s+UPDATE)\b(?!\s+SKIP\s+LOCKED)", re.I)


def normalise(text: str) -> str:
    text = _FRAGMENTS.sub("", text).replace("{true}", "1")
    text = _CASTS.sub("", _PLACEHOLDERS.sub("?", text))
    text = _LOCKS.sub("", text)
    return " ".join(text.split()).lower()


def census(root: Path) -> dict[str, dict[str, str]]:
    """Scope -> normalised statement -> one place it is written."""
    modules = _modules(root)
    names: dict[str, ast.expr] = {}
    for module in modules:
        names.update(module.constants)
    fragments = _fragment_names(modules, names)
    fragment_nodes = {id(m.constants[n]) for m in modules for n in fragments if n in m.constants}
    found: dict[str, dict[str, str]] = {scope: {} for scope in ("sql", *_BACKENDS)}
    for module in modules:
        # A module's own constants first (both backends have a _SELECT_MEMBER).
        local = {**names, **module.constants}
        for node in _string_nodes(module.tree):
            if id(node) in fragment_nodes:
                continue
            text = _text(node, local)
            if text is None or not _is_sql(text):
                continue
            where = f"{module.path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
            found[module.scope].setdefault(normalise(text), where)
    return found


_MECHANICS = re.compile(r"^(pragma|lock|set|create|alter|drop)\b")


def _report(title: str, found: dict[str, dict[str, str]]) -> None:
    shared, pg, lite = found["sql"], found["postgres"], found["sqlite"]
    same = set(pg) & set(lite)
    # A statement counts once however often it is written: shared, or per backend
    # (a pair still textually identical after normalisation counts once).
    logical = len(shared) + len(set(pg) | set(lite))
    print(f"{title}")
    print(f"  written once in sql/ (shared):           {len(shared)}")
    print(f"  in postgres/ modules:                    {len(pg)}")
    print(f"  in sqlite/ modules:                      {len(lite)}")
    print(f"  per-backend pairs identical (normalised): {len(same)}")
    print(f"  distinct statements:                     {logical}")
    print(f"  share of statements written once:        {len(shared)}/{logical} ", end="")
    print(f"({len(shared) / logical:.0%})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="src/vault/store", type=Path)
    parser.add_argument("--list", action="store_true", help="list the statements too")
    args = parser.parse_args(argv)
    found = census(args.root)
    # Data statements (SELECT, INSERT, UPDATE, DELETE, WITH) apart from a backend's
    # own mechanics (PRAGMA, LOCK TABLE, SET LOCAL, DDL), which have no twin.
    data = {
        scope: {t: w for t, w in own.items() if not _MECHANICS.match(t)}
        for scope, own in found.items()
    }
    _report("data statements (SELECT/INSERT/UPDATE/DELETE/WITH):", data)
    _report("all statements (with PRAGMA, LOCK, SET, DDL):", found)
    if args.list:
        same = set(found["postgres"]) & set(found["sqlite"])
        for scope, own in found.items():
            for text, where in sorted(own.items(), key=lambda kv: kv[1]):
                mark = " [SAME]" if scope != "sql" and text in same else ""
                print(f"{scope:8} {where:32} {text[:110]}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
