"""Member ids: random UUIDs, always handled in canonical lowercase form."""

from __future__ import annotations

import re
import uuid

_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def new_member_id() -> str:
    return str(uuid.uuid4())


def canonical_member_id(value: object) -> str | None:
    """The canonical form of a UUID string, or None if it is not one.

    The canonical form (what the service hands out) is matched without parsing:
    this runs on every request, twice.
    """
    if isinstance(value, str) and _CANONICAL.fullmatch(value):
        return value
    try:
        return str(uuid.UUID(value))  # type: ignore[arg-type]
    except (TypeError, ValueError, AttributeError):
        return None
