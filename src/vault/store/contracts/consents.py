"""Consent over time: the members' consent histories and the published policy versions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

from vault.store.rows import ConsentEventRow, NewConsent, OutboxMessage, PolicyVersionRow


class ConsentStore(Protocol):
    """A member's answers are appended to their history and become the purpose's
    current answer (``consents``, which the member read aggregates) in one
    transaction. Policy versions are published once and never changed; the notices
    of one are queued page by page (the sidecar), each page with its cursor."""

    async def record_consents(
        self,
        member_id: str,
        answers: Sequence[NewConsent],
        at: datetime,
        *,
        recorded_by: str,
        caller: str,
        default_version: str,
    ) -> list[ConsentEventRow] | None:
        """Append one event per answer (in order) and make each the purpose's current
        answer, under the member's row lock, in one transaction. The policy version
        recorded is the newest one published at or before ``at``, else
        ``default_version``. None, with nothing written, if there is no such member."""
        ...

    async def list_consent_events(
        self, member_id: str, limit: int, before_event_id: int | None = None
    ) -> list[ConsentEventRow]:
        """The member's history, newest first, older than the cursor when given."""
        ...

    async def publish_policy_version(self, version: PolicyVersionRow) -> None:
        """Record a version and its changed purposes in one transaction;
        AlreadyExists("policy_version") if the version is taken."""
        ...

    async def list_policy_versions(self) -> list[PolicyVersionRow]:
        """Every published version, oldest first."""
        ...

    async def current_policy_version(self, at: datetime) -> str | None:
        """The newest version published at or before ``at``; None before any."""
        ...

    async def versions_with_pending_notices(self, limit: int) -> list[str]:
        """Versions whose notices are not all queued yet, oldest first."""
        ...

    async def queue_policy_notices(
        self, version: str, limit: int, notice: Callable[[str], OutboxMessage]
    ) -> tuple[int, bool]:
        """One page of a version's notices, in one transaction: the next ``limit``
        members (by id, after the version's cursor) whose current grant to one of its
        changed purposes was recorded before its publication get ``notice(member_id)``
        enqueued; the cursor moves past them, and a short page marks the version done.
        Returns (notices queued, whether the version is done). A member gone
        meanwhile is skipped."""
        ...
