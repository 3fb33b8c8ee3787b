"""``privacy-vault keys`` in subprocesses, on SQLite and PostgreSQL: JSON lines on stdout,
the exit codes scripts rely on, and no key material or personal data in any output."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_support import CLIENT_IP, sign_up_request
from process_support import cli_env, run_cli

from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from service.config import Settings
from service.server import run_server
from vault import FrozenClock

OK, REFUSED, USAGE, UNAVAILABLE, NOT_FOUND = 0, 1, 2, 3, 4
UNKNOWN_MEMBER = "00000000-0000-4000-8000-000000000000"


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines()]

    @property
    def error(self) -> dict[str, Any]:
        (line,) = self.stderr.strip().splitlines()[-1:]
        parsed: dict[str, Any] = json.loads(line)
        return parsed


class KeysCli:
    """``python -m service keys ...`` on one vault; keeps every byte it printed."""

    def __init__(self, settings: Settings, cwd: Path) -> None:
        env = cli_env(settings.data_dir, log_format="json")
        env.pop("USER", None)
        if settings.database_url is not None:
            env["PRIVACY_VAULT_DATABASE_URL"] = settings.database_url.get_secret_value()
        self.env = env
        self.cwd = cwd
        self.printed: list[str] = []

    def __call__(self, *args: str, **env: str) -> Run:
        done = run_cli(["keys", *args], {**self.env, **env}, self.cwd)
        self.printed += [done.stdout, done.stderr]
        return Run(done.returncode, done.stdout, done.stderr)


def _kek_material(settings: Settings) -> set[str]:
    doc = json.loads((settings.data_dir / "kek.json").read_text())
    return set(doc["versions"].values())


async def _sign_up(settings: Settings, clock: FrozenClock, n: int) -> dict[str, pb.SignUpRequest]:
    signed: dict[str, pb.SignUpRequest] = {}
    async with (
        run_server(settings, clock=clock) as running,
        grpc.aio.insecure_channel(running.target) as ch,
    ):
        members = MemberServiceStub(ch)
        for _ in range(n):
            request = sign_up_request()
            signed[(await members.SignUp(request)).member_id] = request
    return signed


async def _all_read(
    settings: Settings, clock: FrozenClock, signed: dict[str, pb.SignUpRequest]
) -> None:
    async with (
        run_server(settings, clock=clock) as running,
        grpc.aio.insecure_channel(running.target) as ch,
    ):
        members = MemberServiceStub(ch)
        for member_id, request in signed.items():
            auth = await members.Authenticate(
                pb.AuthenticateRequest(login_id=request.login_id, password=request.password),
                metadata=CLIENT_IP,
            )
            assert auth.member_id == member_id
            member = (
                await members.GetMember(
                    pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_MEMBER_REQUEST),
                    metadata=(("x-member-session", auth.session_token),),
                )
            ).member
            assert (member.login_id, member.email) == (request.login_id, request.email)


def _versions(run: Run) -> dict[int, dict[str, Any]]:
    (status,) = run.lines
    assert status["type"] == "status"
    return {v["version"]: v for v in status["versions"]}


async def test_keys_cli_rotate_rewrap_destroy(
    server_settings: Settings, clock: FrozenClock, tmp_path: Path
) -> None:
    signed = await _sign_up(server_settings, clock, 10)
    cli = KeysCli(server_settings, tmp_path)
    material = _kek_material(server_settings)

    status = cli("status")
    assert status.code == OK, status.stderr
    (line,) = status.lines
    assert (line["provider"], line["active_version"]) == ("local", 1)
    assert _versions(status)[1] | {"created_at": None} == {
        "version": 1,
        "state": "active",
        "created_at": None,
        "destroyed_at": None,
        "member_keys": 10,
        "index_keys": 1,
        "retained_keys": 0,
    }

    rotated = cli("rotate", "--actor", "sec-team")
    assert rotated.code == OK, rotated.stderr
    assert [(r["type"], r["version"], r["previous_version"]) for r in rotated.lines] == [
        ("rotated", 2, 1)
    ]
    material |= _kek_material(server_settings)
    versions = _versions(cli("status"))
    assert (versions[1]["state"], versions[2]["state"]) == ("decrypt_only", "active")

    # Version 1 still wraps every key: the plan says so, and the real thing is refused.
    plan = cli("destroy-version", "1", "--dry-run")
    assert plan.code == REFUSED
    (line,) = plan.lines
    assert (line["type"], line["version"], line["allowed"]) == ("destroy_plan", 1, False)
    assert "10 member keys" in line["reason"]
    refused = cli("destroy-version", "1")
    assert refused.code == REFUSED
    assert refused.stdout == ""
    assert (refused.error["error"], refused.error["exit_code"]) == ("refused", REFUSED)
    assert "10 member keys" in refused.error["message"]
    active = cli("destroy-version", "2")
    assert active.code == REFUSED
    assert "active" in active.error["message"]
    assert cli("destroy-version", "2", "--dry-run").code == REFUSED
    assert cli("destroy-version", "9", "--dry-run").code == NOT_FOUND

    dry = cli("rewrap", "--dry-run")
    assert dry.code == OK
    assert [(r["type"], r["total"], r["done"], r["dry_run"]) for r in dry.lines] == [
        ("rewrap_progress", 11, True, True)
    ]
    assert _versions(cli("status"))[1]["member_keys"] == 10

    rewrap = cli("rewrap", "--batch-size", "3")
    assert rewrap.code == OK, rewrap.stderr
    steps = rewrap.lines
    assert {s["type"] for s in steps} == {"rewrap_progress"}
    assert [s["done"] for s in steps] == [False] * 4 + [True]  # 10 keys in batches of 3
    assert [s["batches"] for s in steps] == [1, 2, 3, 4, 4]
    last = steps[-1]
    assert (last["target_version"], last["total"], last["rewrapped"], last["skipped"]) == (
        2,
        11,
        11,
        0,
    )

    plan = cli("destroy-version", "1", "--dry-run")
    assert plan.code == OK
    assert plan.lines[0]["allowed"] is True
    destroyed = cli("destroy-version", "1", "--actor", "sec-team")
    assert destroyed.code == OK, destroyed.stderr
    assert [(r["type"], r["version"]) for r in destroyed.lines] == [("destroyed", 1)]
    versions = _versions(cli("status"))
    assert versions[1]["state"] == "destroyed"
    assert versions[1]["destroyed_at"] is not None
    assert (versions[2]["member_keys"], versions[2]["index_keys"]) == (10, 1)

    member_id = next(iter(signed))
    rotated_member = cli("rotate-member", member_id)
    assert rotated_member.code == OK, rotated_member.stderr
    assert rotated_member.lines == [
        {"type": "member_key_rotated", "member_id": member_id, "dek_id": 2}
    ]
    assert cli("rotate-member", UNKNOWN_MEMBER).code == NOT_FOUND
    assert cli("rotate-member", "not-a-member-id").code == NOT_FOUND

    # The scheduled job: rotate (0s: always due), re-wrap everything, destroy version 2.
    maintained = cli("maintain", "--rotate-after", "0s", "--batch-size", "4")
    assert maintained.code == OK, maintained.stderr
    material |= _kek_material(server_settings)
    assert maintained.lines == [
        {"type": "maintained", "rotated": 1, "rewrapped": 11, "destroyed": 1}
    ]
    versions = _versions(cli("status"))
    assert [versions[v]["state"] for v in (1, 2, 3)] == ["destroyed", "destroyed", "active"]
    assert (versions[3]["member_keys"], versions[3]["index_keys"]) == (10, 1)
    # Not due yet: nothing to do.
    assert cli("maintain", "--rotate-after", "90d").lines == [
        {"type": "maintained", "rotated": 0, "rewrapped": 0, "destroyed": 0}
    ]

    events = cli("events", "--limit", "50")
    assert events.code == OK
    operations = [(e["operation"], e["actor"], e["kek_version"]) for e in events.lines]
    assert operations == [
        ("destroy_kek_version", "cli", 2),
        ("rewrap", "cli", 3),
        ("rotate_kek", "cli", 3),
        ("rotate_member_key", "cli", None),
        ("destroy_kek_version", "sec-team", 1),
        ("rewrap", "cli", 2),
        ("rotate_kek", "sec-team", 2),
        ("create_kek_version", "bootstrap", 1),
    ]
    assert events.lines[3]["member_id"] == member_id

    await _all_read(server_settings, clock, signed)

    # Nothing printed holds key material or personal data.
    printed = "".join(cli.printed)
    assert len(material) == 3
    for secret in material:
        assert secret not in printed
    for request in signed.values():
        assert request.login_id not in printed
        assert request.email not in printed


async def test_keys_cli_usage_and_unavailable_exit_codes(
    server_settings: Settings, tmp_path: Path
) -> None:
    cli = KeysCli(server_settings, tmp_path)
    bad_actor = cli("rotate", "--actor", "two words")
    assert bad_actor.code == USAGE
    assert bad_actor.error["error"] == "usage"
    assert cli("maintain", "--rotate-after", "ninety days").code == USAGE
    assert cli("rewrap", "--batch-size", "0").code == USAGE
    assert cli("status", PRIVACY_VAULT_DATABASE_POOL_SIZE="0").code == USAGE
    # Nothing listens on port 9: the database is unavailable.
    down = cli("status", PRIVACY_VAULT_DATABASE_URL="postgresql://postgres@127.0.0.1:9/none")
    assert down.code == UNAVAILABLE, down.stderr
    assert down.error["error"] == "unavailable"
    assert "postgres@" not in down.stderr
