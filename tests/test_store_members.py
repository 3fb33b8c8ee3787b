"""The MemberStore contract: sign-up, reads, updates, logins and consents. Every test that uses
the ``store`` or ``store_url`` fixture runs once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import replace
from datetime import timedelta, timezone

import pytest
from store_support import (
    CONSENTS,
    T0,
    assert_utc,
    entry,
    new_member,
    reset_mail,
    ts,
)

from vault.errors import AlreadyExists, KeyChanged
from vault.mail import PASSWORD_CHANGED
from vault.store import (
    ENCRYPTED_FIELDS,
    MemberKeyRow,
    MemberRow,
    Store,
)


async def test_member_roundtrip(vault: Store) -> None:
    # Inserted in any order, consents come back in purpose order.
    await vault.insert_member(replace(new_member(), consents=tuple(CONSENTS)))
    member = replace(new_member(), consents=tuple(sorted(CONSENTS, key=lambda c: c.purpose)))
    await vault.insert_member(member)

    got = await vault.get_member(member.member_id)
    assert got == member
    assert got is not None
    assert dict(got.ciphertexts) == dict(member.ciphertexts)
    assert set(got.ciphertexts) == set(ENCRYPTED_FIELDS)
    assert got.created_at.microsecond == 123457
    assert_utc(got.created_at)
    assert_utc(got.last_seen_at)

    assert await vault.find_member("login_id", member.blind_indexes["login_id"]) == member
    assert await vault.find_member("email", member.blind_indexes["email"]) == member
    # Indexes are per field: a login HMAC is not an e-mail HMAC.
    assert await vault.find_member("email", member.blind_indexes["login_id"]) is None
    assert await vault.find_member("login_id", secrets.token_bytes(32)) is None
    assert await vault.get_member(str(uuid.uuid4())) is None

    consents = await vault.list_consents(member.member_id)
    assert consents == sorted(CONSENTS, key=lambda c: c.purpose)
    for consent in consents:
        assert_utc(consent.recorded_at)


async def test_member_ids_and_datetimes_are_normalised(vault: Store) -> None:
    member = new_member()
    seoul = timezone(timedelta(hours=9))
    member = MemberRow(
        member_id=member.member_id.upper(),
        created_at=T0.astimezone(seoul),
        last_seen_at=ts(1).astimezone(seoul),
        ciphertexts=member.ciphertexts,
        blind_indexes=member.blind_indexes,
        key=member.key,
    )
    await vault.insert_member(member)
    got = await vault.get_member(member.member_id)  # upper case finds it too
    assert got is not None
    assert got.member_id == member.member_id.lower()
    assert got.created_at == T0
    assert got.last_seen_at == ts(1)
    assert_utc(got.created_at)


async def test_invalid_arguments_are_value_errors(vault: Store) -> None:
    with pytest.raises(ValueError):
        await vault.get_member("not-a-uuid")
    member = new_member()
    naive = MemberRow(
        member_id=member.member_id,
        created_at=T0.replace(tzinfo=None),
        last_seen_at=T0,
        ciphertexts=member.ciphertexts,
        blind_indexes=member.blind_indexes,
        key=member.key,
    )
    with pytest.raises(ValueError):
        await vault.insert_member(naive)
    missing = MemberRow(
        member_id=member.member_id,
        created_at=T0,
        last_seen_at=T0,
        ciphertexts={k: v for k, v in member.ciphertexts.items() if k != "mobile_phone"},
        blind_indexes=member.blind_indexes,
        key=member.key,
    )
    with pytest.raises(ValueError):
        await vault.insert_member(missing)
    with pytest.raises(ValueError):
        await vault.insert_member(replace(member, consents=tuple([CONSENTS[0], CONSENTS[0]])))
    with pytest.raises(ValueError):
        await vault.list_access(member.member_id, -1)
    assert await vault.get_member(member.member_id) is None


@pytest.mark.parametrize("field", ["login_id", "email"])
async def test_duplicate_blind_index_is_already_exists(vault: Store, field: str) -> None:
    first = new_member()
    first = replace(first, consents=tuple(sorted(CONSENTS, key=lambda c: c.purpose)))
    await vault.insert_member(first)
    taken = first.blind_indexes[field]
    second = new_member(login_hmac=taken) if field == "login_id" else new_member(email_hmac=taken)

    second = replace(second, consents=tuple(sorted(CONSENTS, key=lambda c: c.purpose)))

    with pytest.raises(AlreadyExists) as info:
        await vault.insert_member(second)

    assert info.value.field == field
    text = str(info.value)
    assert taken.hex() not in text
    assert repr(taken) not in text
    assert "constraint" not in text.lower()
    # The driver's error (whose detail holds the HMAC) is not chained into logs.
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
    # Nothing of the failed member was left behind.
    assert await vault.get_member(second.member_id) is None
    assert await vault.list_consents(second.member_id) == []
    assert await vault.list_access(second.member_id, 10) == []
    assert await vault.get_member(first.member_id) == first


async def test_failed_insert_rolls_back_every_row(vault: Store) -> None:
    # The key row fails (unknown KEK version) after the member row went in.
    member = new_member(kek_version=99)
    member = replace(member, consents=tuple(sorted(CONSENTS, key=lambda c: c.purpose)))
    with pytest.raises(ValueError):
        await vault.insert_member(member)
    assert await vault.get_member(member.member_id) is None
    assert await vault.list_consents(member.member_id) == []
    assert await vault.find_member("login_id", member.blind_indexes["login_id"]) is None
    # The member row was rolled back too: its id and blind indexes are free.
    fixed = MemberRow(
        member_id=member.member_id,
        created_at=member.created_at,
        last_seen_at=member.last_seen_at,
        ciphertexts=member.ciphertexts,
        blind_indexes=member.blind_indexes,
        key=MemberKeyRow(member.member_id, 1, 1, member.key.wrapped_dek),
    )
    fixed = replace(fixed, consents=tuple(sorted(CONSENTS, key=lambda c: c.purpose)))
    await vault.insert_member(fixed)
    assert await vault.get_member(member.member_id) == fixed


async def test_update_member_changes_only_named_fields(vault: Store) -> None:
    member = new_member()
    other = new_member()
    await vault.insert_member(member)
    await vault.insert_member(other)

    new_email_hmac = secrets.token_bytes(32)
    assert await vault.update_member(
        member.member_id,
        {"name": b"new-name-ct", "email": b"new-email-ct"},
        {"email": new_email_hmac},
        dek_id=1,
    )
    got = await vault.get_member(member.member_id)
    assert got is not None
    expected_cts = dict(member.ciphertexts, name=b"new-name-ct", email=b"new-email-ct")
    assert dict(got.ciphertexts) == expected_cts
    assert dict(got.blind_indexes) == {
        "login_id": member.blind_indexes["login_id"],
        "email": new_email_hmac,
    }
    assert got.key == member.key
    assert got.created_at == member.created_at
    assert got.last_seen_at == member.last_seen_at
    # The blind index moved: the old HMAC finds no one, the new one finds the member.
    assert await vault.find_member("email", member.blind_indexes["email"]) is None
    assert await vault.find_member("email", new_email_hmac) == got
    assert await vault.get_member(other.member_id) == other

    # An empty update changes nothing but still says whether the member exists.
    assert await vault.update_member(member.member_id, {}, dek_id=1) is True
    assert await vault.get_member(member.member_id) == got


async def test_update_member_refuses_a_taken_blind_index(vault: Store) -> None:
    member = new_member()
    other = new_member()
    await vault.insert_member(member)
    await vault.insert_member(other)
    taken = other.blind_indexes["login_id"]
    with pytest.raises(AlreadyExists) as info:
        await vault.update_member(
            member.member_id, {"login_id": b"x"}, {"login_id": taken}, dek_id=1
        )
    assert info.value.field == "login_id"
    assert taken.hex() not in str(info.value)
    assert info.value.__cause__ is None
    # The whole update was refused, ciphertext included.
    assert await vault.get_member(member.member_id) == member


@pytest.mark.parametrize(
    ("ciphertexts", "blind_indexes"),
    [
        ({"birth_date": b"x"}, None),
        ({"name_ct = name_ct; --": b"x"}, None),
        ({}, {"name": b"x"}),
        ({"name": b"x"}, {"password_hash": b"x"}),
    ],
)
async def test_update_member_rejects_unknown_fields(
    vault: Store, ciphertexts: dict[str, bytes], blind_indexes: dict[str, bytes] | None
) -> None:
    member = new_member()
    await vault.insert_member(member)
    with pytest.raises(ValueError):
        await vault.update_member(member.member_id, ciphertexts, blind_indexes, dek_id=1)
    assert await vault.get_member(member.member_id) == member


async def test_update_unknown_member_is_false(vault: Store) -> None:
    assert await vault.update_member(str(uuid.uuid4()), {"name": b"x"}, dek_id=1) is False
    assert await vault.update_member(str(uuid.uuid4()), {}, dek_id=1) is False


async def test_record_login(vault: Store) -> None:
    member = new_member()
    await vault.insert_member(member)

    assert await vault.record_login(member.member_id, entry(ts(60), 1), dek_id=1) is True
    got = await vault.get_member(member.member_id)
    assert got is not None
    assert got.last_seen_at == ts(60)
    assert got.ciphertexts["password_hash"] == member.ciphertexts["password_hash"]
    entries = await vault.list_access(member.member_id, 10)
    assert [(e.at, e.action_ct, e.ip_ct) for e in entries] == [(ts(60), b"action-1", b"ip-1")]
    assert_utc(entries[0].at)

    # A rehash on login swaps the password hash in the same transaction.
    assert (
        await vault.record_login(member.member_id, entry(ts(120), 2), b"rehashed-ct", dek_id=1)
        is True
    )
    got = await vault.get_member(member.member_id)
    assert got is not None
    assert got.last_seen_at == ts(120)
    assert got.ciphertexts["password_hash"] == b"rehashed-ct"
    assert got.ciphertexts["name"] == member.ciphertexts["name"]
    assert len(await vault.list_access(member.member_id, 10)) == 2

    stranger = str(uuid.uuid4())
    assert await vault.record_login(stranger, entry(ts(180)), b"ct", dek_id=1) is False
    assert await vault.list_access(stranger, 10) == []


async def test_store_update_member_notifies_in_the_same_transaction(vault: Store) -> None:
    member = new_member()
    await vault.insert_member(member)
    notice = reset_mail(member.member_id, PASSWORD_CHANGED)
    assert await vault.update_member(
        member.member_id, {"password_hash": b"new"}, dek_id=1, notify=notice
    )
    assert await vault.due_outbox(ts(10), 10) == [replace(notice, next_attempt_at=T0)]
    stored = await vault.get_member(member.member_id)
    assert stored is not None
    assert stored.ciphertexts["password_hash"] == b"new"

    # A failing update writes no message: a rotated DEK ...
    with pytest.raises(KeyChanged):
        await vault.update_member(
            member.member_id,
            {"password_hash": b"stale"},
            dek_id=2,
            notify=reset_mail(member.member_id, PASSWORD_CHANGED),
        )
    # ... or a member that is gone.
    stranger = str(uuid.uuid4())
    assert (
        await vault.update_member(
            stranger,
            {"password_hash": b"x"},
            dek_id=1,
            notify=reset_mail(stranger, PASSWORD_CHANGED),
        )
        is False
    )
    assert [m.message_id for m in await vault.due_outbox(ts(10), 10)] == [notice.message_id]
    with pytest.raises(ValueError):
        await vault.update_member(
            member.member_id, {}, dek_id=1, notify=reset_mail(stranger, PASSWORD_CHANGED)
        )
