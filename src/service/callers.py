"""Who is calling, and may it make this call: the request wrapper's caller check.

The identity of a calling service is the one SPIFFE ID in its client certificate's
URI SAN (mTLS), in the policy's trust domain. A certificate with none or several URI
SANs, or one of another trust domain, is refused (PERMISSION_DENIED,
``CALLER_NOT_ALLOWED``); a client without a certificate cannot even connect when
the server has a client CA (``require_client_auth``). Without a client CA (the
embedded default) every caller is ``local``.

Where a mesh sidecar terminates mTLS, ``trust_forwarded_client_cert`` takes the
identity from the ``x-forwarded-client-cert`` header (Envoy's format, one element
with one ``URI=``), and only from a loopback peer: only a process on this host can
have set it. Otherwise the header is ignored: it never grants anything, since the
caller is then named by its own connection.

:meth:`CallerCheck.authorization` builds each method's check once, at registration
(service.interceptors.add_servicer): the method's policy name and whether its request
states a purpose are worked out then, so a call pays for dict lookups only. A parsed
certificate is remembered by its PEM bytes, so the hot path never parses one twice.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import structlog
from cryptography import x509
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor

from service.caller_policy import LOCAL, CallerPolicy, PolicySource, spiffe_trust_domain
from service.errors import CallerNotAllowed
from service.interceptors import Authorize, Context
from vault.calls import enter_call_as

log = structlog.get_logger("service.callers")

XFCC_KEY = "x-forwarded-client-cert"
_PEM_CERT = "x509_pem_cert"
_PURPOSE_FIELD = "purpose"
_PURPOSE_KEY_FIELD = "purpose_key"
_PURPOSE_ENUM = "Purpose"
_PURPOSE_PREFIX = "PURPOSE_"
_CACHED_CERTIFICATES = 1024
MAX_XFCC = 8192


def method_name(service: ServiceDescriptor, method: str) -> str:
    """A method as the policy names it: "MemberService/GetMember"."""
    return f"{service.name}/{method}"


def _purpose_names(request: Descriptor) -> dict[int, str] | None:
    """Purpose number -> name (without PURPOSE_) if the request states a purpose."""
    field = request.fields_by_name.get(_PURPOSE_FIELD)
    if field is None or field.enum_type is None or field.enum_type.name != _PURPOSE_ENUM:
        return None
    return {
        v.number: v.name.removeprefix(_PURPOSE_PREFIX)
        for v in field.enum_type.values
        if v.number != 0  # UNSPECIFIED: the servicer refuses it as invalid input
    }


def policy_methods(services: Iterable[ServiceDescriptor]) -> dict[str, bool]:
    """Every method a policy may name -> whether its request states a purpose."""
    return {
        method_name(service, m.name): _purpose_names(m.input_type) is not None
        for service in services
        for m in service.methods
    }


@functools.lru_cache(maxsize=_CACHED_CERTIFICATES)
def _certificate_uris(pem: bytes) -> tuple[str, ...] | None:
    """The URI SANs of a PEM certificate (None if it does not parse)."""
    try:
        certificate = x509.load_pem_x509_certificate(pem)
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    except ValueError:
        return None
    return tuple(sans.value.get_values_for_type(x509.UniformResourceIdentifier))


def _split(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` outside double quotes (Envoy quotes values that
    hold ',', ';' or '=', escaping '"' with a backslash)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


@functools.lru_cache(maxsize=_CACHED_CERTIFICATES)
def forwarded_uri(header: str) -> str | None:
    """The one ``URI=`` of an XFCC header with one element, else None."""
    if len(header) > MAX_XFCC:
        return None
    elements = _split(header, ",")
    if len(elements) != 1:
        return None  # several proxies' elements: whose client is it?
    uris = []
    for pair in _split(elements[0], ";"):
        key, sep, value = pair.partition("=")
        if sep and key.strip().lower() == "uri":
            uris.append(value.strip().strip('"'))
    return uris[0] if len(uris) == 1 else None


def _loopback(peer: str) -> bool:
    """Whether grpc's peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000",
    "unix:/path") is a process on this host."""
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return True
    if kind not in ("ipv4", "ipv6"):
        return False
    host = rest.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CallerCheck:
    """Identifies the caller of each call and asks the policy whether it may."""

    def __init__(
        self,
        policy: PolicySource,
        *,
        mutual_tls: bool,
        trust_forwarded_client_cert: bool = False,
    ) -> None:
        self.policy = policy
        self._mutual_tls = mutual_tls
        self._trust_forwarded = trust_forwarded_client_cert

    def __repr__(self) -> str:
        return f"<CallerCheck mtls={self._mutual_tls} xfcc={self._trust_forwarded}>"

    def identify(self, context: Context, policy: CallerPolicy) -> str:
        """The caller's identity; CallerNotAllowed when it has no acceptable one."""
        if self._trust_forwarded and _loopback(context.peer()):
            forwarded = [v for k, v in context.invocation_metadata() or () if k == XFCC_KEY]
            if forwarded:
                uri = forwarded_uri(forwarded[0]) if len(forwarded) == 1 else None
                if uri is None:
                    raise CallerNotAllowed(
                        "x-forwarded-client-cert must hold one element with one URI"
                    )
                return self._spiffe(uri, policy, "x-forwarded-client-cert")
        if not self._mutual_tls:
            return LOCAL
        pem = next(iter(context.auth_context().get(_PEM_CERT, ())), None)
        uris = _certificate_uris(pem) if pem else None
        if not uris or len(uris) != 1:
            raise CallerNotAllowed(
                "the client certificate must name exactly one SPIFFE ID in its URI SAN"
            )
        return self._spiffe(uris[0], policy, "the client certificate")

    @staticmethod
    def _spiffe(uri: str, policy: CallerPolicy, source: str) -> str:
        domain = spiffe_trust_domain(uri)
        if domain is None or (policy.trust_domain is not None and domain != policy.trust_domain):
            raise CallerNotAllowed(f"{source} does not name a SPIFFE ID of the trust domain")
        return uri

    def authorization(self, path: str, method: MethodDescriptor) -> Authorize:
        """The check of one method (built once, when the method is registered)."""
        name = method_name(method.containing_service, method.name)
        purposes = _purpose_names(method.input_type)
        keyed = _PURPOSE_KEY_FIELD in method.input_type.fields_by_name
        return _method_check(self, name, purposes, keyed=keyed)


def _method_check(
    check: CallerCheck, name: str, purposes: Mapping[int, str] | None, *, keyed: bool
) -> Callable[[Any, Context], None]:
    source = check.policy

    def authorize(request: Any, context: Context) -> None:
        policy = source.current()
        identity = check.identify(context, policy)
        enter_call_as(identity)  # recorded with what the call does, and in refusals' logs
        if not policy.allows(identity, name):
            raise CallerNotAllowed(
                "the caller policy does not allow this caller this method",
                identity=identity,
                method=name,
            )
        if purposes is not None:
            # A configured purpose is named by its key (GetMemberRequest.purpose_key);
            # a request without that field (GetStatistics) names built-in ones only.
            key = request.purpose_key if keyed else ""
            purpose = key or purposes.get(request.purpose) or ""
            # An unknown or unspecified purpose is the servicer's INVALID_ARGUMENT.
            if purpose in source.purposes and not policy.allows(identity, name, purpose):
                raise CallerNotAllowed(
                    "the caller policy does not allow this caller this purpose",
                    identity=identity,
                    method=name,
                    purpose=purpose,
                )

    return authorize
