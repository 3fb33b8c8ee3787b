"""Password hashing with argon2id, off the event loop.

The encoded hash is then encrypted under the member's DEK by the vault, so
shredding the member destroys it too.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from argon2 import PasswordHasher as _Argon2Hasher
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError


@dataclass(frozen=True, slots=True)
class Argon2Profile:
    """argon2id cost parameters; memory_cost is in KiB."""

    time_cost: int
    memory_cost: int
    parallelism: int

    def __post_init__(self) -> None:
        if self.time_cost < 1 or self.parallelism < 1 or self.memory_cost < 8 * self.parallelism:
            raise ValueError("argon2 needs time_cost >= 1, parallelism >= 1, memory >= 8*p KiB")


#: OWASP's recommended argon2id profile: m=19 MiB, t=2, p=1. The default.
OWASP = Argon2Profile(time_cost=2, memory_cost=19 * 1024, parallelism=1)
#: Only for tests: as cheap as argon2 allows.
CHEAPEST = Argon2Profile(time_cost=1, memory_cost=8, parallelism=1)


class PasswordHasher:
    """argon2id on a dedicated thread pool; argon2-cffi releases the GIL while hashing."""

    def __init__(self, profile: Argon2Profile = OWASP, *, workers: int | None = None) -> None:
        self.profile = profile
        self._hasher = _Argon2Hasher(
            time_cost=profile.time_cost,
            memory_cost=profile.memory_cost,
            parallelism=profile.parallelism,
            hash_len=32,
            salt_len=16,
            type=Type.ID,
        )
        self._pool = ThreadPoolExecutor(
            max_workers=workers or os.cpu_count() or 1, thread_name_prefix="argon2"
        )
        # Verified against when the login ID is unknown, so that costs what a
        # wrong password costs.
        self._decoy = self._hasher.hash(os.urandom(16).hex())
        # Everything up to the salt names the parameters; a hash that starts the
        # same way and is as long was made with the current ones.
        self._current_prefix = self._decoy[
            : self._decoy.rindex("$", 0, self._decoy.rindex("$")) + 1
        ]

    async def _run(self, fn: object, *args: str) -> object:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)  # type: ignore[arg-type]

    async def hash(self, password: str) -> str:
        return str(await self._run(self._hasher.hash, password))

    def _verify(self, encoded: str, password: str) -> bool:
        try:
            return bool(self._hasher.verify(encoded, password))
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def verify(self, encoded: str, password: str) -> bool:
        return bool(await self._run(self._verify, encoded, password))

    async def verify_decoy(self, password: str) -> bool:
        """Burn the time of one verification; always False."""
        await self._run(self._verify, self._decoy, password)
        return False

    def needs_rehash(self, encoded: str) -> bool:
        if len(encoded) == len(self._decoy) and encoded.startswith(self._current_prefix):
            return False
        try:
            return bool(self._hasher.check_needs_rehash(encoded))
        except InvalidHashError:
            return True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
