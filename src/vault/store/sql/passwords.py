"""The password write (:class:`vault.store.contracts.passwords.PasswordStore`), once
for both backends: the new hash, the end of the member's sessions, the notice
and (for a reset) the failure counter's deletion are one transaction body, so no
crash between them can leave a session of the old password alive or a reset
account still locked."""

from __future__ import annotations

from vault.store.rows import OutboxMessage
from vault.store.sql import guards
from vault.store.sql.dialect import both
from vault.store.sql.executor import MemberGone, SqlExecutor, Tx, UniqueViolation
from vault.store.sql.login_failures import DELETE_MEMBER_FAILURES
from vault.store.sql.sessions import END_MEMBER_SESSIONS

_SET_PASSWORD = both("UPDATE members SET password_hash_ct = $2 WHERE member_id = $1")


class SqlPasswords(SqlExecutor):
    """Replacing a member's password hash with what depends on it."""

    async def write_password(
        self,
        member_id: str,
        password_hash_ct: bytes,
        *,
        dek_id: int,
        notify: OutboxMessage,
        clear_failures: bool = False,
    ) -> bool:
        d = self._dialect
        key = d.member_id(member_id)
        ct = bytes(password_hash_ct)
        outbox_row = guards.outbox_params(d, notify)
        if outbox_row[1] != key:
            raise ValueError("the message is for another member")

        async def body(tx: Tx) -> bool:
            # The lock order: the members row (by the update), its key row (a
            # rotated key rolls the write back), then the member's own rows.
            if await tx.run(_SET_PASSWORD[d.name], key, ct) != 1:
                return False
            await guards.check_dek(tx, d, key, dek_id)
            await tx.run(END_MEMBER_SESSIONS[d.name], key)
            if clear_failures:
                # Keyed by the login ID's index, read from the row just locked.
                await tx.run(DELETE_MEMBER_FAILURES[d.name], key)
            await tx.run(guards.INSERT_OUTBOX[d.name], *outbox_row)
            return True

        try:
            return await self._in_transaction(body)
        except UniqueViolation as exc:
            raise exc.error() from None
        except MemberGone:
            return False
