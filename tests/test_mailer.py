"""The outbox relay against a real SMTP server (aiosmtpd) and real databases.

Messages are enqueued through the Store on both backends for members signed up
through the Vault; the relay resolves the recipient at send time.
"""

from __future__ import annotations

import email
import email.policy
import logging
import stat
import uuid
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest
from mail_support import (
    CONTACT,
    SENDER,
    RecordingHandler,
    SmtpServer,
    body,
    outbox,
    relay_for,
    smtp_mailer,
)
from process_support import free_port
from pydantic import SecretStr
from structlog.testing import capture_logs

from service.config import Settings
from service.mailer import (
    EmlDirectoryMailer,
    RelayPolicy,
    SmtpMailer,
    build_mailer,
    parse_smtp_url,
)
from service.server import RunningServer
from service.wiring import build_sidecar
from vault import FrozenClock, NewMember, Vault
from vault.lifecycle import NOTICE_ITEMS
from vault.mail import (
    INACTIVITY_NOTICE,
    PASSWORD_CHANGED,
    MailRenderer,
    Recipient,
    notice_items,
)
from vault.store.base import OutboxMessage

NAME = "Maximilian Mailtest"
ADDRESS = "maximilian.mailtest@example.com"


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
def server_settings(server_settings: Settings) -> Settings:
    """No in-process sidecar: these tests drive the relay themselves, and a sidecar
    round could otherwise send a message first (to the .eml default)."""
    return server_settings.model_copy(update={"sidecar_in_process": False})


async def sign_up(vault: Vault) -> str:
    return await vault.sign_up(
        NewMember("mailtest01", "a long passphrase", NAME, ADDRESS, "1990-01-01")
    )


def notice(member_id: str, clock: FrozenClock) -> OutboxMessage:
    destroy_at = clock.now() + timedelta(days=30)
    return OutboxMessage(
        message_id=f"{uuid.uuid4()}@privacy-vault",
        member_id=member_id,
        kind=INACTIVITY_NOTICE,
        params={
            "destroy_at": destroy_at.isoformat(),
            "items": "login_id,password,name,email,mobile_phone,access_log",
        },
        created_at=clock.now(),
    )


# --- the relay over SMTP ----------------------------------------------------------------


async def test_notice_is_delivered_once_over_smtp(
    server: RunningServer, clock: FrozenClock, smtp_server: SmtpServer
) -> None:
    store = server.vault.parts.store
    member_id = await sign_up(server.vault)
    message = notice(member_id, clock)
    assert await store.enqueue_outbox(message)
    relay = relay_for(server, smtp_mailer(smtp_server.port), clock)

    result = await relay.relay_once()

    assert (result.sent, result.dropped, result.retried, result.failed) == (1, 0, 0, 0)
    (got,) = smtp_server.handler.received
    assert got.rcpt_tos == [ADDRESS]
    assert got.mail_from == SENDER
    mail = got.message
    assert mail["To"].addresses[0].addr_spec == ADDRESS
    assert mail["To"].addresses[0].display_name == NAME
    assert mail["From"] == SENDER
    assert mail["Message-ID"] == f"<{message.message_id}>"
    assert mail["Subject"] == "Your account will be deleted on 2026-07-15 12:00 UTC"
    text = body(mail)
    assert "15 July 2026 at 12:00 UTC (2026-07-15T12:00:00Z)" in text
    for item in ("your name", "your e-mail address", "your login ID", "your access history"):
        assert item in text
    assert "log in before" in text
    assert CONTACT in text
    assert NAME in text

    assert await outbox(store, clock) == []
    again = await relay.relay_once()
    assert again.sent == 0
    assert len(smtp_server.handler.received) == 1


async def test_recipient_resolved_at_send_time_drops_mail_for_shredded_member(
    server: RunningServer, clock: FrozenClock, smtp_server: SmtpServer
) -> None:
    store = server.vault.parts.store
    member_id = await sign_up(server.vault)
    message = notice(member_id, clock)
    assert await store.enqueue_outbox(message)
    await server.vault.shred(member_id, reason="test")
    # Whether the shred removed the row or left it for the relay: nothing goes out.
    result = await relay_for(server, smtp_mailer(smtp_server.port), clock).relay_once()

    assert result.sent == 0
    assert smtp_server.handler.received == []
    assert await outbox(store, clock) == []


async def test_resolve_recipient_of_a_gone_member_is_none(server: RunningServer) -> None:
    member_id = await sign_up(server.vault)
    recipient = await server.vault.resolve_recipient(member_id)
    assert recipient is not None
    assert (recipient.email, recipient.name) == (ADDRESS, NAME)
    assert ADDRESS not in repr(recipient)
    await server.vault.shred(member_id, reason="test")
    assert await server.vault.resolve_recipient(member_id) is None
    assert await server.vault.resolve_recipient(str(uuid.uuid4())) is None


async def test_smtp_down_is_retried_with_backoff_then_delivered(
    server: RunningServer, clock: FrozenClock
) -> None:
    store = server.vault.parts.store
    member_id = await sign_up(server.vault)
    message = notice(member_id, clock)
    assert await store.enqueue_outbox(message)
    down = SmtpServer(RecordingHandler(), free_port())  # nothing listens: refused
    relay = relay_for(server, smtp_mailer(down.port), clock)

    first = await relay.relay_once()
    assert first.retried == 1
    (queued,) = await outbox(store, clock)
    assert queued.attempts == 1
    assert queued.next_attempt_at == clock.now() + timedelta(seconds=15)  # 30 s, jitter 0
    assert (await relay.relay_once()).retried == 0  # not due yet

    clock.advance(timedelta(seconds=15))
    assert (await relay.relay_once()).retried == 1
    (queued,) = await outbox(store, clock)
    assert queued.attempts == 2
    assert queued.next_attempt_at == clock.now() + timedelta(seconds=30)  # doubled

    down.start()
    try:
        clock.advance(timedelta(seconds=30))
        assert (await relay.relay_once()).sent == 1
    finally:
        down.stop()
    (got,) = down.handler.received
    assert got.message["Message-ID"] == f"<{message.message_id}>"
    assert await outbox(store, clock) == []


async def test_unreachable_server_ends_the_pass_without_burning_attempts(
    server: RunningServer, clock: FrozenClock
) -> None:
    store = server.vault.parts.store
    member_id = await sign_up(server.vault)
    for _ in range(3):
        assert await store.enqueue_outbox(notice(member_id, clock))

    result = await relay_for(server, smtp_mailer(free_port()), clock).relay_once()

    assert (result.retried, result.sent, result.failed) == (1, 0, 0)
    assert sorted(m.attempts for m in await outbox(store, clock)) == [0, 0, 1]


async def test_smtp_451_is_retried_then_delivered(
    server: RunningServer, clock: FrozenClock, smtp_server: SmtpServer
) -> None:
    store = server.vault.parts.store
    member_id = await sign_up(server.vault)
    assert await store.enqueue_outbox(notice(member_id, clock))
    relay = relay_for(server, smtp_mailer(smtp_server.port), clock)
    smtp_server.handler.refuse = "451 4.3.0 Try again later"

    assert (await relay.relay_once()).retried == 1
    (queued,) = await outbox(store, clock)
    assert queued.next_attempt_at is not None
    assert queued.next_attempt_at > clock.now()

    smtp_server.handler.refuse = None
    clock.advance(timedelta(minutes=1))
    assert (await relay.relay_once()).sent == 1
    assert len(smtp_server.handler.received) == 1


async def test_smtp_550_is_not_retried(
    server: RunningServer, clock: FrozenClock, smtp_server: SmtpServer
) -> None:
    store = server.vault.parts.store
    member_id = await sign_up(server.vault)
    assert await store.enqueue_outbox(notice(member_id, clock))
    smtp_server.handler.refuse = "550 5.1.1 No such mailbox"

    result = await relay_for(server, smtp_mailer(smtp_server.port), clock).relay_once()

    assert (result.failed, result.retried) == (1, 0)
    assert await outbox(store, clock) == []


async def test_gives_up_after_max_attempts(server: RunningServer, clock: FrozenClock) -> None:
    store = server.vault.parts.store
    member_id = await sign_up(server.vault)
    assert await store.enqueue_outbox(notice(member_id, clock))
    relay = relay_for(server, smtp_mailer(free_port()), clock, max_attempts=3)

    outcomes = []
    for _ in range(3):
        outcomes.append(await relay.relay_once())
        clock.advance(timedelta(hours=1))

    assert [r.retried for r in outcomes] == [1, 1, 0]
    assert outcomes[-1].failed == 1
    assert await outbox(store, clock) == []


async def test_backoff_is_capped_and_jittered() -> None:
    policy = RelayPolicy()
    assert policy.backoff(1, 0.0) == timedelta(seconds=15)
    assert policy.backoff(1, 0.999) < timedelta(seconds=30)
    assert policy.backoff(3, 0.0) == timedelta(seconds=60)
    assert policy.backoff(500, 0.0) == timedelta(minutes=30)
    assert policy.backoff(500, 0.999) < timedelta(hours=1)


async def test_password_changed_mail(
    server: RunningServer, clock: FrozenClock, smtp_server: SmtpServer
) -> None:
    store = server.vault.parts.store
    member_id = await sign_up(server.vault)
    message = OutboxMessage(
        message_id=str(uuid.uuid4()),
        member_id=member_id,
        kind=PASSWORD_CHANGED,
        params={"via": "reset", "at": clock.now().isoformat()},
        created_at=clock.now(),
    )
    assert await store.enqueue_outbox(message)

    assert (await relay_for(server, smtp_mailer(smtp_server.port), clock).relay_once()).sent == 1

    (got,) = smtp_server.handler.received
    assert got.message["Message-ID"] == f"<{message.message_id}@privacy-vault>"
    assert got.message["Subject"] == "Your password was changed"
    assert "was reset on 15 June 2026 at 12:00 UTC" in body(got.message)
    assert CONTACT in body(got.message)


async def test_no_address_or_name_in_logs(
    server: RunningServer,
    clock: FrozenClock,
    smtp_server: SmtpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = server.vault.parts.store
    member_id = await sign_up(server.vault)
    for _ in range(2):
        assert await store.enqueue_outbox(notice(member_id, clock))
    relay = relay_for(server, smtp_mailer(smtp_server.port), clock)
    caplog.set_level(logging.DEBUG)
    with capture_logs() as events:
        smtp_server.handler.refuse = "451 4.3.0 Try again later for " + ADDRESS
        await relay.relay_once()
        smtp_server.handler.refuse = "550 5.1.1 " + ADDRESS + " unknown"
        clock.advance(timedelta(hours=1))
        await relay.relay_once()
    assert {e["event"] for e in events} >= {"mail_retry", "mail_failed"}
    logged = repr(events) + "".join(
        r.getMessage() for r in caplog.records if not r.name.startswith("mail.log")
    )
    for secret in (ADDRESS, NAME, "mailtest"):
        assert secret not in logged


# --- the .eml mailer -----------------------------------------------------------------------


async def test_eml_mailer_writes_a_private_parseable_file(
    server: RunningServer, clock: FrozenClock, tmp_path: Path
) -> None:
    store = server.vault.parts.store
    member_id = await sign_up(server.vault)
    message = notice(member_id, clock)
    assert await store.enqueue_outbox(message)
    mailer = build_mailer(Settings(data_dir=tmp_path / "data"))
    assert isinstance(mailer, EmlDirectoryMailer)

    assert (await relay_for(server, mailer, clock).relay_once()).sent == 1

    path = tmp_path / "data" / "outbox-mail" / member_id / f"{message.message_id}.eml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed["Message-ID"] == f"<{message.message_id}>"
    assert parsed["To"].addresses[0].addr_spec == ADDRESS
    assert parsed["From"] == "privacy-vault@example.org"
    assert "2026-07-15T12:00:00Z" in body(parsed)


async def test_eml_mailer_refuses_a_path_as_message_id(tmp_path: Path) -> None:
    mail = EmailMessage()
    mail.set_content("x")
    with pytest.raises(ValueError, match="message id"):
        await EmlDirectoryMailer(tmp_path).send("../escape", mail, member_id=str(uuid.uuid4()))


# --- rendering and settings -----------------------------------------------------------------


def test_unknown_kind_is_a_value_error(clock: FrozenClock) -> None:
    message = OutboxMessage("m1", str(uuid.uuid4()), "newsletter", {}, clock.now())
    recipient = Recipient(message.member_id, ADDRESS, NAME)
    with pytest.raises(ValueError, match="unknown"):
        MailRenderer(SENDER, CONTACT).render(message, recipient)


def test_notice_always_lists_name_and_email(clock: FrozenClock) -> None:
    destroy_at = (clock.now() + timedelta(days=30)).isoformat()
    message = OutboxMessage(
        "m1", str(uuid.uuid4()), INACTIVITY_NOTICE, {"destroy_at": destroy_at}, clock.now()
    )
    text = body(MailRenderer(SENDER, CONTACT).render(message, Recipient("x", ADDRESS, NAME)))
    assert "your name" in text
    assert "your e-mail address" in text


def test_smtp_url_parsing_keeps_the_password_out_of_reprs_and_errors() -> None:
    target = parse_smtp_url("smtps://relay%40corp:p%40ss@mail.example.org")
    assert (target.host, target.port, target.implicit_tls) == ("mail.example.org", 465, True)
    assert (target.username, target.password) == ("relay@corp", "p@ss")
    assert "p@ss" not in repr(target)
    assert "p@ss" not in repr(SmtpMailer(target, starttls=None, timeout=1))
    assert parse_smtp_url("smtp://mail.example.org").port == 25
    with pytest.raises(ValueError) as excinfo:
        parse_smtp_url("http://user:hunter2@mail.example.org")
    assert "hunter2" not in str(excinfo.value)
    with pytest.raises(ValueError) as excinfo:
        parse_smtp_url("smtp://user:hunter2@mail.example.org:notaport")
    assert "hunter2" not in str(excinfo.value)
    settings = Settings(smtp_url="smtp://user:hunter2@mail.example.org:2525")
    assert isinstance(build_mailer(settings), SmtpMailer)
    assert "hunter2" not in repr(settings)


def test_every_item_the_lifecycle_names_has_a_label() -> None:
    # The lifecycle writes the items as keys; each must read as words in the notice.
    labels = notice_items(NOTICE_ITEMS)
    assert labels
    assert all(label.startswith("your ") for label in labels), labels


async def test_sidecar_round_sends_the_inactivity_notice_it_enqueued(
    server: RunningServer,
    server_settings: Settings,
    clock: FrozenClock,
    smtp_server: SmtpServer,
) -> None:
    member_id = await sign_up(server.vault)
    settings = server_settings.model_copy(
        update={
            "smtp_url": SecretStr(f"smtp://127.0.0.1:{smtp_server.port}"),
            "mail_from": SENDER,
            "privacy_officer_contact": CONTACT,
        }
    )
    sidecar = build_sidecar(server.vault, settings, interval=1)
    clock.advance(timedelta(days=335))  # a year minus the 30-day notice lead

    try:
        await sidecar.run_round()
    finally:
        await sidecar.release()

    (got,) = smtp_server.handler.received
    assert got.rcpt_tos == [ADDRESS]
    assert "15 June 2027 at 12:00 UTC (2027-06-15T12:00:00Z)" in body(got.message)
    assert CONTACT in body(got.message)
    assert await outbox(server.vault.parts.store, clock) == []
    assert await server.vault.resolve_recipient(member_id) is not None
