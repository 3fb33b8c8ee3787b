"""Rendering outbox messages into e-mails (no SMTP here; see ``service.mailer``).

An :class:`~vault.store.base.OutboxMessage` holds no personal data: the member's
address and name are resolved at send time (:meth:`vault.Vault.resolve_recipient`)
and only then put into the mail. The same message renders to the same mail on
every retry, Message-ID included, so a receiver can drop a duplicate delivery.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses
from typing import Protocol

from email_validator import EmailNotValidError, validate_email

from vault.store.base import OutboxMessage as OutboxMessage  # re-exported: the relay's type
from vault.store.base import OutboxStore

INACTIVITY_NOTICE = "inactivity_notice"
PASSWORD_CHANGED = "password_changed"  # noqa: S105 - a message kind, not a password
LOGIN_ID_REMINDER = "login_id_reminder"
PASSWORD_RESET = "password_reset"  # noqa: S105 - a message kind, not a password
#: To the old address, after the member's e-mail address was changed.
EMAIL_CHANGED = "email_changed"
#: A published privacy policy version changes purposes the member consented to.
POLICY_CHANGED = "policy_changed"
#: To a third party that received a value since corrected (policy section 7): not
#: to the member. It goes to the recipient's contact address (sealed "to") and
#: carries only the corrected values of fields it received (sealed "value_<field>").
CORRECTION_NOTICE = "correction_notice"
KINDS = frozenset(
    {
        INACTIVITY_NOTICE,
        PASSWORD_CHANGED,
        LOGIN_ID_REMINDER,
        PASSWORD_RESET,
        EMAIL_CHANGED,
        POLICY_CHANGED,
        CORRECTION_NOTICE,
    }
)
#: A correction notice's sealed param for a field's corrected value.
CORRECTED_VALUE_PREFIX = "value_"
# A param named "sealed_<name>" is a secret encrypted under the member's DEK (see
# Vault.start_password_reset); it is opened at send time into Recipient.unsealed[name].
SEALED_PREFIX = "sealed_"
#: A sealed param of this name is the address the mail goes to instead of the
#: member's current one (an e-mail change notice goes to the old address).
SEALED_RECIPIENT = "to"

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
# Purpose keys -> the words a member reads; a configured purpose reads as its key.
_PURPOSE_LABELS = {
    "INQUIRY": "answering your inquiries (name, e-mail, mobile phone)",
    "STATISTICS": "user statistics to improve the service",
}


def _purpose_label(key: str) -> str:
    return _PURPOSE_LABELS.get(key, key.replace("_", " ").lower())


# Section 6: "All personal data of the member including the name and e-mail address".
_ALWAYS_LISTED = ("name", "email")


class MailOutbox(OutboxStore, Protocol):
    """The store slice the mail relay takes (handed out as :attr:`vault.Vault.outbox`):
    the outbox, and whether a member is gone (their spooled mail goes with them)."""

    async def is_destroyed(self, member_id: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class Recipient:
    """Where a member's mail goes, decrypted at send time. Never logged."""

    member_id: str
    email: str
    name: str
    login_id: str = ""
    # The message's sealed params, decrypted at send time: name -> value.
    unsealed: Mapping[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"<Recipient {self.member_id}>"


def mailbox(address: str) -> tuple[str, str]:
    """(local part, domain) of a stored address, ready for a header and the SMTP
    envelope. An internationalised domain is given in its ASCII (IDNA) form, so only a
    non-ASCII local part needs SMTPUTF8 (RFC 6531). ValueError, never quoting the
    address, if it does not parse."""
    try:
        parsed = validate_email(address, check_deliverability=False)
    except EmailNotValidError:
        raise ValueError("the recipient's address is not a valid e-mail address") from None
    return parsed.local_part, parsed.ascii_domain or parsed.domain


def needs_smtputf8(mail: EmailMessage) -> bool:
    """Whether an envelope address of ``mail`` (From, To) is not ASCII: it can then be
    sent only to a server that offers SMTPUTF8, and written only as UTF-8 headers.
    (A non-ASCII display name or subject needs no such thing: RFC 2047 encodes it.)"""
    values = [str(v) for name in ("From", "To") for v in mail.get_all(name, [])]
    return any(not addr.isascii() for _, addr in getaddresses(values))


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
        elif message.kind == LOGIN_ID_REMINDER:
            subject, body = self._login_id_reminder(recipient)
        elif message.kind == PASSWORD_RESET:
            subject, body = self._password_reset(message, recipient)
        elif message.kind == EMAIL_CHANGED:
            subject, body = self._email_changed(message, recipient)
        elif message.kind == POLICY_CHANGED:
            subject, body = self._policy_changed(message, recipient)
        elif message.kind == CORRECTION_NOTICE:
            subject, body = self._correction_notice(message, recipient)
        else:
            raise ValueError(f"unknown outbox message kind {message.kind!r}")
        mail = EmailMessage()
        mail["From"] = self._sender
        # Built from its parts: Address(addr_spec=...) refuses a non-ASCII local part
        # (NonASCIILocalPartDefect) although SMTPUTF8 delivers it.
        local_part, domain = mailbox(recipient.unsealed.get(SEALED_RECIPIENT, recipient.email))
        # A third party's notice is addressed to the recipient, never by the member's name.
        display = (
            message.params.get("legal_entity", "")
            if message.kind == CORRECTION_NOTICE
            else recipient.name
        )
        mail["To"] = Address(display_name=display, username=local_part, domain=domain)
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

    def _email_changed(self, message: OutboxMessage, recipient: Recipient) -> tuple[str, str]:
        # To the old address, which must not learn the new one: the body names none.
        if SEALED_RECIPIENT not in recipient.unsealed:
            raise ValueError("email_changed needs its sealed old address, opened at send time")
        at = message.params.get("at")
        when = f" on {format_utc(parse_utc(at))}" if at else ""
        body = (
            f"Dear {recipient.name},\n\n"
            f"The e-mail address of your account was changed{when}. This address\n"
            "will no longer receive mail about your account, such as password resets.\n\n"
            "If you did this, no action is needed. If you did not, someone may have\n"
            f"taken over your account: contact {self._contact} at once.\n"
        )
        return "The e-mail address of your account was changed", body

    def _policy_changed(self, message: OutboxMessage, recipient: Recipient) -> tuple[str, str]:
        version = message.params.get("version", "")
        purposes = [p for p in message.params.get("purposes", "").split(",") if p]
        if not version or not purposes or "effective_at" not in message.params:
            raise ValueError("policy_changed needs version, purposes and effective_at params")
        effective_at = parse_utc(message.params["effective_at"])
        when = format_utc(effective_at)
        changed = "\n".join(f"  - {_purpose_label(p)}" for p in purposes)
        body = (
            f"Dear {recipient.name},\n\n"
            f"We have published version {version} of our privacy policy. It changes how\n"
            "we use your personal data for these purposes, to which you had consented:\n"
            f"{changed}\n\n"
            f"The new version applies from {when}. From then on we will\n"
            "not use your data for these purposes until you have read the new version\n"
            "and given your consent again; you may also refuse it. Your other consents\n"
            "stay as they are.\n\n"
            f"If you have questions about your personal data, contact {self._contact}.\n"
        )
        return f"Our privacy policy changes on {effective_at:%Y-%m-%d}: your consent", body

    def _correction_notice(self, message: OutboxMessage, recipient: Recipient) -> tuple[str, str]:
        """Only what the recipient received before (the disclosure references, the
        field names) and the corrected values of those fields: no other data of the
        member, and not the old values."""
        p = message.params
        fields = [f for f in p.get("fields", "").split(",") if f]
        references = p.get("references", "")
        if SEALED_RECIPIENT not in recipient.unsealed or not fields or not references:
            raise ValueError("correction_notice needs its sealed address, fields and references")
        if "applied_at" not in p or "correction_id" not in p:
            raise ValueError("correction_notice needs applied_at and correction_id params")
        values = []
        for name in fields:
            value = recipient.unsealed.get(CORRECTED_VALUE_PREFIX + name)
            if value is None:
                raise ValueError("correction_notice needs each field's sealed corrected value")
            label = _ITEM_LABELS.get(name, name).removeprefix("your ")
            values.append(f"  - {label}: {value or '(removed)'}")
        listed = "\n".join(values)
        body = (
            f"To {p.get('legal_entity', 'the recipient')},\n\n"
            "We provided you with personal data of one of our members (our disclosure\n"
            f"references {references}, under contract {p.get('contract', '-')}). The\n"
            "member has had data we provided corrected; under our privacy policy\n"
            "(section 7) we tell you the result so that you can correct your records.\n"
            "The corrected values are:\n\n"
            f"{listed}\n\n"
            f"Corrected on {format_utc(parse_utc(p['applied_at']))}; our correction\n"
            f"reference is {p['correction_id']}. Please replace the values you hold and\n"
            "use only the corrected ones from now on.\n\n"
            f"If you have questions, contact {self._contact}.\n"
        )
        return f"Correction of personal data we provided (ref. {references})", body

    def _login_id_reminder(self, recipient: Recipient) -> tuple[str, str]:
        if not recipient.login_id:
            raise ValueError("login_id_reminder needs the recipient's login ID")
        body = (
            f"Dear {recipient.name},\n\n"
            "You asked for the login ID of the account registered with this e-mail\n"
            "address. Your login ID is:\n\n"
            f"    {recipient.login_id}\n\n"
            "If you did not ask for it, you can ignore this e-mail; nothing has changed.\n"
            f"If you have questions, contact {self._contact}.\n"
        )
        return "Your login ID", body

    def _password_reset(self, message: OutboxMessage, recipient: Recipient) -> tuple[str, str]:
        token = recipient.unsealed.get("token")
        if not token:
            raise ValueError("password_reset needs its sealed token, opened at send time")
        if "expires_at" not in message.params:
            raise ValueError("password_reset needs an expires_at param")
        when = format_utc(parse_utc(message.params["expires_at"]))
        body = (
            f"Dear {recipient.name},\n\n"
            "Someone (we hope you) asked to reset the password of your account.\n"
            "To choose a new password, enter this reset code on the password reset\n"
            "page, together with your new password:\n\n"
            f"    {token}\n\n"
            f"The code works once, and only until {when}.\n"
            "Do not share it: anyone who has it can set a new password for your account.\n\n"
            "If you did not ask for a reset, ignore this e-mail: your password stays as it\n"
            f"is. If this keeps happening, contact {self._contact}.\n"
        )
        return "Reset your password", body
