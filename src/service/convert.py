"""Vault values to protos and back: the servicers' one place for conversions.

Timestamps, purposes, members, KEK versions, re-wrap progress, key events, consents,
recipients and disclosures.
Nothing here calls the vault or picks a status code; a value the API cannot carry
(an unknown purpose) is an :class:`~vault.errors.InvalidInput` naming the field.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from privacyvault.v1 import consent_pb2 as cpb
from privacyvault.v1 import disclosure_pb2 as dpb
from privacyvault.v1 import key_admin_pb2 as kpb
from privacyvault.v1 import member_pb2 as mpb
from vault import AccessEntry, MemberView, Purpose
from vault.clock import to_micros
from vault.consents import ConsentEventRow, ConsentState, PolicyVersionRow
from vault.corrections import Correction
from vault.disclosures import DisclosedData, DisclosureEntry, RecipientRow
from vault.errors import FieldViolation, InvalidInput
from vault.keyadmin import KekVersionStatus, KeyEvent, RewrapProgress
from vault.purposes import MEMBERSHIP, OPT_IN, provision_key

# --- time -----------------------------------------------------------------------------------


def timestamp(at: datetime) -> Timestamp:
    """A protobuf Timestamp, to the microsecond (the vault's resolution)."""
    # Timestamp.FromDatetime is several times slower, and this runs four times a read.
    micros = to_micros(at)
    return Timestamp(seconds=micros // 1_000_000, nanos=micros % 1_000_000 * 1000)


def _set_timestamp(target: Timestamp, at: datetime) -> None:
    """``timestamp(at)`` written into a field in place: no message made and copied."""
    seconds, micros = divmod(to_micros(at), 1_000_000)
    target.seconds = seconds
    target.nanos = micros * 1000


# --- members --------------------------------------------------------------------------------

_PURPOSE_PREFIX = "PURPOSE_"
_PURPOSES: dict[int, Purpose] = {mpb.Purpose.Value(_PURPOSE_PREFIX + p.value): p for p in Purpose}
_PURPOSE_VALUES: dict[str, mpb.Purpose.ValueType] = {
    p.value: mpb.Purpose.Value(_PURPOSE_PREFIX + p.value) for p in Purpose
}


def purpose_from_pb(value: int, field: str) -> Purpose:
    """The vault's Purpose for a proto enum value; anything else names ``field``."""
    try:
        return _PURPOSES[value]
    except KeyError:
        raise InvalidInput([FieldViolation(field, "must name a purpose")]) from None


def purpose_key(
    value: int, key: str, field: str = "purpose", key_field: str = "purpose_key"
) -> str:
    """The catalogue key a request names by its enum ``field`` or its string
    ``key_field``: exactly one of them (an unknown key is the vault's to refuse)."""
    if key:
        if value:
            raise InvalidInput([FieldViolation(key_field, f"set either {field} or {key_field}")])
        return key
    return purpose_from_pb(value, field).value


def purpose_pb(value: str) -> mpb.Purpose.ValueType:
    """The enum value of a built-in purpose's key; UNSPECIFIED for a configured one."""
    return _PURPOSE_VALUES.get(value, mpb.PURPOSE_UNSPECIFIED)  # a dict lookup: hot path


def member_pb(view: MemberView) -> mpb.Member:
    member = mpb.Member()
    fill_member(member, view)
    return member


def fill_member(member: mpb.Member, view: MemberView) -> None:
    """Write ``view`` into ``member`` (a response's field), building every sub-message in
    place: half the cost of making them and copying them in (GetMember's hot path)."""
    member.member_id = view.member_id
    # Unset (None) fields are the ones the purpose does not allow.
    if view.login_id is not None:
        member.login_id = view.login_id
    if view.name is not None:
        member.name = view.name
    if view.email is not None:
        member.email = view.email
    if view.mobile_phone is not None:
        member.mobile_phone = view.mobile_phone
    _set_timestamp(member.created_at, view.created_at)
    _set_timestamp(member.last_seen_at, view.last_seen_at)
    add = member.consents.add
    outdated = view.outdated_purposes
    for c in view.consents:
        consent = add(
            purpose=purpose_pb(c.purpose),
            granted=c.granted,
            policy_version=c.policy_version,
            purpose_key=c.purpose,
        )
        if outdated and c.purpose in outdated:
            consent.outdated = True
        _set_timestamp(consent.recorded_at, c.recorded_at)


def access_entry_pb(e: AccessEntry) -> mpb.AccessEntry:
    return mpb.AccessEntry(at=timestamp(e.at), action=e.action, ip=e.ip, caller=e.caller)


# --- keys -----------------------------------------------------------------------------------

_KEK_STATES: dict[str, kpb.KekState.ValueType] = {
    "active": kpb.KEK_STATE_ACTIVE,
    "decrypt_only": kpb.KEK_STATE_DECRYPT_ONLY,
    "destroyed": kpb.KEK_STATE_DESTROYED,
}


def kek_version_pb(
    version: int,
    state: str,
    created_at: datetime,
    destroyed_at: datetime | None,
    member_keys: int = 0,
    index_keys: int = 0,
    retained_member_keys: int = 0,
) -> kpb.KekVersion:
    return kpb.KekVersion(
        version=version,
        state=_KEK_STATES.get(state, kpb.KEK_STATE_UNSPECIFIED),
        created_at=timestamp(created_at),
        destroyed_at=None if destroyed_at is None else timestamp(destroyed_at),
        member_keys=member_keys,
        index_keys=index_keys,
        retained_member_keys=retained_member_keys,
    )


def status_version_pb(v: KekVersionStatus) -> kpb.KekVersion:
    return kek_version_pb(
        v.version,
        v.state,
        v.created_at,
        v.destroyed_at,
        v.member_keys,
        v.index_keys,
        v.retained_keys,
    )


def progress_pb(p: RewrapProgress) -> kpb.RewrapProgress:
    return kpb.RewrapProgress(**dataclasses.asdict(p))


def _detail(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def event_pb(e: KeyEvent) -> kpb.KeyEvent:
    return kpb.KeyEvent(
        at=timestamp(e.at),
        actor=e.actor,
        operation=e.operation,
        kek_version=e.kek_version or 0,
        member_id=e.member_id or "",
        details={k: _detail(v) for k, v in e.details.items()},
        caller=e.caller,
    )


# --- consents -------------------------------------------------------------------------------

_CONSENT_KINDS = {MEMBERSHIP: cpb.CONSENT_KIND_MEMBERSHIP, OPT_IN: cpb.CONSENT_KIND_OPT_IN}


def consent_state_pb(state: ConsentState) -> cpb.ConsentState:
    spec = state.purpose
    message = cpb.ConsentState(
        purpose_key=spec.key,
        purpose=purpose_pb(spec.key),
        kind=_CONSENT_KINDS.get(spec.consent, cpb.CONSENT_KIND_UNSPECIFIED),
        fields=sorted(spec.fields),
        legal_basis=spec.legal_basis,
        granted=state.granted,
        answered=state.answered,
        policy_version=state.policy_version,
        outdated=state.outdated,
    )
    if state.recorded_at is not None:
        _set_timestamp(message.recorded_at, state.recorded_at)
    if state.reconsent_due_at is not None:
        _set_timestamp(message.reconsent_due_at, state.reconsent_due_at)
    return message


def consent_event_pb(e: ConsentEventRow) -> cpb.ConsentEvent:
    return cpb.ConsentEvent(
        purpose_key=e.purpose,
        purpose=purpose_pb(e.purpose),
        granted=e.granted,
        policy_version=e.policy_version,
        recorded_at=timestamp(e.recorded_at),
        recorded_by=e.recorded_by,
        caller=e.caller,
    )


def policy_version_pb(v: PolicyVersionRow) -> cpb.PolicyVersion:
    return cpb.PolicyVersion(
        version=v.version,
        published_at=timestamp(v.published_at),
        effective_at=timestamp(v.effective_at),
        text_sha256=v.text_sha256,
        changed_purposes=list(v.changed_purposes),
        published_by=v.published_by,
    )


# --- disclosures ----------------------------------------------------------------------------

_BASES = {
    "consent": dpb.DISCLOSURE_BASIS_CONSENT,
    "legal": dpb.DISCLOSURE_BASIS_LEGAL,
    "correction": dpb.DISCLOSURE_BASIS_CORRECTION,
}


def recipient_pb(r: RecipientRow) -> dpb.Recipient:
    return dpb.Recipient(
        recipient_id=r.recipient_id,
        legal_entity=r.legal_entity,
        contact_email=r.contact_email,
        purposes=list(r.purposes),
        fields=list(r.fields),
        legal_basis=r.legal_basis,
        contract_reference=r.contract_reference,
        registered_at=timestamp(r.registered_at),
        registered_by=r.registered_by,
        consent_purpose_key=provision_key(r.recipient_id),
    )


def disclosed_pb(data: DisclosedData) -> dpb.DiscloseResponse:
    return dpb.DiscloseResponse(
        disclosure_id=data.disclosure_id,
        disclosed_at=timestamp(data.disclosed_at),
        fields=[dpb.DisclosedField(field=f, value=v) for f, v in data.values.items()],
    )


def disclosure_pb(e: DisclosureEntry) -> dpb.Disclosure:
    return dpb.Disclosure(
        disclosure_id=e.disclosure_id,
        recipient_id=e.recipient_id,
        legal_entity=e.legal_entity,
        purpose_key=e.purpose,
        fields=list(e.fields),
        basis=_BASES.get(e.basis, dpb.DISCLOSURE_BASIS_UNSPECIFIED),
        legal_reference=e.legal_reference,
        approved_by=e.approved_by,
        disclosed_at=timestamp(e.at),
        caller=e.caller,
    )


# --- corrections ----------------------------------------------------------------------------


def correction_pb(c: Correction) -> mpb.Correction:
    message = mpb.Correction(
        correction_id=c.correction_id,
        requested_by=c.requested_by,
        fields=dict(c.fields),
        state=c.state,
        note=c.note,
        resolved_by=c.resolved_by,
        reason=c.reason,
    )
    _set_timestamp(message.requested_at, c.requested_at)
    if c.resolved_at is not None:
        _set_timestamp(message.resolved_at, c.resolved_at)
    return message
