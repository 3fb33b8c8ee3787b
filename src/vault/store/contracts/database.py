"""The database itself: open, migrate, close."""

from __future__ import annotations

from typing import Protocol


class Database(Protocol):
    """A database holding one schema, with its versioned migrations."""

    async def close(self) -> None: ...

    async def migrate(self) -> list[int]:
        """Apply pending migrations; return the versions applied now (idempotent)."""
        ...
