"""Who is calling: the identity of the current call, for what the vault records.

The service's request wrapper runs each call inside :func:`calling_as` (the caller's
SPIFFE ID, or ``local`` in the embedded default); the vault reads
:func:`current_caller` where it records an access-log entry or a key event. A
contextvar is per asyncio task, so concurrent calls never see each other's caller.
Work outside any call (the sidecar, the CLI, start-up) is :data:`INTERNAL`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

INTERNAL = "internal"  # sidecar, CLI, in-process work
#: Longest identity recorded: a SPIFFE ID is at most 2048 bytes (SPIFFE-ID spec).
MAX_IDENTITY = 2048

_caller: ContextVar[str] = ContextVar("privacy_vault_caller", default=INTERNAL)


def current_caller() -> str:
    """The calling identity, e.g. "spiffe://example.org/ns/x/sa/y", "local", "internal"."""
    return _caller.get()


@contextlib.contextmanager
def calling_as(identity: str) -> Iterator[None]:
    """Run the block as ``identity``."""
    token = _caller.set(_checked(identity))
    try:
        yield
    finally:
        _caller.reset(token)


def enter_call_as(identity: str) -> None:
    """Set the caller for the rest of the current task: for the request wrapper, where
    each gRPC call runs in a task of its own (grpc.aio creates one per call), so the
    setting ends with the call without a block around the whole handler."""
    _caller.set(_checked(identity))


def _checked(identity: str) -> str:
    if not identity or len(identity) > MAX_IDENTITY:
        raise ValueError("a caller identity is 1-2048 characters")
    return identity
