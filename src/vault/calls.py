"""Who is calling: the identity of the current call (minimal version; the callers
work owns this module and its request wrapper sets it for each call).

A contextvar is per asyncio task, so concurrent calls never see each other's caller.
Work outside any call (the sidecar, the CLI, start-up) is :data:`INTERNAL`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

INTERNAL = "internal"  # sidecar, CLI, in-process work

_caller: ContextVar[str] = ContextVar("privacy_vault_caller", default=INTERNAL)


def current_caller() -> str:
    """The calling identity, e.g. "spiffe://example.org/ns/x/sa/y", "local", "internal"."""
    return _caller.get()


@contextlib.contextmanager
def calling_as(identity: str) -> Iterator[None]:
    """Run the block as ``identity``."""
    token = _caller.set(identity)
    try:
        yield
    finally:
        _caller.reset(token)
