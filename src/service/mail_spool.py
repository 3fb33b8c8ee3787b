"""The .eml spool: mail kept on disk when no SMTP server is configured.

``<data_dir>/outbox-mail/<member_id>/<message_id>.eml``. The files hold what the
mails say in clear, so they are private (0600 in 0700 directories), foldered by
member so that a shred deletes that member's mail, and expire after a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from service.config import Settings
from vault import Clock, SystemClock
from vault.ids import canonical_member_id
from vault.mail import check_message_id

EML_DIRECTORY = "outbox-mail"

#: How long spooled mail is kept (MAIL_SPOOL_DAYS): long enough to read it, short
#: enough that reset codes and names do not pile up in the data directory.
DEFAULT_SPOOL_KEEP = timedelta(days=7)


@dataclass(slots=True)
class SpoolSweep:
    expired: int = 0  # files older than the spool's expiry
    shredded: int = 0  # files of members who no longer exist


class MailSpool:
    """``<data_dir>/outbox-mail/<member_id>/<message_id>.eml``: mail with no SMTP server.

    The files hold what the mails say in clear (name, address, login ID, reset
    codes): they are 0600 in 0700 directories, one directory per member so that a
    shred deletes that member's mail (:meth:`forget_member`, the vault's shred hook),
    and they expire after ``keep`` (:meth:`sweep`, each relay round, which also
    deletes the mail of members shredded by another process). A file's mtime is its
    write time by the injected clock.
    """

    def __init__(
        self, data_dir: Path, keep: timedelta = DEFAULT_SPOOL_KEEP, clock: Clock | None = None
    ) -> None:
        if keep <= timedelta(0):
            raise ValueError("the mail spool's expiry must be positive")
        self.directory = data_dir / EML_DIRECTORY
        self.keep = keep
        self._clock = clock or SystemClock()

    def __repr__(self) -> str:
        return f"<MailSpool {self.directory}>"

    def member_directory(self, member_id: str) -> Path:
        """ValueError unless ``member_id`` is a member id: it becomes a path."""
        canonical = canonical_member_id(member_id)
        if canonical is None:
            raise ValueError("not a member id")
        return self.directory / canonical

    async def write(self, member_id: str, message_id: str, data: bytes) -> Path:
        folder = self.member_directory(member_id)
        name = f"{check_message_id(message_id)}.eml"
        at = self._clock.now().timestamp()
        return await asyncio.to_thread(self._write, folder, name, data, at)

    def _write(self, folder: Path, name: str, data: bytes, at: float) -> Path:
        for directory in (self.directory, folder):
            directory.mkdir(mode=0o700, exist_ok=True, parents=True)
            _private_directory(directory)
        # mkstemp creates the file 0600; the rename makes a half-written file
        # impossible to see, and a retry simply replaces it.
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".eml")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                os.utime(f.fileno(), (at, at))  # the clock's time: what the expiry reads
            target = folder / name
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    async def forget_member(self, member_id: str) -> int:
        """Delete the member's spooled mail; returns how many files. The vault calls
        this after a shred; an error is the caller's to log (the sweep retries)."""
        canonical = canonical_member_id(member_id)
        if canonical is None:
            return 0
        return await asyncio.to_thread(self._forget, self.directory / canonical)

    @staticmethod
    def _forget(folder: Path) -> int:
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return 0
        deleted = 0
        for entry in entries:
            if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                Path(entry.path).unlink(missing_ok=True)
                deleted += 1
        with contextlib.suppress(OSError):  # gone already, or a file written meanwhile
            folder.rmdir()
        return deleted

    async def sweep(self, is_destroyed: Callable[[str], Awaitable[bool]]) -> SpoolSweep:
        """Delete files older than the expiry (files of any shape, a crash's temp files
        and a former version's flat files too), then the mail of every member
        ``is_destroyed`` says is gone."""
        before = (self._clock.now() - self.keep).timestamp()
        result = SpoolSweep()
        members, result.expired = await asyncio.to_thread(self._expire, before)
        for member_id in members:
            if await is_destroyed(member_id):
                result.shredded += await self.forget_member(member_id)
        return result

    def _expire(self, before: float) -> tuple[list[str], int]:
        """Expired files deleted; the member directories left, by member id."""
        try:
            top = list(os.scandir(self.directory))
        except FileNotFoundError:
            return [], 0
        members: list[str] = []
        expired = 0
        for entry in top:
            if entry.is_dir(follow_symlinks=False):
                expired += _delete_older(Path(entry.path), before)
                with contextlib.suppress(OSError):  # not empty: keep it
                    Path(entry.path).rmdir()
                if Path(entry.path).exists() and canonical_member_id(entry.name) == entry.name:
                    members.append(entry.name)
            elif _older(entry, before):
                Path(entry.path).unlink(missing_ok=True)
                expired += 1
        return members, expired


def _older(entry: os.DirEntry[str], before: float) -> bool:
    try:
        return entry.stat(follow_symlinks=False).st_mtime < before
    except FileNotFoundError:
        return False


def _delete_older(folder: Path, before: float) -> int:
    deleted = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if not entry.is_dir(follow_symlinks=False) and _older(entry, before):
                Path(entry.path).unlink(missing_ok=True)
                deleted += 1
    return deleted


def _private_directory(directory: Path) -> None:
    """0700, also for a directory an earlier version (or a umask) left wider."""
    if stat.S_IMODE(directory.stat().st_mode) != 0o700:
        directory.chmod(0o700)


def mail_spool(settings: Settings, clock: Clock | None = None) -> MailSpool:
    """The .eml spool in the data directory (swept and shred-hooked even with SMTP
    set: an earlier embedded run may have left mail there)."""
    return MailSpool(settings.data_dir, timedelta(days=settings.mail_spool_days), clock)
