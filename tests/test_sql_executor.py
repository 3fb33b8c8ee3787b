"""The shared transaction bodies' driver on SQLite (vault.store.sql.executor.run_now)."""

from __future__ import annotations

import asyncio

import pytest

from vault.store.sql.executor import run_now


async def _returns(value: int) -> int:
    async def step() -> int:
        return value

    return await step() + await step()


async def _suspends() -> int:
    await asyncio.sleep(0)
    return 1


def test_run_now_runs_a_body_whose_awaits_complete_at_once() -> None:
    assert run_now(_returns(2)) == 4


def test_run_now_refuses_a_body_that_suspends() -> None:
    with pytest.raises(RuntimeError, match="must not suspend"):
        run_now(_suspends())


def test_run_now_passes_a_body_error_through() -> None:
    async def fails() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        run_now(fails())
