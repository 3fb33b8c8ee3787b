"""Server reflection under ``grpc.reflection.v1`` as well as ``v1alpha`` (issue 11,
item 8): a client calling the v1 path lists the services (v1 among them) and gets the
API's file descriptors, over several requests on one stream; v1alpha still answers the
same; the v1 descriptor the server describes is v1alpha's renamed, with the field
numbers of grpc's v1 proto; reflection stays off where the setting turns it off, and
outside the caller policy under mTLS.

The v1 client sends v1alpha's messages on the v1 method path: the two are the same
bytes on the wire (the descriptor test below checks the fields that makes true).
In-process servers on SQLite: reflection reads no storage."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_support import embedded_settings
from tls_support import TestPki

from privacyvault.v1 import member_pb2
from service.reflection import V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME
from service.server import RunningServer, run_server

MEMBER_SERVICE = member_pb2.DESCRIPTOR.services_by_name["MemberService"]
HEALTH_SERVICE = "grpc.health.v1.Health"
Request = reflection_pb2.ServerReflectionRequest
Response = reflection_pb2.ServerReflectionResponse


async def reflect(
    channel: grpc.aio.Channel, service: str, requests: Sequence[Request]
) -> list[Response]:
    """``requests`` on one ServerReflectionInfo stream of ``service`` (the v1 or the
    v1alpha name), and the responses, one per request."""
    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=Request.SerializeToString,
        response_deserializer=Response.FromString,
    )
    responses: AsyncIterator[Response] = call(iter(requests), timeout=10)
    return [response async for response in responses]


def listed(responses: Sequence[Response]) -> set[str]:
    return {s.name for r in responses for s in r.list_services_response.service}


def files_of(response: Response) -> list[descriptor_pb2.FileDescriptorProto]:
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    return [
        descriptor_pb2.FileDescriptorProto.FromString(data)
        for data in response.file_descriptor_response.file_descriptor_proto
    ]


def pool_of(files: Sequence[descriptor_pb2.FileDescriptorProto]) -> descriptor_pool.DescriptorPool:
    """A fresh pool of ``files`` (each after its dependencies): what a client builds."""
    pool = descriptor_pool.DescriptorPool()
    pending = {f.name: f for f in files}
    added: set[str] = set()
    while pending:
        ready = [f for f in pending.values() if set(f.dependency) <= added]
        assert ready, f"dependencies missing from the response: {sorted(pending)}"
        for file in ready:
            pool.Add(file)
            added.add(file.name)
            del pending[file.name]
    return pool


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with run_server(embedded_settings(tmp_path / "data")) as server:
        yield server


@pytest.fixture
async def insecure(embedded: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(embedded.target) as channel:
        yield channel


async def test_v1_lists_the_services_and_itself(insecure: grpc.aio.Channel) -> None:
    (response,) = await reflect(insecure, V1_SERVICE_NAME, [Request(list_services="")])
    names = listed([response])
    assert {
        MEMBER_SERVICE.full_name,
        HEALTH_SERVICE,
        V1ALPHA_SERVICE_NAME,
        V1_SERVICE_NAME,
    } <= names
    # Beside health and reflection, only the API's own services (the admin API is off).
    api = names - {HEALTH_SERVICE, V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME}
    assert all(name.startswith("privacyvault.v1.") for name in api), api
    assert "privacyvault.v1.KeyAdminService" not in api
    assert response.original_request.list_services == ""


async def test_v1_describes_the_api_and_itself_on_one_stream(insecure: grpc.aio.Channel) -> None:
    member, reflection_v1, unknown = await reflect(
        insecure,
        V1_SERVICE_NAME,
        [
            Request(file_containing_symbol=MEMBER_SERVICE.full_name),
            Request(file_containing_symbol=V1_SERVICE_NAME),
            Request(file_containing_symbol="privacyvault.v1.NoSuchService"),
        ],
    )
    # The API: its file and every file it imports, enough to build the service.
    service = pool_of(files_of(member)).FindServiceByName(MEMBER_SERVICE.full_name)
    assert [m.name for m in service.methods] == [m.name for m in MEMBER_SERVICE.methods]
    get_member = service.methods_by_name["GetMember"]
    assert get_member.input_type.full_name == "privacyvault.v1.GetMemberRequest"
    # v1 itself can be described, as grpcui does for every service listed.
    (file,) = files_of(reflection_v1)
    assert (file.name, file.package) == (
        "grpc/reflection/v1/reflection.proto",
        "grpc.reflection.v1",
    )
    info = pool_of([file]).FindMethodByName(f"{V1_SERVICE_NAME}.ServerReflectionInfo")
    assert info.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"
    assert info.output_type.full_name == "grpc.reflection.v1.ServerReflectionResponse"
    assert info.client_streaming
    assert info.server_streaming
    # An unknown symbol is an answer on the stream, not the end of it.
    assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_v1alpha_still_answers_as_v1_does(insecure: grpc.aio.Channel) -> None:
    requests = [
        Request(list_services=""),
        Request(file_containing_symbol=MEMBER_SERVICE.full_name),
        Request(file_by_filename="grpc/reflection/v1/reflection.proto"),
    ]
    v1alpha = await reflect(insecure, V1ALPHA_SERVICE_NAME, requests)
    assert await reflect(insecure, V1_SERVICE_NAME, requests) == v1alpha
    assert MEMBER_SERVICE.full_name in listed(v1alpha[:1])


# The field numbers of grpc's grpc/reflection/v1/reflection.proto (grpc-proto).
V1_FIELDS = {
    "ServerReflectionRequest": {
        "host": 1,
        "file_by_filename": 3,
        "file_containing_symbol": 4,
        "file_containing_extension": 5,
        "all_extension_numbers_of_type": 6,
        "list_services": 7,
    },
    "ExtensionRequest": {"containing_type": 1, "extension_number": 2},
    "ServerReflectionResponse": {
        "valid_host": 1,
        "original_request": 2,
        "file_descriptor_response": 4,
        "all_extension_numbers_response": 5,
        "list_services_response": 6,
        "error_response": 7,
    },
    "FileDescriptorResponse": {"file_descriptor_proto": 1},
    "ExtensionNumberResponse": {"base_type_name": 1, "extension_number": 2},
    "ListServiceResponse": {"service": 1},
    "ServiceResponse": {"name": 1},
    "ErrorResponse": {"error_code": 1, "error_message": 2},
}


def _shape(message: Any, package: str) -> list[tuple[Any, ...]]:
    return [
        (f.name, f.number, f.type, f.label, f.type_name.replace(package, "PKG"), f.oneof_index)
        for f in message.field
    ]


async def test_the_v1_descriptor_is_v1alpha_under_the_v1_package(
    insecure: grpc.aio.Channel,
) -> None:
    (response,) = await reflect(
        insecure, V1_SERVICE_NAME, [Request(file_containing_symbol=V1_SERVICE_NAME)]
    )
    (v1,) = files_of(response)
    v1alpha = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(v1alpha)
    assert [m.name for m in v1.message_type] == [m.name for m in v1alpha.message_type]
    for new, old in zip(v1.message_type, v1alpha.message_type, strict=True):
        assert _shape(new, ".grpc.reflection.v1.") == _shape(old, ".grpc.reflection.v1alpha.")
        assert {f.name: f.number for f in new.field} == V1_FIELDS[new.name]
        assert [o.name for o in new.oneof_decl] == [o.name for o in old.oneof_decl]
    assert v1.options.java_package == "io.grpc.reflection.v1"
    assert not v1.options.deprecated  # v1alpha's file is deprecated; v1 is not


async def test_reflection_off_is_off_under_both_names(tmp_path: Path) -> None:
    async with (
        run_server(embedded_settings(tmp_path / "data", reflection=False)) as server,
        grpc.aio.insecure_channel(server.target) as channel,
    ):
        for name in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await reflect(channel, name, [Request(list_services="")])
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_v1_under_mtls_needs_a_certificate_but_no_policy_entry(tmp_path: Path) -> None:
    pki = TestPki.create(tmp_path / "pki")
    policy = tmp_path / "callers.toml"
    policy.write_text('trust_domain = "example.org"\n')  # nobody may call the API
    settings = embedded_settings(
        tmp_path / "data",
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca_cert,
        caller_policy_file=policy,
        reflection=True,
    )
    async with run_server(settings) as server:
        async with pki.channel(server.target, "spiffe://example.org/ns/ops/sa/grpcurl") as channel:
            (response,) = await reflect(channel, V1_SERVICE_NAME, [Request(list_services="")])
        assert V1_SERVICE_NAME in listed([response])
        async with grpc.aio.secure_channel(server.target, pki.credentials(None)) as anonymous:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await reflect(anonymous, V1_SERVICE_NAME, [Request(list_services="")])
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # no certificate, no handshake
