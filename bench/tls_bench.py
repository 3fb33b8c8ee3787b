"""The mTLS pairs (issue 10), run by ``python bench/run.py --tls`` with run.py's machinery:

- GetMember over mTLS under a caller policy of 50 entries / GetMember over mTLS under the
  allow-all (built-in development) policy: what authorization costs (target >= 0.9);
- GetMember over mTLS (the 50-entry policy) / the bare echo over mTLS (target >= 0.6).

Every server is a subprocess of this run, up the whole time, with the same certificates:
a test CA, server and client certificates made by tests/tls_support.py (the client's one
URI SAN is the driver's SPIFFE ID). Both services identify the caller from its certificate
on every call; only the policy differs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import uuid
from pathlib import Path

from driver import ClientTls, Load, seed
from run import (
    ECHO_SERVER,
    SERVICE,
    Paired,
    Ratio,
    Stats,
    loop_env,
    measure_pairs,
    serve,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tls_support import TestPki

TRUST_DOMAIN = "bench.example"
DRIVER = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/driver"
POLICY_ENTRIES = 50
TLS_RATIOS = (
    Ratio("GetMember mTLS, 50-entry policy", "GetMember mTLS, allow-all", 0.9),
    Ratio("GetMember mTLS", "echo mTLS", 0.6),
)


def policy_text(entries: int = POLICY_ENTRIES) -> str:
    """A policy of ``entries`` callers, the driver's among them: exact identities and
    prefixes in other namespaces, each with a few methods and purposes, as a real one."""
    lines = [f'trust_domain = "{TRUST_DOMAIN}"', ""]
    methods = '["MemberService/GetMember", "MemberService/RecordAccess", "MemberService/SignUp"]'
    for n in range(entries - 1):
        identity = (
            f"spiffe://{TRUST_DOMAIN}/ns/team{n}/*"
            if n % 5 == 0
            else f"spiffe://{TRUST_DOMAIN}/ns/team{n // 5}/sa/service{n}"
        )
        lines += [
            "[[caller]]",
            f'identity = "{identity}"',
            f'description = "bench caller {n}"',
            f"methods = {methods}",
            'purposes = ["INQUIRY", "IDENTIFICATION"]',
            "",
        ]
    lines += [
        "[[caller]]",
        f'identity = "{DRIVER}"',
        'methods = ["MemberService/SignUp", "MemberService/GetMember"]',
        'purposes = ["IDENTIFICATION"]',
    ]
    return "\n".join(lines) + "\n"


def measure_tls(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Stats], list[Paired]]:
    pki = TestPki.create(tmp / "pki")
    client = pki.client(DRIVER, common_name="bench driver")
    tls = ClientTls(pki.ca_pem, client.key, client.cert)
    policy = tmp / "callers.toml"
    policy.write_text(policy_text())
    base = {
        **os.environ,
        "PRIVACY_VAULT_ARGON2_TIME_COST": str(args.argon2_time_cost),
        "PRIVACY_VAULT_ARGON2_MEMORY_COST": str(args.argon2_memory_cost),
        "PRIVACY_VAULT_ARGON2_PARALLELISM": str(args.argon2_parallelism),
        "PRIVACY_VAULT_TLS_CERT_FILE": str(pki.server_cert),
        "PRIVACY_VAULT_TLS_KEY_FILE": str(pki.server_key),
        "PRIVACY_VAULT_TLS_CLIENT_CA_FILE": str(pki.ca_cert),
    }
    if args.database_url:
        base["PRIVACY_VAULT_DATABASE_URL"] = args.database_url
    with_policy = base | {
        "PRIVACY_VAULT_DATA_DIR": str(tmp / "data-policy"),
        "PRIVACY_VAULT_CALLER_POLICY_FILE": str(policy),
    }
    allow_all = base | {"PRIVACY_VAULT_DATA_DIR": str(tmp / "data-allow-all")}
    results: dict[str, Stats] = {}
    paired: list[Paired] = []
    policy_ratio, echo_ratio = TLS_RATIOS
    print(f"running {len(TLS_RATIOS)} interleaved mTLS pairs...", file=sys.stderr)
    with (
        serve(ECHO_SERVER, loop_env(base, args.echo_event_loop), tmp / "echo.log", tls) as echo,
        serve(
            SERVICE, loop_env(with_policy, args.service_event_loop), tmp / "policy.log", tls
        ) as policed,
        serve(
            SERVICE, loop_env(allow_all, args.service_event_loop), tmp / "allow-all.log", tls
        ) as open_,
    ):
        tag = f"b{secrets.token_hex(4)}"
        policed_ids = tuple(m for m, _ in asyncio.run(seed(policed, args.members, tag, tls=tls)))
        open_ids = tuple(m for m, _ in asyncio.run(seed(open_, args.members, tag + "a", tls=tls)))
        echo_ids = tuple(str(uuid.uuid4()) for _ in range(args.members))

        def get_member(address: str, ids: tuple[str, ...]) -> Load:
            return Load(address, "GetMember", args.concurrency, member_ids=ids, tls=tls)

        for ratio, loads in (
            (
                policy_ratio,
                {
                    policy_ratio.service: get_member(policed, policed_ids),
                    policy_ratio.baseline: get_member(open_, open_ids),
                },
            ),
            (
                echo_ratio,
                {
                    echo_ratio.service: get_member(policed, policed_ids),
                    echo_ratio.baseline: get_member(echo, echo_ids),
                },
            ),
        ):
            p, stats = measure_pairs(args, ratio, loads)
            paired.append(p)
            results.update((s.name, s) for s in stats)
    return results, paired
