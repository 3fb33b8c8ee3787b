"""Rendering outbox messages into e-mails (no SMTP here; see ``service.mailer``).

An :class:`~vault.store.base.OutboxMessage` holds no personal data: the member's
address and name are resolved at send time (:meth:`vault.Vault.resolve_recipient`)
and only then put into the mail. The same message renders to the same mail on
every retry, Message-ID included, so a receiver can drop a duplicate delivery.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime

from vault.store.base import OutboxMessage

INACTIVITY_NOTICE = "inactivity_notice"
PASSWORD_CHANGED = "password_changed"  # noqa: S105 - a message kind, not a password
KINDS = frozenset({INACTIVITY_NOTICE, PASSWORD_CHANGED})

# Message ids become a header and a file name: keep them to a safe alphabet.
# "<uuid>" and "<uuid>@<domain>" (already a Message-ID's shape) both fit.
_MESSAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[A-Za-z0-9][A-Za-z0-9.-]{0,127})?")

# Item keys (as the lifecycle names them) -> the words a member reads.
_ITEM_LABELS = {
    "login_id": "your login ID",
    "password": "your password",
    "password_hash": "your password",
    "name": "your name",
    "email": "your e-mail address",
    "mobile_phone": "your mobile phone number",
    "consents": "your consent records",
    "access_log": "your access history (IP addresses, access dates and times, service use)",
}
# Section 6: "All personal data of the member including the name and e-mail address".
_ALWAYS_LISTED = ("name", "email")


@dataclass(frozen=True, slots=True)
class Recipient:
    """Where a member's mail goes, decrypted at send time. Never logged."""

    member_id: str
    email: str
    name: str

    def __repr__(self) -> str:
        return f"<Recipient {self.member_id}>"


def check_message_id(message_id: str) -> str:
    """The id itself if it is safe in a header and as a file name; else ValueError."""
    if not _MESSAGE_ID.fullmatch(message_id):
        raise ValueError("outbox message id is not of the form local[@domain]")
    return message_id


def message_id_header(message_id: str) -> str:
    """The Message-ID header for an outbox id: ``<id>`` or ``<id@privacy-vault>``."""
    check_message_id(message_id)
    return f"<{message_id}>" if "@" in message_id else f"<{message_id}@privacy-vault>"


def parse_utc(value: str) -> datetime:
    """An ISO 8601 time with an offset, in UTC; ValueError for a naive or bad one."""
    at = datetime.fromisoformat(value)
    if at.tzinfo is None:
        raise ValueError("times in outbox params must carry a UTC offset")
    return at.astimezone(UTC)


def format_utc(at: datetime) -> str:
    """Unambiguous for any reader: spelled-out month, 24-hour clock, UTC, and ISO."""
    at = at.astimezone(UTC)
    iso = at.strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{at.day} {at:%B %Y} at {at:%H:%M} UTC ({iso})"


def notice_items(raw: str | None) -> list[str]:
    """Item keys from a JSON list or a comma-separated string; name and e-mail always."""
    keys: list[str] = []
    if raw:
        parsed = json.loads(raw) if raw.lstrip().startswith("[") else raw.split(",")
        keys = [str(k).strip() for k in parsed if str(k).strip()]
    for key in _ALWAYS_LISTED:
        if key not in keys:
            keys.append(key)
    labels: list[str] = []
    for key in keys:
        label = _ITEM_LABELS.get(key, key.replace("_", " "))
        if label not in labels:
            labels.append(label)
    return labels


class MailRenderer:
    """Turns an outbox message and its resolved recipient into an EmailMessage."""

    def __init__(self, sender: str, privacy_officer_contact: str) -> None:
        self._sender = sender
        self._contact = privacy_officer_contact

    def render(self, message: OutboxMessage, recipient: Recipient) -> EmailMessage:
        """ValueError for an unknown kind or malformed params."""
        if message.kind == INACTIVITY_NOTICE:
            subject, body = self._inactivity_notice(message, recipient)
        elif message.kind == PASSWORD_CHANGED:
            subject, body = self._password_changed(message, recipient)
        else:
            raise ValueError(f"unknown outbox message kind {message.kind!r}")
        mail = EmailMessage()
        mail["From"] = self._sender
        mail["To"] = Address(display_name=recipient.name, addr_spec=recipient.email)
        mail["Subject"] = subject
        # The outbox id, not a fresh one: a retry after an unconfirmed delivery is
        # then recognisably the same mail.
        mail["Message-ID"] = message_id_header(message.message_id)
        mail["Date"] = format_datetime(message.created_at.astimezone(UTC))
        mail.set_content(body)
        return mail

    def _inactivity_notice(self, message: OutboxMessage, recipient: Recipient) -> tuple[str, str]:
        if "destroy_at" not in message.params:
            raise ValueError("inactivity_notice needs a destroy_at param")
        destroy_at = parse_utc(message.params["destroy_at"])
        when = format_utc(destroy_at)
        items = "\n".join(f"  - {label}" for label in notice_items(message.params.get("items")))
        subject = f"Your account will be deleted on {destroy_at:%Y-%m-%d %H:%M} UTC"
        body = (
            f"Dear {recipient.name},\n\n"
            "You have not logged in to your account for almost a year. To protect your\n"
            "personal data, your account and all of your personal data will be\n"
            f"permanently destroyed on {when}.\n\n"
            "The personal data to be destroyed is all personal data we hold about you,\n"
            "including:\n"
            f"{items}\n\n"
            f"To keep your account, log in before {when}. Logging in cancels the\n"
            "deletion; nothing else is needed.\n\n"
            "If you have questions about your personal data, contact\n"
            f"{self._contact}.\n"
        )
        return subject, body

    def _password_changed(self, message: OutboxMessage, recipient: Recipient) -> tuple[str, str]:
        via = message.params.get("via", "change")
        if via not in ("change", "reset"):
            raise ValueError("password_changed: via must be 'change' or 'reset'")
        at = message.params.get("at")
        when = f" on {format_utc(parse_utc(at))}" if at else ""
        how = "reset" if via == "reset" else "changed"
        body = (
            f"Dear {recipient.name},\n\n"
            f"The password of your account was {how}{when}.\n\n"
            "If you did this, no action is needed. If you did not, reset your password\n"
            f"at once and contact {self._contact}.\n"
        )
        return "Your password was changed", body
