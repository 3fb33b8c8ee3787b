"""Issue 8, items 11 and 12: internationalised addresses, and the .eml spool.

Item 11: an address with a non-ASCII local part goes with SMTPUTF8 to a real SMTP
server (aiosmtpd) that offers it, and fails at once, for good, with one clear log
line and no address in it, at a server that does not. ASCII addresses (and an
internationalised domain, sent as IDNA) never need SMTPUTF8.

Item 12: with no SMTP configured, mail is spooled as .eml files in the data
directory, one 0700 folder per member; a shred (Withdraw, with or without
retention, the sidecar's expiry, a shred by another process) deletes the member's
files, and files expire after MAIL_SPOOL_DAYS.

Everything goes through the public gRPC API on both backends; the relay is driven
as tests/test_mailer.py drives it, or by a real sidecar round.
"""

from __future__ import annotations

import email
import email.policy
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path

import grpc
import pytest
import structlog
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from grpc_support import CLIENT_IP, member_session, sign_up_request
from mail_support import TOKEN_IN_MAIL, lf_body, outbox, relay_for, smtp_mailer
from process_support import free_port
from pydantic import SecretStr
from structlog.testing import capture_logs

import service.mailer
import vault.facade
from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from service.config import Settings
from service.server import RunningServer, run_server
from service.wiring import build_sidecar
from vault import CHEAPEST, FrozenClock, open_vault
from vault.lifecycle import RoundReport

INTL_LOCAL = "jisoo.김"
INTL_ADDRESS = f"{INTL_LOCAL}@example.com"
INTL_NAME = "김지수"
IDN_ADDRESS = "jisoo@예시.com"
IDN_ASCII = "jisoo@xn--vv4b11d.com"


# --- a real SMTP server, with SMTPUTF8 on or off -----------------------------------------


@dataclass
class Delivered:
    rcpt_tos: list[str]
    mail_options: list[str]
    smtp_utf8: bool
    message: EmailMessage


@dataclass
class Handler:
    delivered: list[Delivered] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        parsed = _parse(envelope.original_content or b"")
        self.delivered.append(
            Delivered(
                list(envelope.rcpt_tos),
                list(envelope.mail_options),
                bool(envelope.smtp_utf8),
                parsed,
            )
        )
        return "250 Message accepted for delivery"


def _parse(raw: bytes) -> EmailMessage:
    """A mail whose headers may be UTF-8 (RFC 6532): read as text, strictly."""
    parsed = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


@dataclass
class Relay:
    handler: Handler
    port: int


def _smtp(*, smtputf8: bool) -> Iterator[Relay]:
    handler = Handler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, enable_SMTPUTF8=smtputf8)
    controller.start()
    try:
        yield Relay(handler, port)
    finally:
        controller.stop()


@pytest.fixture
def smtputf8_server() -> Iterator[Relay]:
    yield from _smtp(smtputf8=True)


@pytest.fixture
def ascii_only_server() -> Iterator[Relay]:
    yield from _smtp(smtputf8=False)


# --- helpers --------------------------------------------------------------------------


@pytest.fixture
def server_settings(server_settings: Settings) -> Settings:
    """No in-process sidecar: the tests drive the relay (and the rounds) themselves."""
    return server_settings.model_copy(update={"sidecar_in_process": False})


@dataclass
class Logs:
    """What the mailer and the vault logged: structlog events and stdlib records."""

    captured: list[structlog.typing.EventDict]
    caplog: pytest.LogCaptureFixture

    def text(self) -> str:
        return repr(self.captured) + "".join(
            r.getMessage() for r in self.caplog.records if not r.name.startswith("mail.log")
        )

    def events(self, name: str) -> list[structlog.typing.EventDict]:
        return [e for e in self.captured if e["event"] == name]


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Iterator[Logs]:
    """A logger another test cached on first use (configure_logging caches) is made
    to bind again, so the capture sees its events whatever ran before."""
    for module_log in (service.mailer.log, vault.facade.log):
        if "bind" in vars(module_log):
            monkeypatch.delattr(module_log, "bind")
    caplog.set_level(logging.DEBUG)
    with capture_logs() as captured:
        yield Logs(captured, caplog)


async def _sign_up(members: MemberServiceStub, **fields: str) -> tuple[str, pb.SignUpRequest]:
    request = sign_up_request(**fields)
    return (await members.SignUp(request)).member_id, request


async def _ask_reset(members: MemberServiceStub, server: RunningServer, login_id: str) -> None:
    await members.StartPasswordReset(pb.StartPasswordResetRequest(login_id=login_id))
    await server.vault.settle()  # the mail is enqueued after the answer


def _spool(settings: Settings) -> Path:
    return settings.data_dir / "outbox-mail"


def _spooled(settings: Settings, member_id: str) -> list[Path]:
    folder = _spool(settings) / member_id
    return sorted(folder.iterdir()) if folder.exists() else []


def _mail_to(settings: Settings, address: str) -> list[Path]:
    """Spooled files that hold ``address``, wherever in the spool they are."""
    return sorted(p for p in _spool(settings).rglob("*.eml") if address in p.read_text("utf-8"))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def _round(server: RunningServer, settings: Settings) -> RoundReport | None:
    """One real sidecar round (its relay spools the due mail, with no SMTP set)."""
    sidecar = build_sidecar(server.vault, settings, interval=1)
    try:
        return await sidecar.run_round()
    finally:
        await sidecar.release()


async def _two_with_spooled_mail(
    members: MemberServiceStub, server: RunningServer, settings: Settings
) -> tuple[str, pb.SignUpRequest, pb.SignUpRequest]:
    """Two members, a reset mail for each spooled by one round; the first one's id."""
    member_id, request = await _sign_up(members)
    _, other = await _sign_up(members)
    for login_id in (request.login_id, other.login_id):
        await _ask_reset(members, server, login_id)
    await _round(server, settings)
    assert len(_mail_to(settings, request.email)) == 1
    return member_id, request, other


# --- item 11: SMTPUTF8 ---------------------------------------------------------------------


async def test_internationalised_address_is_delivered_with_smtputf8(
    members: MemberServiceStub, server: RunningServer, clock: FrozenClock, smtputf8_server: Relay
) -> None:
    member_id, request = await _sign_up(members, email=INTL_ADDRESS, name=INTL_NAME)
    await _ask_reset(members, server, request.login_id)

    result = await relay_for(server, smtp_mailer(smtputf8_server.port), clock).relay_once()

    assert (result.sent, result.retried, result.failed) == (1, 0, 0)
    (got,) = smtputf8_server.handler.delivered
    assert got.rcpt_tos == [INTL_ADDRESS]
    assert got.smtp_utf8
    assert "SMTPUTF8" in got.mail_options
    (to,) = got.message["To"].addresses
    assert (to.addr_spec, to.display_name) == (INTL_ADDRESS, INTL_NAME)
    assert got.message["Subject"] == "Reset your password"
    text = lf_body(got.message)
    assert f"Dear {INTL_NAME}," in text
    assert len(TOKEN_IN_MAIL.findall(text)) == 1
    assert await outbox(server.vault.parts.store, clock) == []
    assert await server.vault.resolve_recipient(member_id) is not None


async def test_internationalised_address_fails_at_once_without_smtputf8(
    members: MemberServiceStub,
    server: RunningServer,
    clock: FrozenClock,
    ascii_only_server: Relay,
    logged: Logs,
) -> None:
    _, request = await _sign_up(members, email=INTL_ADDRESS, name=INTL_NAME)
    await _ask_reset(members, server, request.login_id)
    relay = relay_for(server, smtp_mailer(ascii_only_server.port), clock)

    first = await relay.relay_once()
    # Given up at the first attempt: nothing is left to retry, even much later.
    assert (first.sent, first.retried, first.failed) == (0, 0, 1)
    assert await outbox(server.vault.parts.store, clock) == []
    clock.advance(timedelta(days=2))
    later = await relay.relay_once()
    assert (later.sent, later.retried, later.failed) == (0, 0, 0)
    assert ascii_only_server.handler.delivered == []

    (failed,) = logged.events("mail_failed")
    assert failed["outcome"] == "needs_smtputf8"
    assert failed["error"] == "SMTPUTF8NotOffered"
    assert failed["attempt"] == 1
    assert "SMTPUTF8" in str(failed["detail"])
    assert logged.events("mail_retry") == []
    text = logged.text()
    for secret in (INTL_ADDRESS, INTL_LOCAL, INTL_NAME, "jisoo", request.login_id):
        assert secret not in text


async def test_ascii_and_idn_addresses_go_without_smtputf8(
    members: MemberServiceStub, server: RunningServer, clock: FrozenClock, ascii_only_server: Relay
) -> None:
    # A non-ASCII name (RFC 2047) and an internationalised domain (IDNA) need no
    # SMTPUTF8; only a non-ASCII local part does.
    _, ascii_member = await _sign_up(members, name=INTL_NAME)
    _, idn_member = await _sign_up(members, email=IDN_ADDRESS, name=INTL_NAME)
    for request in (ascii_member, idn_member):
        await _ask_reset(members, server, request.login_id)

    result = await relay_for(server, smtp_mailer(ascii_only_server.port), clock).relay_once()

    assert (result.sent, result.retried, result.failed) == (2, 0, 0)
    got = {d.rcpt_tos[0]: d for d in ascii_only_server.handler.delivered}
    assert set(got) == {ascii_member.email, IDN_ASCII}
    for delivered in got.values():
        assert not delivered.smtp_utf8
        assert "SMTPUTF8" not in delivered.mail_options
        assert delivered.message["To"].addresses[0].display_name == INTL_NAME
    assert got[IDN_ASCII].message["To"].addresses[0].addr_spec == IDN_ASCII


async def test_internationalised_address_is_spooled_intact(
    members: MemberServiceStub, server: RunningServer, server_settings: Settings, clock: FrozenClock
) -> None:
    member_id, request = await _sign_up(members, email=INTL_ADDRESS, name=INTL_NAME)
    await _ask_reset(members, server, request.login_id)

    await _round(server, server_settings)

    (path,) = _spooled(server_settings, member_id)
    (to,) = _parse(path.read_bytes())["To"].addresses
    assert (to.addr_spec, to.display_name) == (INTL_ADDRESS, INTL_NAME)


# --- item 12: the .eml spool ---------------------------------------------------------------


async def test_spool_is_private_and_foldered_by_member(
    members: MemberServiceStub, server: RunningServer, server_settings: Settings
) -> None:
    # A spool an earlier version left readable by others is tightened.
    _spool(server_settings).mkdir(mode=0o755, parents=True)
    os.chmod(_spool(server_settings), 0o755)  # whatever the umask
    member_id, request = await _sign_up(members)
    await _ask_reset(members, server, request.login_id)

    await _round(server, server_settings)

    (path,) = _spooled(server_settings, member_id)
    assert path.suffix == ".eml"
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert _mode(_spool(server_settings)) == 0o700
    text = path.read_text("utf-8")
    assert request.email in text  # what the spool holds, in clear
    assert len(TOKEN_IN_MAIL.findall(text)) == 1
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


async def test_withdraw_deletes_the_members_spooled_mail(
    members: MemberServiceStub, server: RunningServer, server_settings: Settings
) -> None:
    member_id, request, other = await _two_with_spooled_mail(members, server, server_settings)

    await members.Withdraw(
        pb.WithdrawRequest(member_id=member_id, password=request.password),
        metadata=await member_session(members, request),
    )

    assert _mail_to(server_settings, request.email) == []
    assert not (_spool(server_settings) / member_id).exists()
    assert len(_mail_to(server_settings, other.email)) == 1  # only that member's mail


@pytest.fixture
def retaining_settings(server_settings: Settings, retention_url: str) -> Settings:
    return server_settings.model_copy(
        update={
            "withdrawal_retention_days": 30,
            "retention_database_url": SecretStr(retention_url),
        }
    )


async def test_withdraw_into_retention_deletes_the_members_spooled_mail(
    retaining_settings: Settings, clock: FrozenClock
) -> None:
    async with (
        run_server(retaining_settings, clock=clock) as server,
        grpc.aio.insecure_channel(server.target) as channel,
    ):
        members = MemberServiceStub(channel)
        member_id, request = await _sign_up(members)
        await _ask_reset(members, server, request.login_id)
        await _round(server, retaining_settings)
        assert len(_mail_to(retaining_settings, request.email)) == 1

        outcome = await members.Withdraw(
            pb.WithdrawRequest(member_id=member_id, password=request.password),
            metadata=await member_session(members, request),
        )

        assert outcome.HasField("retained_until")
        assert _mail_to(retaining_settings, request.email) == []
        assert not (_spool(retaining_settings) / member_id).exists()


async def test_spooled_mail_expires_after_mail_spool_days(
    members: MemberServiceStub, server: RunningServer, server_settings: Settings, clock: FrozenClock
) -> None:
    # MAIL_SPOOL_DAYS is 7 by default.
    member_id, request = await _sign_up(members)
    await _ask_reset(members, server, request.login_id)
    await _round(server, server_settings)
    (path,) = _mail_to(server_settings, request.email)
    # A former version's flat file, written at the same time.
    legacy = _spool(server_settings) / "0b7d2a4e-legacy.eml"
    legacy.write_bytes(b"To: someone@example.com\n\nold\n")
    at = clock.now().timestamp()
    os.utime(legacy, (at, at))

    clock.advance(timedelta(days=7) - timedelta(seconds=1))
    await _round(server, server_settings)
    assert path.exists()
    assert legacy.exists()

    clock.advance(timedelta(seconds=2))
    await _round(server, server_settings)
    assert not path.exists()
    assert not legacy.exists()
    assert not (_spool(server_settings) / member_id).exists()
    # The member is still there: only the mail expired.
    assert await server.vault.resolve_recipient(member_id) is not None


async def test_expiry_shred_by_the_sidecar_deletes_the_members_spooled_mail(
    members: MemberServiceStub, server: RunningServer, server_settings: Settings, clock: FrozenClock
) -> None:
    settings = server_settings.model_copy(update={"mail_spool_days": 3650})
    member_id, request = await _sign_up(members)
    _, active = await _sign_up(members)
    for login_id in (request.login_id, active.login_id):
        await _ask_reset(members, server, login_id)
    sidecar = build_sidecar(server.vault, settings, interval=1)
    try:
        await sidecar.run_round()
        clock.advance(timedelta(days=335))  # a year less the notice lead: notices go out
        await members.Authenticate(
            pb.AuthenticateRequest(login_id=active.login_id, password=active.password),
            metadata=CLIENT_IP,
        )
        await sidecar.run_round()
        assert len(_mail_to(settings, request.email)) == 2  # the reset mail and the notice
        assert len(_mail_to(settings, active.email)) == 1

        clock.advance(timedelta(days=30))  # the year is over: the member is shredded
        report = await sidecar.run_round()
    finally:
        await sidecar.release()
    assert report is not None
    assert report.shredded == 1
    assert _mail_to(settings, request.email) == []
    assert not (_spool(settings) / member_id).exists()
    assert len(_mail_to(settings, active.email)) == 1


async def test_relay_deletes_spooled_mail_of_a_member_shredded_by_another_process(
    members: MemberServiceStub, server: RunningServer, server_settings: Settings, clock: FrozenClock
) -> None:
    member_id, request, other = await _two_with_spooled_mail(members, server, server_settings)

    # Another process's vault (no hook into this process's spool) shreds the member.
    database_url = server_settings.database_url
    async with open_vault(
        data_dir=server_settings.data_dir,
        database_url=database_url.get_secret_value() if database_url else None,
        argon2=CHEAPEST,
        clock=clock,
    ) as elsewhere:
        await elsewhere.shred(member_id, reason="test")
    assert len(_mail_to(server_settings, request.email)) == 1

    await _round(server, server_settings)  # its relay finds the member gone

    assert _mail_to(server_settings, request.email) == []
    assert not (_spool(server_settings) / member_id).exists()
    assert len(_mail_to(server_settings, other.email)) == 1
