"""Mail for tests: a real SMTP server (aiosmtpd) that records what it accepts, the
outbox relay of a running test server, and reading what a message says."""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass, field
from datetime import timedelta
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from service.mailer import Mailer, OutboxRelay, RelayPolicy, SmtpMailer, parse_smtp_url
from service.server import RunningServer
from vault import FrozenClock
from vault.mail import MailRenderer
from vault.store.base import OutboxMessage, Store

CONTACT = "privacy@example.org, +82 2 0000 0000"
SENDER = "privacy-vault@example.org"
#: A recovery token as the mails show it: alone on its line, indented four spaces.
TOKEN_IN_MAIL = re.compile(r"^    ([A-Za-z0-9_-]{43})$", re.MULTILINE)


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage


@dataclass
class RecordingHandler:
    """Records what it accepts; ``refuse`` makes it answer RCPT with that reply."""

    received: list[Received] = field(default_factory=list)
    refuse: str | None = None

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.refuse is not None:
            return self.refuse
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        parsed = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.received.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos), parsed))
        return "250 Message accepted for delivery"


@dataclass
class SmtpServer:
    handler: RecordingHandler
    port: int
    controller: Controller | None = None

    def start(self) -> None:
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


def smtp_mailer(port: int) -> SmtpMailer:
    return SmtpMailer(parse_smtp_url(f"smtp://127.0.0.1:{port}"), starttls=None, timeout=5)


def relay_for(
    server: RunningServer, mailer: Mailer, clock: FrozenClock, **policy: Any
) -> OutboxRelay:
    return OutboxRelay(
        server.vault.outbox,
        server.vault,
        mailer,
        MailRenderer(SENDER, CONTACT),
        clock,
        RelayPolicy(**policy),
        jitter=lambda: 0.0,  # the shortest backoff: deterministic times to assert
    )


async def outbox(store: Store, clock: FrozenClock) -> list[OutboxMessage]:
    """Everything still queued, due or not."""
    return await store.due_outbox(clock.now() + timedelta(days=3650), 1000)


def body(message: EmailMessage) -> str:
    """The plain-text part, as received (CRLF line ends)."""
    part = message.get_body(("plain",))
    assert part is not None
    return str(part.get_content())  # type: ignore[attr-defined]


def lf_body(message: EmailMessage) -> str:
    """The plain-text part with the wire's CRLF line ends made LF."""
    return body(message).replace("\r\n", "\n")


def mail_token(text: str) -> str:
    """The one recovery token in a mail's text (with LF line ends)."""
    (token,) = TOKEN_IN_MAIL.findall(text)
    return str(token)
