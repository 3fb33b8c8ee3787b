"""AIP-193 as a contract: every RPC's comment in protos/ lists the ErrorInfo reasons it
may answer ("Reasons: ..."), so a caller in any language finds them beside the method,
and a new RPC cannot be added without saying them."""

from __future__ import annotations

import re
from pathlib import Path

PROTOS = Path(__file__).resolve().parent.parent / "protos" / "privacyvault" / "v1"
_RPC = re.compile(r"^\s*rpc (\w+)\(")


def _rpc_comments() -> dict[str, str]:
    """Each RPC (file:name) and the comment lines right above it, joined."""
    found: dict[str, str] = {}
    for proto in sorted(PROTOS.glob("*.proto")):
        comment: list[str] = []
        for line in proto.read_text().splitlines():
            if line.strip().startswith("//"):
                comment.append(line.strip()[2:].strip())
                continue
            if match := _RPC.match(line):
                found[f"{proto.name}:{match.group(1)}"] = " ".join(comment)
            comment = []
    return found


def test_every_rpc_lists_its_error_reasons() -> None:
    comments = _rpc_comments()
    assert len(comments) >= 30  # the parse found the services
    missing = [rpc for rpc, text in comments.items() if "Reasons:" not in text]
    assert missing == []
    for rpc, text in comments.items():
        listed = text.split("Reasons:", 1)[1]
        assert re.search(r"[A-Z][A-Z_]{3,}|only those every RPC may answer", listed), rpc
