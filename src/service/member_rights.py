"""Which MemberService RPCs are the member's own rights, and the session they need.

The member's own rights (policy section 7: exercised "after identification") need a
live session of the member named by the request's ``member_id``, sent as the
``x-member-session`` metadata value. The table below is the one place that says
which calls those are. Every RPC of the service must be in it, in
:data:`OPTIONAL_SESSION` or in :data:`WITHOUT_SESSION`: this module refuses to load
otherwise, so a new RPC cannot be added without deciding. :func:`guard` wraps the
servicer's methods with the check (MemberServicer does it for itself), which goes
through the vault (``Vault.sessions``), never to the database from here.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

from google.protobuf.descriptor import ServiceDescriptor

from privacyvault.v1 import consent_pb2, disclosure_pb2
from privacyvault.v1 import member_pb2 as pb
from service.interceptors import Context, metadata_value

SESSION_KEY = "x-member-session"


def _always(request: Any) -> bool:
    return True


def by_member(context: Context) -> bool:
    """Whether an OPTIONAL_SESSION call carries a member session (which guard has
    then checked is a live one of the request's member)."""
    return bool(metadata_value(context, SESSION_KEY))


def _member_request(request: Any) -> bool:
    return bool(
        request.purpose == pb.PURPOSE_MEMBER_REQUEST or request.purpose_key == _MEMBER_REQUEST_KEY
    )


_MEMBER_REQUEST_KEY = "MEMBER_REQUEST"


#: RPC name -> whether a request to it exercises the member's own rights.
MEMBER_RIGHTS: Mapping[str, Callable[[Any], bool]] = {
    "GetMember": _member_request,  # other purposes are calling services' reads
    "UpdateMember": _always,
    "ChangePassword": _always,
    "Withdraw": _always,
    "ExportMemberData": _always,
    "StreamMemberData": _always,
    "ListAccessHistory": _always,
    "EndSession": _always,
    "ListCorrections": _always,
}
#: The member's right, or a calling service acting for the member (section 7: the
#: member "contacts the privacy manager"): a session that is sent must be a live one
#: of that member, and makes the call the member's own; without one, the caller
#: policy alone decides, and the calling service is recorded.
OPTIONAL_SESSION = frozenset({"RequestCorrection", "CloseCorrection"})
#: Anonymous (sign-up, login, recovery by what the member knows) or a calling
#: service's own record (RecordAccess): no member session.
WITHOUT_SESSION = frozenset(
    {
        "SignUp",
        "Authenticate",
        "RecordAccess",
        "FindLoginId",
        "StartPasswordReset",
        "CompletePasswordReset",
    }
)


#: ConsentService: every RPC is the member's own right (section 1(2): the member's
#: consent is theirs to see and change).
CONSENT_RIGHTS: Mapping[str, Callable[[Any], bool]] = {
    "GetConsents": _always,
    "UpdateConsents": _always,
    "ListConsentHistory": _always,
}

#: DisclosureService: the member's ledger is theirs to read (sections 4 and 7);
#: Disclose is a calling service's (the caller policy and the consent decide).
DISCLOSURE_RIGHTS: Mapping[str, Callable[[Any], bool]] = {"ListDisclosures": _always}
DISCLOSURE_WITHOUT_SESSION = frozenset({"Disclose"})


def check_classified(
    service: ServiceDescriptor,
    rights: Mapping[str, Callable[[Any], bool]] = MEMBER_RIGHTS,
    without: frozenset[str] = WITHOUT_SESSION,
    optional: frozenset[str] = OPTIONAL_SESSION,
) -> None:
    """RuntimeError unless every RPC of ``service`` is in exactly one of the lists."""
    names = {m.name for m in service.methods}
    lists = (set(rights), set(without), set(optional))
    both = {n for i, a in enumerate(lists) for b in lists[i + 1 :] for n in a & b}
    unclassified = names - set().union(*lists)
    unknown = set().union(*lists) - names
    if both or unclassified or unknown:
        raise RuntimeError(
            f"every {service.name} RPC must be in its rights, without-session or "
            "optional-session list, once: "
            f"{sorted(both | unclassified | unknown)}"
        )


check_classified(pb.DESCRIPTOR.services_by_name["MemberService"])
check_classified(
    consent_pb2.DESCRIPTOR.services_by_name["ConsentService"],
    CONSENT_RIGHTS,
    frozenset(),
    frozenset(),
)
check_classified(
    disclosure_pb2.DESCRIPTOR.services_by_name["DisclosureService"],
    DISCLOSURE_RIGHTS,
    DISCLOSURE_WITHOUT_SESSION,
    frozenset(),
)


class SessionCheck(Protocol):
    async def require(self, token: str, member_id: str) -> None: ...


def guard(
    name: str,
    behavior: Callable[..., Any],
    sessions: SessionCheck,
    rights: Mapping[str, Callable[[Any], bool]] = MEMBER_RIGHTS,
) -> Callable[..., Any]:
    """``behavior`` (the servicer's method ``name``), checking the member's session
    first when the request is one of the member's own rights (in ``rights``; for
    OPTIONAL_SESSION methods: when a session is sent)."""
    needs = rights.get(name)
    optional = name in OPTIONAL_SESSION
    if needs is None and not optional:
        return behavior

    async def check(request: Any, context: Context) -> None:
        wanted = by_member(context) if optional else needs is not None and needs(request)
        if wanted:
            await sessions.require(metadata_value(context, SESSION_KEY), request.member_id)

    if inspect.isasyncgenfunction(behavior):

        async def streamed(request: Any, context: Context) -> AsyncIterator[Any]:
            await check(request, context)
            async for item in behavior(request, context):
                yield item

        return streamed

    async def unary(request: Any, context: Context) -> Any:
        await check(request, context)
        return await behavior(request, context)

    return unary
