"""The caller policy file and the start-up rules around it (issue 10, item 1).

The parser refuses every malformed file with a message naming the entry and the rule
broken, never quoting the file; x-forwarded-client-cert and peer parsing; and, through
the real CLI in subprocesses, production refusing to start without TLS, a client CA
and a caller policy (each one), and any start beyond loopback without a policy."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from process_support import STARTUP_TIMEOUT, ServerProcess, cli_env, free_port, run_cli
from tls_support import TestPki

from service.caller_policy import CallerPolicyInvalid, parse_policy
from service.callers import _loopback, forwarded_uri, policy_methods
from service.server import POLICY_SERVICES

METHODS = policy_methods(POLICY_SERVICES)
MARKER = "zz-file-contents-zz"
HEAD = 'trust_domain = "example.org"\n'


def _entry(**fields: str) -> str:
    body = "".join(f"{k} = {v}\n" for k, v in fields.items())
    return f"[[caller]]\n{body}"


GOOD = _entry(
    identity='"spiffe://example.org/ns/a/sa/b"',
    methods='["MemberService/GetMember", "KeyAdminService/RotateKek"]',
    purposes='["INQUIRY", "IDENTIFICATION"]',
    description='"a caller"',
)

INVALID = {
    "toml-syntax": (f'{HEAD}[[caller]\nidentity = "{MARKER}', "not valid TOML"),
    "no-trust-domain": (GOOD, "trust_domain is required"),
    "bad-trust-domain": (f'trust_domain = "Example.org/{MARKER}"\n', "trust_domain is required"),
    "unknown-top-key": (f"{HEAD}{MARKER} = 1\n", "unknown top-level key"),
    "unknown-caller-key": (
        HEAD + GOOD + f'{MARKER} = "x"\n',
        "caller[0] (spiffe://example.org/ns/a/sa/b): 1 unknown key(s)",
    ),
    "no-identity": (HEAD + _entry(methods='["MemberService/SignUp"]'), "caller[0]: identity"),
    "foreign-identity": (
        HEAD + _entry(identity='"spiffe://other.org/ns/a/sa/b"', methods="[]"),
        "caller[0] (spiffe://other.org/ns/a/sa/b): identity must be a SPIFFE ID spiffe://example.org/",
    ),
    "malformed-identity": (
        HEAD + _entry(identity='"spiffe://example.org/a//b"', methods="[]"),
        "caller[0]: identity must be",
    ),
    "unknown-method": (
        HEAD + _entry(identity='"local"', methods=f'["MemberService/{MARKER}"]'),
        "caller[0] (local): methods[0] is not a method of the API",
    ),
    "wildcard-method": (
        HEAD + _entry(identity='"local"', methods='["MemberService/*"]'),
        "no wildcards",
    ),
    "unknown-purpose": (
        HEAD
        + _entry(
            identity='"local"', methods='["MemberService/GetMember"]', purposes=f'["{MARKER}"]'
        ),
        "caller[0] (local): purposes[0] is not a purpose",
    ),
    "prefixed-purpose": (
        HEAD
        + _entry(
            identity='"local"',
            methods='["MemberService/GetMember"]',
            purposes='["PURPOSE_INQUIRY"]',
        ),
        "purposes[0] is not a purpose",
    ),
    "purpose-method-without-purposes": (
        HEAD + _entry(identity='"local"', methods='["MemberService/GetMember"]'),
        "no purposes",
    ),
    "purposes-without-a-purpose-method": (
        HEAD
        + _entry(identity='"local"', methods='["MemberService/SignUp"]', purposes='["INQUIRY"]'),
        "no method that states a purpose",
    ),
    "methods-not-a-list": (
        HEAD + _entry(identity='"local"', methods='"MemberService/SignUp"'),
        "methods must be a list of strings",
    ),
    "duplicate-identity": (
        HEAD + GOOD + GOOD.replace('"a caller"', '"again"'),
        "caller[1] (spiffe://example.org/ns/a/sa/b): the same identity as caller[0]",
    ),
    "caller-not-a-table-array": (f'{HEAD}caller = "{MARKER}"\n', "array of tables"),
}


@pytest.mark.parametrize(("text", "expected"), INVALID.values(), ids=INVALID.keys())
def test_an_invalid_policy_is_refused_naming_the_entry(text: str, expected: str) -> None:
    with pytest.raises(CallerPolicyInvalid) as caught:
        parse_policy(text, METHODS)
    assert expected in caught.value.message
    assert MARKER not in caught.value.message


def test_a_valid_policy_allows_what_it_names_only() -> None:
    prefix = _entry(
        identity='"spiffe://example.org/ns/*"',
        methods='["MemberService/RecordAccess"]',
    )
    policy = parse_policy(HEAD + GOOD + prefix, METHODS)
    b = "spiffe://example.org/ns/a/sa/b"
    assert policy.allows(b, "MemberService/GetMember", "INQUIRY")
    assert not policy.allows(b, "MemberService/GetMember", "MEMBER_REQUEST")
    assert policy.allows(b, "KeyAdminService/RotateKek")
    assert not policy.allows(b, "MemberService/RecordAccess")  # its exact entry wins
    assert policy.allows("spiffe://example.org/ns/c/sa/d", "MemberService/RecordAccess")
    assert not policy.allows("spiffe://example.org/nsx/c", "MemberService/RecordAccess")
    assert not policy.allows("local", "MemberService/RecordAccess")
    assert policy.rules[0].description == "a caller"


def test_every_method_of_the_api_is_known_and_only_reads_state_a_purpose() -> None:
    # Reads state a purpose; so does Disclose, providing for one (policy section 4).
    assert {m for m, purpose in METHODS.items() if purpose} == {
        "MemberService/GetMember",
        "StatisticsService/GetStatistics",
        "DisclosureService/Disclose",
    }
    assert "MemberService/SignUp" in METHODS
    assert "KeyAdminService/ListKeyEvents" in METHODS


XFCC = {
    "By=spiffe://e.org/envoy;Hash=ab;URI=spiffe://e.org/a": "spiffe://e.org/a",
    'Hash=ab;Subject="CN=x, O=y;z";uri=spiffe://e.org/b': "spiffe://e.org/b",
    'Subject="a\\"b,c";URI="spiffe://e.org/c"': "spiffe://e.org/c",
    "URI=spiffe://e.org/a,URI=spiffe://e.org/b": None,  # two elements
    "URI=spiffe://e.org/a;URI=spiffe://e.org/b": None,  # two URIs
    "By=spiffe://e.org/envoy;Hash=ab": None,  # none
    "": None,
}


@pytest.mark.parametrize(("header", "uri"), XFCC.items())
def test_xfcc_parsing(header: str, uri: str | None) -> None:
    assert forwarded_uri(header) == uri


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        ("ipv4:127.0.0.1:5000", True),
        ("ipv4:127.3.2.1:5000", True),
        ("ipv6:[::1]:5000", True),
        ("unix:/run/vault.sock", True),
        ("ipv4:192.0.2.7:5000", False),
        ("ipv6:[::ffff:192.0.2.7]:5000", False),
        ("ipv6:[2001:db8::1]:5000", False),
        ("garbage", False),
    ],
)
def test_loopback_peers(peer: str, loopback: bool) -> None:
    assert _loopback(peer) is loopback


# --- start-up (server processes) -------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki.create(tmp_path_factory.mktemp("pki"))


def _env(tmp_path: Path, **settings: str) -> dict[str, str]:
    defaults = {
        "sidecar_in_process": "false",
        "log_format": "json",
        "listen_address": f"127.0.0.1:{free_port()}",
    }
    return cli_env(tmp_path / "data", **(defaults | settings))


def _production(pki: TestPki, policy: Path, leave_out: str = "") -> dict[str, str]:
    settings = pki.production_settings(policy)
    if leave_out == "tls_cert_file":  # no TLS at all (a client CA alone is refused anyway)
        settings.pop("tls_key_file")
        settings.pop("tls_client_ca_file")
    settings.pop(leave_out, None)
    return settings


@pytest.mark.parametrize("missing", ["tls_cert_file", "tls_client_ca_file", "caller_policy_file"])
def test_production_refuses_to_start_without_each_requirement(
    tmp_path: Path, pki: TestPki, missing: str
) -> None:
    policy = tmp_path / "callers.toml"
    policy.write_text(HEAD + GOOD)
    env = _env(tmp_path, **_production(pki, policy, leave_out=missing))
    result = run_cli(["serve"], env, tmp_path, timeout=STARTUP_TIMEOUT)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "environment production needs TLS, a client CA and a caller policy" in result.stderr
    assert f"PRIVACY_VAULT_{missing.upper()}" in result.stderr
    assert not (tmp_path / "data").exists()


def test_a_start_beyond_loopback_needs_a_policy(tmp_path: Path) -> None:
    env = _env(tmp_path, listen_address=f"0.0.0.0:{free_port()}")
    result = run_cli(["serve"], env, tmp_path, timeout=STARTUP_TIMEOUT)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "beyond loopback needs PRIVACY_VAULT_CALLER_POLICY_FILE" in result.stderr


def test_an_invalid_policy_file_refuses_the_start_without_quoting_it(tmp_path: Path) -> None:
    policy = tmp_path / "callers.toml"
    policy.write_text(HEAD + _entry(identity='"local"', methods=f'["{MARKER}"]'))
    env = _env(tmp_path, caller_policy_file=str(policy))
    result = run_cli(["serve"], env, tmp_path, timeout=STARTUP_TIMEOUT)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "caller[0] (local): methods[0] is not a method of the API" in result.stderr
    assert MARKER not in result.stdout + result.stderr


def test_production_starts_with_tls_a_client_ca_and_a_policy(tmp_path: Path, pki: TestPki) -> None:
    policy = tmp_path / "callers.toml"
    policy.write_text(HEAD + GOOD)
    env = _env(tmp_path, **_production(pki, policy))
    server = ServerProcess(env, tmp_path, tmp_path / "serve.log")
    try:
        client = pki.client("spiffe://example.org/ns/probe/sa/health")
        credentials = grpc.ssl_channel_credentials(pki.ca_pem, client.key, client.cert)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        with grpc.secure_channel(server.target, credentials) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert server.process.poll() is None, server.log_text()
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, server.log_text()
                    time.sleep(0.1)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert server.terminate()[0] == 0
    finally:
        server.close()
    said = [e for e in server.events() if e.get("event") == "caller_identity"]
    assert said
    assert said[0]["identity"] == "client certificate (SPIFFE ID)"
    assert said[0]["trust_domain"] == "example.org"
