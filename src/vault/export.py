"""The member's whole record as a JSON document (policy section 7, right of access).

export_member returns it in one piece up to EXPORT_MAX_BYTES; stream_member serves
every size in pieces, reading the access log page by page.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Protocol

from vault import _hazmat, member_cipher, policy
from vault.clock import Clock
from vault.corrections import Correction, correction_json, opened_corrections
from vault.errors import PreconditionFailed
from vault.ledger import entry_json, opened_ledger
from vault.member_keys import MemberKeys
from vault.member_rows import load_member
from vault.members import AccessEntry, MemberView, VaultSettings, member_view
from vault.policy import Purpose
from vault.purposes import consent_event_json, consent_outdated
from vault.store.base import (
    AccessEntryRow,
    AccessLogStore,
    ConsentEventRow,
    ConsentStore,
    CorrectionStore,
    DisclosureStore,
    MemberRow,
    MemberStore,
    whole_consent_history,
)

EXPORT_FORMAT = "privacy-vault-export/1"
#: The largest export document export_member returns in one piece (UTF-8 bytes):
#: well under gRPC's 4 MiB message limit. Larger ones are read with stream_member.
EXPORT_MAX_BYTES = 3 * 1024 * 1024
#: stream_member's pieces hold at most this many characters (so at most 256 KiB).
EXPORT_PIECE_CHARS = 64 * 1024
#: Access-log entries read (and decrypted) per query while exporting.
EXPORT_PAGE_ROWS = 1000


def open_access_entry(dek: _hazmat.SecretKey, member_id: str, row: AccessEntryRow) -> AccessEntry:
    action, ip = member_cipher.open_access(dek, member_id, row)
    caller = member_cipher.open_caller(dek, member_id, row)
    return AccessEntry(at=row.at, action=action, ip=ip, caller=caller)


class ExportStores(
    MemberStore, AccessLogStore, ConsentStore, CorrectionStore, DisclosureStore, Protocol
):
    """The vault-database slice an export reads: the member, their access log, their
    consent history, their corrections and their disclosure ledger."""


class Export:
    """Reached through Vault.export_member and Vault.stream_member."""

    def __init__(
        self, store: ExportStores, keys: MemberKeys, clock: Clock, settings: VaultSettings
    ) -> None:
        self._store = store
        self._keys = keys
        self._clock = clock
        self._settings = settings

    def __repr__(self) -> str:
        return "<Export>"

    async def export_member(self, member_id: str) -> str:
        """The member's whole record as a JSON document (section 7, right of access),
        in one string, for documents of up to EXPORT_MAX_BYTES. A larger one is
        PreconditionFailed (EXPORT_TOO_LARGE), found as soon as the limit is
        passed, without reading the rest: stream_member serves every size."""
        pieces: list[str] = []
        size = 0
        async with contextlib.aclosing(self.stream_member(member_id)) as stream:
            async for piece in stream:
                size += len(piece.encode())
                if size > EXPORT_MAX_BYTES:
                    raise PreconditionFailed(
                        "export",
                        f"the member's record is larger than {EXPORT_MAX_BYTES // (1024 * 1024)} "
                        "MiB, too large for one message; read it with StreamMemberData",
                        kind="EXPORT_TOO_LARGE",
                    )
                pieces.append(piece)
        return "".join(pieces)

    async def stream_member(self, member_id: str) -> AsyncGenerator[str, None]:
        """export_member's document for a member of any history size, in pieces of
        at most EXPORT_PIECE_CHARS characters that concatenate to the document.

        The access log is read EXPORT_PAGE_ROWS entries at a time by keyset (each
        page strictly older than the last), so memory stays bounded and entries
        recorded after the first page are not included. A per-member key rotation
        meanwhile is followed (the page is read again under the new key); a shred
        meanwhile ends the stream with NotFound rather than a truncated document."""
        row = await load_member(self._store, member_id)
        mid = row.member_id
        everything = policy.ALLOWED_FIELDS[Purpose.MEMBER_REQUEST]
        corrections = await self._store.list_corrections(mid)

        async def read_head(
            r: MemberRow, dek: _hazmat.SecretKey
        ) -> tuple[MemberView, list[Correction]]:
            return await member_view(r, everything, dek), opened_corrections(dek, mid, corrections)

        view, opened = await self._keys.read_under_key(row, read_head)
        history = await whole_consent_history(self._store, mid)
        ledger = await self._keys.read_under_key(
            row, lambda r, dek: opened_ledger(self._store, mid, dek)
        )
        version = await self._store.current_policy_version(self._clock.now())
        head = self._head(view, row, history, version or self._settings.policy_version, opened)
        # Who received what, when and on which basis (policy section 4), oldest first.
        head["disclosures"] = [entry_json(e) for e in ledger]
        # The head pretty-printed, its closing brace replaced by the history, which
        # is written one entry per line as the pages come.
        text = json.dumps(head, ensure_ascii=False, indent=2)
        assert text.endswith("\n}")
        pending = [text[:-2], ',\n  "access_history": [']
        pending_chars = sum(map(len, pending))
        cursor: tuple[datetime, int] | None = None
        first = True

        async def read_page(
            r: MemberRow, dek: _hazmat.SecretKey
        ) -> tuple[MemberRow, list[AccessEntryRow], list[AccessEntry]]:
            rows = await self._store.list_access(mid, EXPORT_PAGE_ROWS, cursor)
            return r, rows, [open_access_entry(dek, mid, x) for x in rows]

        while True:
            row, rows, entries = await self._keys.read_under_key(row, read_page)
            for e in entries:
                line = json.dumps(
                    {"at": e.at.isoformat(), "action": e.action, "ip": e.ip, "caller": e.caller},
                    ensure_ascii=False,
                )
                pending.append(("\n    " if first else ",\n    ") + line)
                pending_chars += len(pending[-1])
                first = False
            if len(rows) < EXPORT_PAGE_ROWS:
                break
            cursor = (rows[-1].at, rows[-1].entry_id)
            if pending_chars >= EXPORT_PIECE_CHARS:
                joined = "".join(pending)
                whole = len(joined) - len(joined) % EXPORT_PIECE_CHARS
                for at in range(0, whole, EXPORT_PIECE_CHARS):
                    yield joined[at : at + EXPORT_PIECE_CHARS]
                pending = [joined[whole:]]
                pending_chars = len(pending[0])
        # A shred while the pages were read leaves a history that just stops:
        # never hand that out as the member's whole record.
        await load_member(self._store, mid)
        pending.append("]\n}" if first else "\n  ]\n}")
        joined = "".join(pending)
        for at in range(0, len(joined), EXPORT_PIECE_CHARS):
            yield joined[at : at + EXPORT_PIECE_CHARS]

    def _head(
        self,
        view: MemberView,
        row: MemberRow,
        history: list[ConsentEventRow],
        policy_version: str,
        corrections: list[Correction],
    ) -> dict[str, object]:
        """The document but its access history."""
        now = self._clock.now()
        return {
            "format": EXPORT_FORMAT,
            "exported_at": self._clock.now().isoformat(),
            "policy_version": policy_version,
            "privacy_officer": self._settings.privacy_officer_contact,
            "member": {
                "member_id": view.member_id,
                "login_id": view.login_id,
                "name": view.name,
                "email": view.email,
                "mobile_phone": view.mobile_phone or None,
                "password": "kept only as an encrypted argon2id hash; it cannot be exported",
                "created_at": view.created_at.isoformat(),
                "last_seen_at": view.last_seen_at.isoformat(),
            },
            "consents": [
                {
                    "purpose": c.purpose,
                    "granted": c.granted,
                    "policy_version": c.policy_version,
                    "recorded_at": c.recorded_at.isoformat(),
                    "outdated": consent_outdated(c, now),
                }
                for c in row.consents
            ],
            # Append-only, oldest first: every answer, under which version, by whom.
            "consent_history": [consent_event_json(e) for e in history],
            # Requested corrections (section 7), oldest first, with their notes.
            "corrections": [correction_json(c) for c in corrections],
        }
