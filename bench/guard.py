"""How every benchmark runs its measurement: Ctrl-C (even when started in the
background) and SIGTERM unwind through the cleanups (bench databases and temporary
directories are dropped), and a failure is one line and an exit code, not a trace."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

import asyncpg

INTERRUPTED = 130
FAILED = 2
#: What a PostgreSQL benchmark may fail with (a server gone, a query refused).
PG_BENCH_FAILURES: tuple[type[BaseException], ...] = (
    RuntimeError,
    OSError,
    asyncpg.PostgresError,
)


def run_guarded(
    work: Callable[[], object], failures: tuple[type[BaseException], ...] = (RuntimeError,)
) -> int | None:
    """Run ``work`` (it keeps its results itself); None when it finished, else the
    exit code: 130 when interrupted, 2 when it failed with one of ``failures``."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        work()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except failures as error:
        print(f"bench failed: {error}", file=sys.stderr)
        return FAILED
    return None
