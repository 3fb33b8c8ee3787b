"""No personal data at rest or in logs, proven with canaries.

The issue's requirement: "A test signs up members with canary values and proves
that no canary appears in the SQLite files or in a pg_dump of the PostgreSQL
database, nor in captured logs." Every request field that carries personal data
gets a distinctive value; the test drives the happy and the failing paths of the
API, then searches the raw database bytes, a pg_dump, the captured debug logs
and the errors returned to the client for any encoding of any canary.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1 import member_pb2_grpc
from service.config import Settings
from service.logs import configure_logging
from service.server import RunningServer

# --- canaries and the search for them -------------------------------------------------


@dataclass(frozen=True)
class Person:
    login_id: str
    password: str
    name: str
    email: str
    mobile_phone: str
    mobile_phone_normalized: str

    def values(self) -> list[str]:
        return [
            self.login_id,
            self.password,
            self.name,
            self.email,
            self.mobile_phone,
            self.mobile_phone_normalized,
        ]


PEOPLE = [
    Person(
        "cnryLoginAlpha7Q",
        "CnryPassAlpha!93kd",
        "Canary Alphaname Zqx",
        "canary.alpha.z9q@example.org",
        "+82 10-7346-9182",
        "+821073469182",
    ),
    Person(
        "cnryLoginBeta8W",
        "CnryPassBeta#27hs",
        "카나리아김철수",
        "canary.beta.k4w@example.net",
        "010 5813 2764",
        "01058132764",
    ),
    Person(
        "cnryLoginGamma9E",
        "CnryPassGamma%61pq",
        "Cañary Gammaname Ünïcode",
        "canary.gamma.u7e@example.com",
        "(415) 555-0193",
        "4155550193",
    ),
]
CLIENT_IP = "198.51.100.77"
ACTION = "cnryAction.zq7:view/orders"
RENAMED = "카나리아새이름 Renamed"
REMAILED = "canary.renamed.w4m@example.net"
NEW_PASSWORD = "CnryNewPass#55xv"
WRONG_PASSWORD = "CnryWrongPw%31mz"
UNKNOWN_LOGIN = "cnryUnknownLogin4R"
BAD_EMAIL = "cnryBadMail-no-at-sign.example"
BAD_PHONE = "cnryPhone-12ab"
BAD_IP = "cnryBadIp.198.51.100.300"
DUPLICATE_NAME = "Canary Duplicatename Pkv"
DUPLICATE_EMAIL = "canary.duplicate.p8k@example.org"
BIRTH_DATE = "1987-11-23"  # checked for the minimum age, never stored

CANARIES: list[str] = [
    *(value for person in PEOPLE for value in person.values()),
    CLIENT_IP,
    ACTION,
    RENAMED,
    REMAILED,
    NEW_PASSWORD,
    WRONG_PASSWORD,
    UNKNOWN_LOGIN,
    BAD_EMAIL,
    BAD_PHONE,
    BAD_IP,
    DUPLICATE_NAME,
    DUPLICATE_EMAIL,
    BIRTH_DATE,
]


def _forms(canary: str) -> set[bytes]:
    """The byte patterns under which a canary could be stored or logged."""
    texts = {canary, canary.lower(), canary.casefold(), canary.upper()}
    # JSON (ensure_ascii) escapes, as a JSON log line or a JSON column would hold them.
    texts |= {json.dumps(t)[1:-1] for t in list(texts)}
    forms: set[bytes] = set()
    for text in texts:
        utf8 = text.encode("utf-8")
        forms |= {utf8, text.encode("utf-16-le"), text.encode("utf-16-be")}
        # bytea hex output (pg_dump) and hex dumps.
        forms |= {utf8.hex().encode(), utf8.hex().upper().encode()}
    return forms


CANARY_FORMS: dict[str, set[bytes]] = {canary: _forms(canary) for canary in CANARIES}


def find_canaries(data: bytes | str) -> list[str]:
    """The canaries found in ``data`` in any of their forms, case-insensitively for ASCII."""
    blob = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    folded = blob.lower()
    found = []
    for canary, forms in CANARY_FORMS.items():
        if any(form in blob or form.lower() in folded for form in forms):
            found.append(canary)
    return found


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda s: s.encode(), id="utf-8"),
        pytest.param(lambda s: s.encode("utf-16-le"), id="utf-16-le"),
        pytest.param(lambda s: s.upper().encode(), id="upper-case"),
        pytest.param(lambda s: json.dumps({"v": s}).encode(), id="json-escaped"),
        pytest.param(lambda s: ("\\x" + s.encode().hex()).encode(), id="bytea-hex"),
    ],
)
def test_search_finds_planted_canaries(encode: object) -> None:
    # The positive control: the same search the test below relies on does find
    # every canary planted in noise, so its silence there means something.
    assert callable(encode)
    for canary in CANARIES:
        haystack = b"\x00\xffnoise " + encode(canary) + b" more noise\x13"
        assert canary in find_canaries(haystack), canary
    assert find_canaries(b"nothing to see: member_signed_up 2026-06-15") == []


# --- logs into a buffer, configured before the server starts ------------------------


class _LogSink(io.TextIOBase):
    """One stream for the whole session, re-pointed per test.

    ``configure_logging`` caches each logger on first use, so a second call with a
    new stream does not reach loggers already used; a stable sink whose target
    changes avoids depending on that.
    """

    def __init__(self) -> None:
        self.target: TextIO | None = None

    def write(self, text: str) -> int:
        return (self.target or sys.stderr).write(text)

    def flush(self) -> None:
        (self.target or sys.stderr).flush()

    def isatty(self) -> bool:
        return False


_SINK = _LogSink()


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    _SINK.target = buffer
    configure_logging(level="debug", fmt="json", stream=_SINK)
    try:
        yield buffer
    finally:
        _SINK.target = None
        configure_logging()


@pytest.fixture
def server_settings(server_settings: Settings, retention_url: str) -> Settings:
    """conftest's settings with withdrawals retained: the copy is at rest too."""
    return Settings(
        **server_settings.model_dump()
        | {"retention_database_url": retention_url, "withdrawal_retention_days": 30}
    )


@pytest.fixture
def server(captured_logs: io.StringIO, server: RunningServer) -> RunningServer:
    """conftest's server, started only after the logs go into ``captured_logs``."""
    return server


# --- the scenario ---------------------------------------------------------------------

META = (("x-client-ip", CLIENT_IP),)


@dataclass
class ClientErrors:
    texts: list[bytes]

    def add(self, error: grpc.aio.AioRpcError) -> None:
        self.texts.append((error.details() or "").encode())
        for key, value in error.trailing_metadata() or ():
            self.texts.append(value if isinstance(value, bytes) else f"{key}={value}".encode())


async def _expect_error(
    errors: ClientErrors, code: grpc.StatusCode, call: object
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    errors.add(caught.value)
    return caught.value


def _sign_up(person: Person) -> pb.SignUpRequest:
    return pb.SignUpRequest(
        login_id=person.login_id,
        password=person.password,
        name=person.name,
        email=person.email,
        mobile_phone=person.mobile_phone,
        birth_date=BIRTH_DATE,
    )


async def _drive_api(members: member_pb2_grpc.MemberServiceStub, errors: ClientErrors) -> list[str]:
    """Every RPC, happy and failing, with canaries in every personal field. Returns exports."""
    member_ids = []
    sessions: list[tuple[tuple[str, str], ...]] = []  # each member's own session
    for person in PEOPLE:
        response = await members.SignUp(_sign_up(person))
        member_ids.append(response.member_id)
        auth = await members.Authenticate(
            pb.AuthenticateRequest(login_id=person.login_id, password=person.password),
            metadata=META,
        )
        assert auth.member_id == response.member_id
        sessions.append((("x-member-session", auth.session_token),))
        await members.RecordAccess(
            pb.RecordAccessRequest(member_id=response.member_id, action=ACTION, ip=CLIENT_IP)
        )

    first, second, _ = member_ids
    updated = await members.UpdateMember(
        pb.UpdateMemberRequest(
            member_id=first,
            name=RENAMED,
            email=REMAILED,
            update_mask=FieldMask(paths=["name", "email"]),
            current_password=PEOPLE[0].password,
        ),
        metadata=sessions[0],
    )
    assert updated.member.name == RENAMED
    await members.ChangePassword(
        pb.ChangePasswordRequest(
            member_id=first, current_password=PEOPLE[0].password, new_password=NEW_PASSWORD
        ),
        metadata=sessions[0],
    )
    again = await members.Authenticate(
        pb.AuthenticateRequest(login_id=PEOPLE[0].login_id, password=NEW_PASSWORD), metadata=META
    )
    sessions[0] = (("x-member-session", again.session_token),)  # the change ended the old

    # Failing calls, so the error paths log too.
    duplicate = _sign_up(PEOPLE[1])
    duplicate.name, duplicate.email = DUPLICATE_NAME, DUPLICATE_EMAIL
    await _expect_error(errors, grpc.StatusCode.ALREADY_EXISTS, members.SignUp(duplicate))
    await _expect_error(
        errors,
        grpc.StatusCode.ALREADY_EXISTS,
        members.UpdateMember(
            pb.UpdateMemberRequest(
                member_id=second,
                email=PEOPLE[2].email,
                update_mask=FieldMask(paths=["email"]),
                current_password=PEOPLE[1].password,
            ),
            metadata=sessions[1],
        ),
    )
    await _expect_error(
        errors,
        grpc.StatusCode.UNAUTHENTICATED,
        members.Authenticate(
            pb.AuthenticateRequest(login_id=PEOPLE[1].login_id, password=WRONG_PASSWORD),
            metadata=META,
        ),
    )
    await _expect_error(
        errors,
        grpc.StatusCode.UNAUTHENTICATED,
        members.Authenticate(
            pb.AuthenticateRequest(login_id=UNKNOWN_LOGIN, password=WRONG_PASSWORD), metadata=META
        ),
    )
    await _expect_error(
        errors,
        grpc.StatusCode.INVALID_ARGUMENT,
        members.Authenticate(
            pb.AuthenticateRequest(login_id=PEOPLE[1].login_id, password=PEOPLE[1].password),
            metadata=(("x-client-ip", BAD_IP),),
        ),
    )
    bad_sign_up = pb.SignUpRequest(
        login_id=UNKNOWN_LOGIN,
        password=WRONG_PASSWORD,
        name=DUPLICATE_NAME,
        email=BAD_EMAIL,
        mobile_phone=BAD_PHONE,
        birth_date=BIRTH_DATE,
    )
    await _expect_error(errors, grpc.StatusCode.INVALID_ARGUMENT, members.SignUp(bad_sign_up))
    await _expect_error(
        errors,
        grpc.StatusCode.INVALID_ARGUMENT,
        members.UpdateMember(
            pb.UpdateMemberRequest(
                member_id=second,
                email=BAD_EMAIL,
                mobile_phone=BAD_PHONE,
                update_mask=FieldMask(paths=["email", "mobile_phone"]),
                current_password=PEOPLE[1].password,
            ),
            metadata=sessions[1],
        ),
    )
    await _expect_error(
        errors,
        grpc.StatusCode.UNAUTHENTICATED,
        members.ChangePassword(
            pb.ChangePasswordRequest(
                member_id=second, current_password=WRONG_PASSWORD, new_password=NEW_PASSWORD
            ),
            metadata=sessions[1],
        ),
    )
    await _expect_error(
        errors,
        grpc.StatusCode.INVALID_ARGUMENT,
        members.RecordAccess(pb.RecordAccessRequest(member_id=second, action=ACTION, ip=BAD_IP)),
    )

    exports = []
    for member_id, session in zip(member_ids, sessions, strict=True):
        export = pb.ExportMemberDataRequest(member_id=member_id)
        exports.append((await members.ExportMemberData(export, metadata=session)).json)
    # The third withdraws: their data moves to the retention database, at rest there.
    withdrawn = await members.Withdraw(
        pb.WithdrawRequest(member_id=member_ids[2], password=PEOPLE[2].password),
        metadata=sessions[2],
    )
    assert withdrawn.WhichOneof("outcome") == "retained_until"
    return exports


async def _pg_dump(url: str) -> bytes:
    process = await asyncio.create_subprocess_exec(
        "pg_dump",
        "--no-owner",
        "--dbname",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode(errors="replace")
    return stdout


def documents_member_id(export: str) -> str:
    return str(json.loads(export)["member"]["member_id"])


def _files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


async def test_no_canary_at_rest_in_logs_or_errors(
    server: RunningServer,
    members: member_pb2_grpc.MemberServiceStub,
    captured_logs: io.StringIO,
    server_settings: Settings,
    backend: str,
    tmp_path: Path,
    retention_url: str,
) -> None:
    errors = ClientErrors([])
    exports = await _drive_api(members, errors)
    # Positive control for the retention database: the withdrawn member's canaries
    # are really in it (decryptable by the privacy officer's tool), as ciphertext.
    disclosed = await server.vault.retention.disclose(
        documents_member_id(exports[2]), "canary-test", "test"
    )
    assert disclosed["member"]["name"] == PEOPLE[2].name

    # The data really went in and comes back out: the export holds the canaries.
    documents = [json.loads(text) for text in exports]
    assert documents[0]["member"]["name"] == RENAMED
    assert documents[1]["member"]["name"] == PEOPLE[1].name
    assert documents[2]["member"]["mobile_phone"] == PEOPLE[2].mobile_phone_normalized
    assert {e["action"] for e in documents[0]["access_history"]} >= {ACTION, "authenticate"}
    assert {e["ip"] for e in documents[0]["access_history"]} == {CLIENT_IP}
    assert RENAMED in find_canaries(exports[0])
    assert PEOPLE[1].name in find_canaries(exports[1])

    # Errors returned to the client name fields, never the submitted values.
    assert len(errors.texts) >= 9
    for text in errors.texts:
        assert find_canaries(text) == [], text

    # At rest.
    if backend == "sqlite":
        database_url = server_settings.database_url
        assert database_url is not None
        db_file = Path(database_url.get_secret_value().removeprefix("sqlite:///"))
        assert db_file.parent == tmp_path
        files = _files_under(tmp_path)
        assert db_file.name in files
        assert any(name.startswith("data/kek") for name in files)
        assert "data/retention.db" in files
        # Every file under tmp_path (the database, -wal, -shm, the data dir, its key
        # file) as raw bytes, while the server is still running and nothing is
        # checkpointed.
        for name, content in files.items():
            assert find_canaries(content) == [], name
    else:
        dump = await _pg_dump(server_settings.database_url.get_secret_value())  # type: ignore[union-attr]
        assert b"CREATE TABLE" in dump
        assert b"COPY " in dump  # the data itself is dumped, not only the schema
        assert find_canaries(dump) == []
        retained_dump = await _pg_dump(retention_url)
        assert b"COPY public.retained_members" in retained_dump
        assert find_canaries(retained_dump) == []
        for name, content in _files_under(server_settings.data_dir).items():
            assert find_canaries(content) == [], name

    # Logs: the capture works (these events are there), and carries no canary.
    log_text = captured_logs.getvalue()
    events = [json.loads(line)["event"] for line in log_text.splitlines() if line.strip()]
    assert "member_signed_up" in events
    assert "rpc_refused" in events
    assert "rpc_ok" in events  # debug level is on
    assert find_canaries(log_text) == []
