"""Sending the outbox: mailers (SMTP, or .eml files) and the relay that drives them.

The relay resolves each message's recipient at send time, so mail for a member
shredded after it was enqueued is dropped, and retries transient failures with
exponential backoff and jitter. Delivery is at least once (a crash between the
send and ``outbox_sent`` sends again): the Message-ID is the outbox id, stable
across retries, so receivers can tell a duplicate.

Logs name the message id, kind, attempt and outcome: never an address, a name or
the server's reply text (which may echo the address).

An address with a non-ASCII local part (``jisoo.김@example.com``) goes with
SMTPUTF8 (RFC 6531) when the server offers it; when it does not, the message fails
at once for good (``outcome=needs_smtputf8``): no retry would change the server.

Without SMTP, mail is spooled as .eml files (:mod:`service.mail_spool`), which hold
what the mails say in clear: they are foldered by member, deleted when the member is
shredded and when they are older than the spool's expiry.
"""

from __future__ import annotations

import email.policy
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

import aiosmtplib
import structlog

from service.config import Settings
from service.mail_spool import DEFAULT_SPOOL_KEEP, MailSpool, mail_spool
from vault import Clock
from vault.mail import (
    MailOutbox,
    MailRenderer,
    OutboxMessage,
    Recipient,
    check_message_id,
    needs_smtputf8,
)

log = structlog.get_logger("service.mailer")


class MailError(Exception):
    """A delivery failed. ``reason`` is an exception type name, never server text."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason if code is None else f"{reason} ({code})")
        self.reason = reason
        self.code = code


class TransientMailError(MailError):
    """Worth retrying: the server is down, slow, or said "try later" (4xx)."""


class MailServerUnavailable(TransientMailError):
    """No conversation with the server at all: the next message would fail the same way."""


class PermanentMailError(MailError):
    """The server refused this mail for good (5xx to the recipient or the data)."""

    outcome = "refused"


class Smtputf8Unavailable(PermanentMailError):
    """The mail needs SMTPUTF8 (a non-ASCII local part) and the server does not offer it."""

    outcome = "needs_smtputf8"
    #: For the log line (no address in it): what happened, and what would fix it.
    detail = (
        "an address of this mail (the recipient's, or MAIL_FROM) has a non-ASCII local "
        "part, which needs SMTPUTF8, and the mail server does not offer SMTPUTF8; "
        "the mail is not sent and not retried"
    )

    def __init__(self) -> None:
        super().__init__("SMTPUTF8NotOffered")


class UnrenderableMail(PermanentMailError):
    """The message cannot be made into a mail (bad params, an unusable address): it
    never will be, so it is not retried."""

    outcome = "unrenderable"


class Mailer(Protocol):
    async def send(self, message_id: str, mail: EmailMessage, *, member_id: str) -> None:
        """Deliver ``mail``, a mail to member ``member_id``; MailError if it was not."""
        ...


# --- SMTP ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SmtpTarget:
    host: str
    port: int
    implicit_tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_smtp_url(url: str) -> SmtpTarget:
    """smtp://[user:pass@]host[:port] (port 25) or smtps://... (implicit TLS, port 465).

    Error messages never quote the URL: it may hold a password.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps"):
        raise ValueError("smtp_url must start with smtp:// or smtps://")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("smtp_url has an invalid port") from None
    if not parts.hostname:
        raise ValueError("smtp_url has no host")
    implicit_tls = parts.scheme == "smtps"
    return SmtpTarget(
        host=parts.hostname,
        port=port or (465 if implicit_tls else 25),
        implicit_tls=implicit_tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


class SmtpMailer:
    """One SMTP connection per message: simple, and a broken one never lingers."""

    def __init__(self, target: SmtpTarget, *, starttls: bool | None, timeout: float) -> None:
        if target.implicit_tls and starttls:
            raise ValueError("smtps:// is already TLS; smtp_starttls applies to smtp:// only")
        self._target = target
        # None: STARTTLS when the server offers it; implicit TLS needs none.
        self._starttls = False if target.implicit_tls else starttls
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"<SmtpMailer {self._target.host}:{self._target.port}>"

    async def send(self, message_id: str, mail: EmailMessage, *, member_id: str) -> None:
        t = self._target
        utf8 = needs_smtputf8(mail)
        client = aiosmtplib.SMTP(
            hostname=t.host,
            port=t.port,
            username=t.username,
            password=t.password,
            use_tls=t.implicit_tls,
            start_tls=self._starttls,
            timeout=self._timeout,
        )
        try:
            async with client:
                if utf8 and not await _offers_smtputf8(client):
                    raise Smtputf8Unavailable
                try:
                    # aiosmtplib adds SMTPUTF8 and UTF-8 headers itself for such a mail;
                    # an ASCII one goes as before, whatever the server offers.
                    await client.send_message(mail)
                except aiosmtplib.SMTPNotSupported:
                    if utf8:  # aiosmtplib's own check of the same extension
                        raise Smtputf8Unavailable from None
                    raise
        # `from None` throughout: the server's text may echo the recipient's address.
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            permanent = bool(codes) and all(code >= 500 for code in codes)
            cls = PermanentMailError if permanent else TransientMailError
            raise cls(type(exc).__name__, min(codes, default=None)) from None
        except (aiosmtplib.SMTPRecipientRefused, aiosmtplib.SMTPDataError) as exc:
            cls = PermanentMailError if exc.code >= 500 else TransientMailError
            raise cls(type(exc).__name__, exc.code) from None
        except aiosmtplib.SMTPResponseException as exc:
            # Sender refused, authentication, HELO: configuration, which an operator
            # can fix while we retry.
            raise TransientMailError(type(exc).__name__, exc.code) from None
        except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            raise MailServerUnavailable(type(exc).__name__) from None
        except aiosmtplib.SMTPException as exc:
            raise TransientMailError(type(exc).__name__) from None


async def _offers_smtputf8(client: aiosmtplib.SMTP) -> bool:
    """Whether the connected server lists SMTPUTF8 in its EHLO reply (a server that
    knows only HELO does not)."""
    if client.is_ehlo_or_helo_needed:
        try:
            await client.ehlo()
        except aiosmtplib.SMTPHeloError:
            return False
    return client.supports_extension("smtputf8")


# --- .eml files (the embedded default) ------------------------------------------------

_UTF8_HEADERS = email.policy.default.clone(utf8=True)


class EmlDirectoryMailer:
    """Writes each mail into the :class:`MailSpool` (0600, atomically): with no SMTP
    server configured, mail stays on disk for a developer or an operator, for a while."""

    def __init__(
        self, data_dir: Path, keep: timedelta = DEFAULT_SPOOL_KEEP, clock: Clock | None = None
    ) -> None:
        self.spool = MailSpool(data_dir, keep, clock)
        self.directory = self.spool.directory

    def __repr__(self) -> str:
        return f"<EmlDirectoryMailer {self.directory}>"

    async def send(self, message_id: str, mail: EmailMessage, *, member_id: str) -> None:
        check_message_id(message_id)
        # An internationalised address is written as UTF-8 headers (RFC 6532): as
        # encoded words it would be another, wrong, address.
        data = mail.as_bytes(policy=_UTF8_HEADERS) if needs_smtputf8(mail) else mail.as_bytes()
        try:
            await self.spool.write(member_id, message_id, data)
        except OSError as exc:  # disk full, permissions: retry, an operator can fix it
            raise TransientMailError(type(exc).__name__) from None


def build_mailer(settings: Settings, clock: Clock | None = None) -> Mailer:
    """SMTP when ``smtp_url`` is set, else .eml files in the data directory."""
    if settings.smtp_url is None:
        return EmlDirectoryMailer(
            settings.data_dir, timedelta(days=settings.mail_spool_days), clock
        )
    return SmtpMailer(
        parse_smtp_url(settings.smtp_url.get_secret_value()),
        starttls=settings.smtp_starttls,
        timeout=settings.smtp_timeout_seconds,
    )


# --- the relay --------------------------------------------------------------------------


class RecipientResolver(Protocol):
    """Satisfied by :class:`vault.Vault`."""

    async def resolve_recipient(
        self, member_id: str, message: OutboxMessage | None = None
    ) -> Recipient | None:
        """With ``message``, its sealed params are opened into ``Recipient.unsealed``."""
        ...


@dataclass(frozen=True, slots=True)
class RelayPolicy:
    max_attempts: int = 24
    base_delay: timedelta = timedelta(seconds=30)
    max_delay: timedelta = timedelta(hours=1)
    batch_size: int = 100
    #: Batches per pass at most, so one pass stays bounded.
    max_batches: int = 50

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.batch_size < 1 or self.max_batches < 1:
            raise ValueError("max_attempts, batch_size and max_batches must be at least 1")
        if self.base_delay <= timedelta(0) or self.max_delay < self.base_delay:
            raise ValueError("need 0 < base_delay <= max_delay")

    def backoff(self, attempts: int, jitter: float) -> timedelta:
        """The wait after the ``attempts``-th failure: base * 2^(attempts-1), capped,
        then scaled into [1/2, 1] by ``jitter`` in [0, 1) so that messages failed by
        one outage do not all come back in the same second."""
        exponent = min(attempts - 1, 32)  # past the cap anyway; keeps the number small
        delay: timedelta = min(self.base_delay * (1 << exponent), self.max_delay)
        return delay * (0.5 + 0.5 * jitter)


@dataclass(slots=True)
class RelayResult:
    sent: int = 0
    dropped: int = 0  # the member is gone
    retried: int = 0
    failed: int = 0  # given up or refused for good
    #: Spooled .eml files deleted: expired, or of members who no longer exist.
    spool_expired: int = 0
    spool_shredded: int = 0


_system_random = secrets.SystemRandom()


class OutboxRelay:
    """Sends due outbox messages; run :meth:`relay_once` from the sidecar's round
    (only the lease holder does, so two relays do not send the same message)."""

    def __init__(
        self,
        store: MailOutbox,
        recipients: RecipientResolver,
        mailer: Mailer,
        renderer: MailRenderer,
        clock: Clock,
        policy: RelayPolicy | None = None,
        *,
        jitter: Callable[[], float] = _system_random.random,
        spool: MailSpool | None = None,
    ) -> None:
        self._store = store
        self._recipients = recipients
        self._mailer = mailer
        self._renderer = renderer
        self._clock = clock
        self._policy = policy or RelayPolicy()
        self._jitter = jitter
        # The .eml mailer's own spool, else the one given (an earlier run's files).
        self._spool = mailer.spool if isinstance(mailer, EmlDirectoryMailer) else spool

    async def relay_once(self) -> RelayResult:
        """One pass over the due messages. Each ends sent, dropped, rescheduled or
        given up, so a pass never sees the same message twice."""
        result = RelayResult()
        for _ in range(self._policy.max_batches):
            due = await self._store.due_outbox(self._clock.now(), self._policy.batch_size)
            unavailable = False
            for message in due:
                if not await self._relay(message, result):
                    unavailable = True
                    break
            if unavailable or len(due) < self._policy.batch_size:
                break
        if self._spool is not None:
            swept = await self._spool.sweep(self._store.is_destroyed)
            result.spool_expired, result.spool_shredded = swept.expired, swept.shredded
        if any((result.sent, result.dropped, result.retried, result.failed)) or any(
            (result.spool_expired, result.spool_shredded)
        ):
            log.info(
                "outbox_relayed",
                sent=result.sent,
                dropped=result.dropped,
                retried=result.retried,
                failed=result.failed,
                spool_expired=result.spool_expired,
                spool_shredded=result.spool_shredded,
            )
        return result

    async def _relay(self, message: OutboxMessage, result: RelayResult) -> bool:
        """Send one message; False if the mail server is unreachable. The pass then
        stops: the rest stay due, keep their attempts, and the pass stays short (each
        would wait out the timeout) so the sidecar keeps its lease."""
        attempt = message.attempts + 1
        fields: dict[str, str | int] = {
            "message_id": message.message_id,
            "kind": message.kind,
            "attempt": attempt,
        }
        try:
            recipient = await self._recipients.resolve_recipient(message.member_id, message)
            if recipient is None:
                await self._store.outbox_sent(message.message_id)
                result.dropped += 1
                log.info("mail_dropped", outcome="member_gone", **fields)
                return True
            try:
                mail = self._renderer.render(message, recipient)
            except ValueError as exc:  # no retry renders it: bad params, a bad address
                raise UnrenderableMail(type(exc).__name__) from None
            await self._mailer.send(message.message_id, mail, member_id=message.member_id)
        except PermanentMailError as exc:
            # Marked done (it is never sent): the outbox keeps no failed mail.
            await self._store.outbox_sent(message.message_id)
            result.failed += 1
            if isinstance(exc, Smtputf8Unavailable):
                fields["detail"] = exc.detail
            log.warning(
                "mail_failed", outcome=exc.outcome, error=exc.reason, code=exc.code, **fields
            )
            return True
        except Exception as exc:  # noqa: BLE001 - one bad message must not stall the queue
            await self._failed(message, result, exc, fields)
            return not isinstance(exc, MailServerUnavailable)
        await self._store.outbox_sent(message.message_id)
        result.sent += 1
        log.info("mail_sent", outcome="sent", **fields)
        return True

    async def _failed(
        self,
        message: OutboxMessage,
        result: RelayResult,
        exc: Exception,
        fields: dict[str, str | int],
    ) -> None:
        attempts = message.attempts + 1
        # Only the type and SMTP code: exception text may hold the address.
        error = exc.reason if isinstance(exc, MailError) else type(exc).__name__
        code = exc.code if isinstance(exc, MailError) else None
        if attempts >= self._policy.max_attempts:
            await self._store.outbox_sent(message.message_id)
            result.failed += 1
            log.warning("mail_failed", outcome="given_up", error=error, code=code, **fields)
            return
        next_at = self._clock.now() + self._policy.backoff(attempts, self._jitter())
        await self._store.outbox_retry(message.message_id, attempts, next_at)
        result.retried += 1
        log.info(
            "mail_retry",
            outcome="retry",
            error=error,
            code=code,
            next_attempt_at=next_at.isoformat(),
            **fields,
        )


def build_relay(
    settings: Settings, store: MailOutbox, recipients: RecipientResolver, clock: Clock
) -> OutboxRelay:
    """The relay as ``settings`` describe it (the sidecar's way in)."""
    return OutboxRelay(
        store,
        recipients,
        build_mailer(settings, clock),
        MailRenderer(settings.mail_from, settings.privacy_officer_contact),
        clock,
        RelayPolicy(max_attempts=settings.mail_max_attempts),
        spool=mail_spool(settings, clock),
    )
