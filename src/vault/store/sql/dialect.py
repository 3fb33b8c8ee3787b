"""The differences between the two SQL dialects that shared statements meet.

A shared statement is written in PostgreSQL's placeholder style (``$1``, ``$2``,
reusable) with ``{share}`` / ``{update}`` where PostgreSQL takes a row lock and
``{jsonb}`` / ``{text}`` / ``{uuid}`` where it needs a cast, ``{true}`` for a
boolean literal, ``{no_key_update}`` for PostgreSQL's weaker update lock. SQLite numbers its
placeholders ``?1``, ``?2`` (the same binding: ``?n`` is the n-th argument) and
needs neither the locks (a write holds the database's one write lock from its
first statement) nor the casts. Statements are rendered once, at import, so a
call pays nothing for the layer.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from vault.clock import from_micros, to_micros
from vault.store._common import canonical_member_id, require_aware

_PLACEHOLDER = re.compile(r"\$(\d+)")


@dataclass(frozen=True, slots=True)
class Dialect:
    name: str
    #: Fragments filled into a statement's ``{share}``, ``{update}``, ``{jsonb}``...
    fragments: Mapping[str, str]
    #: Placeholders in the backend's own style (``$n`` is kept or becomes ``?n``).
    placeholder: str
    #: A timezone-aware datetime as the backend's column holds it, and back.
    time: Callable[[datetime], Any]
    from_time: Callable[[Any], datetime]
    #: A member id as the backend's column holds it (PostgreSQL: uuid; SQLite: text).
    member_id: Callable[[str], Any]
    #: Below every member id: where a keyset page by member id starts.
    member_floor: Any

    def flag(self, column: str, value: bool = True) -> str:
        """A test of a boolean column, as the backend's partial indexes spell it
        (PostgreSQL ``confirmed`` / ``NOT confirmed``, SQLite ``confirmed = 1`` / ``= 0``)."""
        if self.name == "postgres":
            return column if value else f"NOT {column}"
        return f"{column} = {int(value)}"

    def sql(self, statement: str) -> str:
        """The shared statement in this dialect."""
        filled = statement.format_map(self.fragments)
        return _PLACEHOLDER.sub(lambda m: f"{self.placeholder}{m.group(1)}", filled)


def _sqlite_time(value: datetime) -> int:
    return to_micros(require_aware(value))


def _as_is(value: datetime) -> datetime:
    return value


def _uuid(member_id: str) -> uuid.UUID:
    return uuid.UUID(canonical_member_id(member_id))


POSTGRES = Dialect(
    name="postgres",
    fragments={
        "share": " FOR SHARE",
        "update": " FOR UPDATE",
        "jsonb": "::jsonb",
        "text": "::text",
        "uuid": "::uuid",
        "true": "true",
        "no_key_update": " FOR NO KEY UPDATE",
    },
    placeholder="$",
    time=require_aware,
    from_time=_as_is,
    member_id=_uuid,
    member_floor=uuid.UUID(int=0),
)

SQLITE = Dialect(
    name="sqlite",
    # No row locks (the write lock is held already) and no casts: all empty but true.
    fragments={**dict.fromkeys(POSTGRES.fragments, ""), "true": "1"},
    placeholder="?",
    time=_sqlite_time,
    from_time=from_micros,
    member_id=canonical_member_id,
    member_floor="",
)


DIALECTS = (POSTGRES, SQLITE)


def both(statement: str) -> dict[str, str]:
    """The statement rendered for each dialect, by dialect name."""
    return {d.name: d.sql(statement) for d in DIALECTS}


def each(build: Callable[[Dialect], str]) -> dict[str, str]:
    """A statement that needs a dialect's helper (``flag``) to be spelled, rendered
    for each dialect, by dialect name."""
    return {d.name: d.sql(build(d)) for d in DIALECTS}
