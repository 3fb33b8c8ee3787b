"""gRPC server reflection under ``grpc.reflection.v1`` as well as ``v1alpha``.

grpcio-reflection serves only ``grpc.reflection.v1alpha.ServerReflection``; clients
written against v1 (newer grpcurl, grpcui, Postman) get UNIMPLEMENTED from it. The v1
proto is v1alpha's under another package: the same messages, fields and numbers, so
the same bytes on the wire. So grpcio-reflection's own servicer answers on both paths,
its v1alpha messages (de)serialized as they are: nothing of reflection is written
here. Only v1's file descriptor is made, from v1alpha's with the package renamed, and
added to the pool, so a client that lists ``grpc.reflection.v1.ServerReflection`` can
also describe it (grpcui resolves every service it lists).

Reflection is not registered through ``interceptors.add_servicer``: it is one
bidirectional stream of many requests, which that wrapper (one request per call) does
not take; and like health it is outside the caller policy.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
#: The file name and options of grpc's own grpc/reflection/v1/reflection.proto.
V1_FILE = "grpc/reflection/v1/reflection.proto"
_V1_OPTIONS = descriptor_pb2.FileOptions(
    go_package="google.golang.org/grpc/reflection/grpc_reflection_v1",
    java_multiple_files=True,
    java_package="io.grpc.reflection.v1",
    java_outer_classname="ServerReflectionProto",
)
_METHOD = "ServerReflectionInfo"


def v1_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """v1alpha's file descriptor, renamed to v1 (the types it names included)."""
    v1alpha = reflection_pb2.DESCRIPTOR.package
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    file.name = V1_FILE
    file.package = V1_PACKAGE
    file.options.CopyFrom(_V1_OPTIONS)

    def renamed(type_name: str) -> str:
        local = type_name.removeprefix(f".{v1alpha}.")
        return type_name if local == type_name else f".{V1_PACKAGE}.{local}"

    for message in file.message_type:  # flat: v1alpha nests no messages
        for field in message.field:
            if field.type_name:
                field.type_name = renamed(field.type_name)
    for service in file.service:
        for method in service.method:
            method.input_type = renamed(method.input_type)
            method.output_type = renamed(method.output_type)
    return file


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    # A grpcio-reflection that ships v1 registers the real file: ours must not clash.
    with contextlib.suppress(ModuleNotFoundError):
        importlib.import_module("grpc_reflection.v1.reflection_pb2")
    try:
        pool.FindFileByName(V1_FILE)  # there already (from grpc, or a server before)
    except KeyError:
        pool.AddSerializedFile(v1_file_descriptor().SerializeToString())


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection under v1alpha and v1 on ``server``, listing ``service_names``
    and both reflection services."""
    pool = descriptor_pool.Default()
    _add_v1_descriptor(pool)
    servicer = reflection.aio.ReflectionServicer(
        (*service_names, V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME), pool=pool
    )
    for name in (V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME):
        handlers = {
            _METHOD: grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
        server.add_registered_method_handlers(name, handlers)
