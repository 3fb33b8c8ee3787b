"""The embedded default key provider: KEK material in a 0600 JSON file.

The file lives in the data directory (created on first start) or is a mounted
secret (read-only: new versions must then be added to the secret itself).

Format: {"format": "privacy-vault-local-kek/1", "versions": {"1": "<base64>"}}
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import structlog

from vault import _hazmat
from vault.errors import KeyUnavailable

FILE_FORMAT = "privacy-vault-local-kek/1"
log = structlog.get_logger("vault.keys")


class LocalKeyProvider:
    name = "local"

    def __init__(self, path: Path, *, writable: bool = True, recheck_seconds: float = 0.5) -> None:
        self._path = path
        self._writable = writable
        self._recheck_seconds = recheck_seconds
        self._next_check = 0.0
        self._keys: dict[int, _hazmat.SecretKey] = {}
        self._loaded_from: tuple[int, int, int] | None = None
        self._lock = asyncio.Lock()
        self._load()

    def __repr__(self) -> str:
        return f"<LocalKeyProvider versions={sorted(self._keys)}>"

    def _identity(self) -> tuple[int, int, int] | None:
        try:
            st = self._path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _load(self) -> None:
        self._loaded_from = self._identity()
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            self._keys = {}
            return
        except OSError:
            raise KeyUnavailable("the local key file cannot be read") from None
        mode = stat.S_IMODE(self._path.stat().st_mode)
        if self._writable and mode & 0o077:
            # A key file others can read is a leaked key file: refuse rather than
            # tighten it quietly, so that someone decides whether to rotate.
            raise KeyUnavailable(
                f"the local key file {self._path} is open to group or others (mode {mode:03o}); "
                "its material may have been copied: chmod 600 it, and if anyone else could "
                "read it, rotate, re-wrap and destroy the old versions"
            )
        try:
            doc = json.loads(raw)
            if doc.get("format") != FILE_FORMAT:
                raise KeyUnavailable("the local key file has an unknown format")
            self._keys = {
                int(v): _hazmat.SecretKey(int(v), base64.b64decode(m, validate=True))
                for v, m in doc["versions"].items()
            }
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            # Never echo the parse error: it could quote key material.
            raise KeyUnavailable("the local key file is malformed") from None

    def _store(self, versions: dict[str, str]) -> None:
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        doc = json.dumps({"format": FILE_FORMAT, "versions": versions}, indent=1).encode()
        # A leftover temp file (a crash mid-write) could carry a loose mode or be a
        # link: start from nothing, and never follow one.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, doc)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._path)
        with contextlib.suppress(OSError):
            dir_fd = os.open(self._path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    async def has_version(self, version: int) -> bool:
        try:
            self._key(version)
        except KeyUnavailable:
            return False
        return True

    async def create_version(self, version: int) -> None:
        async with self._lock:
            created = await asyncio.to_thread(self._create_version_locked, version)
        if created:
            log.info("kek_version_created", provider=self.name, kek_version=version)

    async def destroy_version(self, version: int) -> None:
        async with self._lock:
            destroyed = await asyncio.to_thread(self._destroy_version_locked, version)
        if destroyed:
            log.info("kek_version_material_destroyed", provider=self.name, kek_version=version)

    def _destroy_version_locked(self, version: int) -> bool:
        if not self._writable:
            self._load()
            if version not in self._keys:
                return False
            raise KeyUnavailable(
                f"KEK version {version} is in the mounted key file; remove it from the secret"
            )
        with self._file_lock():
            self._load()
            if version not in self._keys:
                return False
            versions = self._read_versions()
            versions.pop(str(version), None)
            # Rewritten whole and renamed over the old file: the old material is
            # not left behind in this file (copies elsewhere are the horizon).
            self._store(versions)
            self._load()
            return True

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        # flock serialises processes sharing the data directory (two servers
        # starting at once must not each invent a different version 1).
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_fd = os.open(self._path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(lock_fd)  # closing releases the lock

    def _read_versions(self) -> dict[str, str]:
        raw = self._path.read_bytes() if self._path.exists() else b""
        versions: dict[str, str] = json.loads(raw)["versions"] if raw else {}
        return versions

    def _create_version_locked(self, version: int) -> bool:
        if not self._writable:
            self._load()
            if version in self._keys:
                return False
            raise KeyUnavailable(
                f"KEK version {version} is not in the mounted key file; add it to the secret"
            )
        with self._file_lock():
            self._load()
            if version in self._keys:
                return False
            versions = self._read_versions()
            versions[str(version)] = base64.b64encode(_hazmat.new_key_material()).decode()
            self._store(versions)
            self._load()
            return True

    def _key(self, version: int) -> _hazmat.SecretKey:
        # Another process (the keys CLI) may have rotated or destroyed a version:
        # the file is replaced whole, so a changed identity means reload. Material
        # destroyed elsewhere thus leaves this process's memory too, and the
        # shredding horizon does not wait for a restart. At most one stat per
        # ``recheck_seconds``: a re-wrap unwraps and wraps a million keys.
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self._recheck_seconds
            if self._identity() != self._loaded_from:
                self._load()
        key = self._keys.get(version)
        if key is None and self._identity() != self._loaded_from:
            self._load()  # a version added elsewhere within the interval
            key = self._keys.get(version)
        if key is None:
            raise KeyUnavailable(f"KEK version {version} is not in the local key file")
        return key

    async def wrap(self, version: int, material: bytes, context: bytes) -> bytes:
        return _hazmat.wrap_key(self._key(version), material, context)

    async def unwrap(self, version: int, wrapped: bytes, context: bytes) -> bytes:
        return _hazmat.unwrap_key(self._key(version), wrapped, context)

    async def close(self) -> None:
        self._keys = {}
