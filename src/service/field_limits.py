"""The API's field limits, read from the protos' own options (field_limits.proto).

Every string field of every request declares ``max_length`` and every repeated
field ``max_items``; :func:`check_field_limits` is the first thing done with every
API service's request (``validate`` of service.interceptors.add_servicer), so no
regex, e-mail parser or password hash ever runs on an oversized value. The limits
are read once per message type and cached: a call pays one ``len`` per string field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from privacyvault.v1 import field_limits_pb2
from vault.errors import FieldViolation, InvalidInput

_FIELD_MASK = "google.protobuf.FieldMask"


@dataclass(frozen=True, slots=True)
class FieldLimit:
    """One field's limits; 0 means none. ``nested`` holds a message field's own."""

    name: str
    max_length: int
    max_items: int
    repeated: bool
    is_string: bool
    is_field_mask: bool
    nested: tuple[FieldLimit, ...] = ()


_cache: dict[str, tuple[FieldLimit, ...]] = {}
_by_type: dict[type, tuple[FieldLimit, ...]] = {}


def limits_of(descriptor: Any) -> tuple[FieldLimit, ...]:
    """The limited fields of a message type (recursively for message fields)."""
    cached = _cache.get(descriptor.full_name)
    if cached is not None:
        return cached
    _cache[descriptor.full_name] = ()  # a message that contains itself stops here
    found: list[FieldLimit] = []
    for field in descriptor.fields:
        options = field.GetOptions()
        max_length = int(options.Extensions[field_limits_pb2.max_length])
        max_items = int(options.Extensions[field_limits_pb2.max_items])
        message_type: Descriptor | None = field.message_type
        type_name = "" if message_type is None else message_type.full_name
        is_field_mask = type_name == _FIELD_MASK
        nested: tuple[FieldLimit, ...] = ()
        if message_type is not None and not type_name.startswith("google.protobuf."):
            nested = limits_of(message_type)
        if max_length or max_items or nested:
            found.append(
                FieldLimit(
                    name=field.name,
                    max_length=max_length,
                    max_items=max_items,
                    repeated=field.is_repeated,
                    is_string=field.type == FieldDescriptor.TYPE_STRING,
                    is_field_mask=is_field_mask,
                    nested=nested,
                )
            )
    result = tuple(found)
    _cache[descriptor.full_name] = result
    return result


def _check(message: Any, limits: tuple[FieldLimit, ...], prefix: str) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    for limit in limits:
        value = getattr(message, limit.name)
        if limit.is_string and not limit.repeated:  # the common case first
            if limit.max_length and len(value) > limit.max_length:
                violations.append(
                    FieldViolation(
                        prefix + limit.name, f"must be at most {limit.max_length} characters"
                    )
                )
            continue
        where = prefix + limit.name
        if limit.is_field_mask:
            if not message.HasField(limit.name):
                continue
            paths = value.paths
            if limit.max_items and len(paths) > limit.max_items:
                violations.append(
                    FieldViolation(where, f"must name at most {limit.max_items} paths")
                )
            elif limit.max_length and any(len(p) > limit.max_length for p in paths):
                violations.append(
                    FieldViolation(where, f"paths must be at most {limit.max_length} characters")
                )
        elif limit.repeated:
            if limit.max_items and len(value) > limit.max_items:
                violations.append(
                    FieldViolation(where, f"must have at most {limit.max_items} items")
                )
            elif limit.is_string and limit.max_length:
                if any(len(item) > limit.max_length for item in value):
                    violations.append(
                        FieldViolation(
                            where, f"items must be at most {limit.max_length} characters"
                        )
                    )
            elif limit.nested:
                for i, item in enumerate(value):
                    violations.extend(_check(item, limit.nested, f"{where}[{i}]."))
        elif limit.nested and message.HasField(limit.name):
            violations.extend(_check(value, limit.nested, where + "."))
    return violations


def check_field_limits(request: Message) -> None:
    """Refuse a request with any field past its declared limit (InvalidInput naming
    each such field and its limit, never the value)."""
    limits = _by_type.get(type(request))
    if limits is None:
        limits = _by_type[type(request)] = limits_of(request.DESCRIPTOR)
    violations = _check(request, limits, "")
    if violations:
        raise InvalidInput(violations)
