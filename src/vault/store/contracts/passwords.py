"""The password write: the new hash and what must change with it, at once."""

from __future__ import annotations

from typing import Protocol

from vault.store.rows import OutboxMessage


class PasswordStore(Protocol):
    """A member's password hash, replaced together with everything the old password
    held open: its sessions, and (for a reset) the failure counter's lock."""

    async def write_password(
        self,
        member_id: str,
        password_hash_ct: bytes,
        *,
        dek_id: int,
        notify: OutboxMessage,
        clear_failures: bool = False,
    ) -> bool:
        """In one transaction: replace the member's password hash (a ciphertext under
        the member's DEK ``dek_id``), delete every session of the member, enqueue
        ``notify`` (for the same member) and, with ``clear_failures``, delete the
        failure counter of the member's login ID (a reset lifts every lock, the
        permanent one included). All of it or none: a failure anywhere leaves the
        old hash, the sessions and the counter as they were.

        False, with nothing written, if no such member; KeyChanged if the member's
        DEK has been rotated meanwhile (the ciphertext would be unreadable)."""
        ...
