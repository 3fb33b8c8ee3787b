"""A calling service's first steps with the client-only distribution
(``pip install privacy-vault-client``): sign a member up, read them for
identification, and decode an INVALID_ARGUMENT's field violations. Prints what it
saw as one JSON object (tests/test_python_client.py runs it from a venv that has
only the client).

    python example.py 127.0.0.1:50051
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from importlib import resources

import grpc
from google.rpc import error_details_pb2

from privacyvault.errors import error_detail, rich_status
from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1 import member_pb2_grpc


async def main(target: str) -> dict[str, object]:
    login_id = f"py{secrets.token_hex(6)}"
    password = secrets.token_urlsafe(16)
    async with grpc.aio.insecure_channel(target) as channel:
        members = member_pb2_grpc.MemberServiceStub(channel)
        signed_up = await members.SignUp(
            pb.SignUpRequest(
                login_id=login_id,
                password=password,
                name="Kim Jisoo",
                email=f"{login_id}@example.com",
                birth_date="2001-03-14",
            ),
            timeout=10,
        )
        reply = await members.GetMember(
            pb.GetMemberRequest(member_id=signed_up.member_id, purpose=pb.PURPOSE_IDENTIFICATION),
            timeout=10,
        )
        try:
            await members.SignUp(
                pb.SignUpRequest(
                    login_id=f"{login_id}x",
                    password=password,
                    name="Kim Jisoo",
                    email="not-an-address",
                    birth_date="2020-01-01",  # under 14
                ),
                timeout=10,
            )
        except grpc.aio.AioRpcError as error:
            status = rich_status(error)  # google.rpc.Status, via grpcio-status
            info = error_detail(error, error_details_pb2.ErrorInfo)
            bad = error_detail(error, error_details_pb2.BadRequest)
            if status is None or info is None or bad is None:
                raise SystemExit("the error lacks its google.rpc.Status details") from error
            invalid = {
                "code": error.code().name,
                "status_code": status.code,
                "reason": info.reason,
                "domain": info.domain,
                "field_violations": {v.field: v.description for v in bad.field_violations},
            }
        else:
            raise SystemExit("the invalid sign-up was accepted")
    protos = resources.files("privacyvault.v1")
    return {
        "member_id": signed_up.member_id,
        "read": {"login_id": reply.member.login_id, "email": reply.member.email},
        "login_id": login_id,
        "invalid": invalid,
        "protos": sorted(p.name for p in protos.iterdir() if p.name.endswith(".proto")),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"))))
