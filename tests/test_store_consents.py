"""The ConsentStore contract: consent histories, policy versions, the member read's
outdated marks and the paged policy notices. Every test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest
from store_support import DAY, T0, assert_utc, new_member, ts

from vault.errors import AlreadyExists
from vault.store import ConsentRow, MemberRow, Store
from vault.store.base import NewConsent, OutboxMessage, PolicyVersionRow


def version(name: str, published: float, effective: float, *changed: str) -> PolicyVersionRow:
    return PolicyVersionRow(
        version=name,
        published_at=ts(published),
        effective_at=ts(effective),
        text_sha256="ab" * 32,
        changed_purposes=tuple(sorted(changed)),
        published_by="officer",
        caller="local",
    )


async def member_with(vault: Store, *answers: tuple[str, bool]) -> MemberRow:
    member = replace(
        new_member(),
        consents=tuple(ConsentRow(p, g, "1", T0) for p, g in answers),
    )
    await vault.insert_member(member, caller="spiffe://example.org/web")
    return member


def notice(member_id: str) -> OutboxMessage:
    return OutboxMessage(
        message_id=f"notice-{member_id}",
        member_id=member_id,
        kind="policy_changed",
        params={"version": "2"},
        created_at=T0,
    )


async def test_sign_up_answers_are_the_first_events(vault: Store) -> None:
    member = await member_with(vault, ("IDENTIFICATION", True), ("INQUIRY", False))
    events = await vault.list_consent_events(member.member_id, 10)
    assert [(e.purpose, e.granted, e.policy_version) for e in events] == [
        ("INQUIRY", False, "1"),  # newest first
        ("IDENTIFICATION", True, "1"),
    ]
    assert {(e.recorded_by, e.caller) for e in events} == {("member", "spiffe://example.org/web")}
    for e in events:
        assert e.recorded_at == T0
        assert_utc(e.recorded_at)


async def test_answers_append_events_and_replace_the_current_answer(vault: Store) -> None:
    member = await member_with(vault, ("INQUIRY", True))
    mid = member.member_id
    for n, granted in enumerate((False, True), start=1):
        recorded = await vault.record_consents(
            mid,
            [NewConsent("INQUIRY", granted)],
            ts(n),
            recorded_by="member",
            caller="local",
            default_version="1",
        )
        assert recorded is not None
        assert [(e.purpose, e.granted, e.recorded_at) for e in recorded] == [
            ("INQUIRY", granted, ts(n))
        ]
    events = await vault.list_consent_events(mid, 10)
    assert [e.granted for e in events] == [True, False, True]
    assert events[0].event_id > events[1].event_id > events[2].event_id
    # Paging: older than a cursor.
    assert await vault.list_consent_events(mid, 1, events[0].event_id) == [events[1]]
    assert await vault.list_consent_events(mid, 5, events[2].event_id) == []
    # The current answer is the last one, and the member read carries it.
    (current,) = await vault.list_consents(mid)
    assert (current.granted, current.recorded_at) == (True, ts(2))
    row = await vault.get_member(mid)
    assert row is not None
    assert [(c.purpose, c.granted, c.recorded_at) for c in row.consents] == [
        ("INQUIRY", True, ts(2))
    ]


async def test_answers_for_a_missing_member_write_nothing(vault: Store) -> None:
    missing = str(uuid.uuid4())
    got = await vault.record_consents(
        missing,
        [NewConsent("INQUIRY", True)],
        T0,
        recorded_by="member",
        caller="local",
        default_version="1",
    )
    assert got is None
    assert await vault.list_consent_events(missing, 10) == []
    member = await member_with(vault)
    with pytest.raises(ValueError, match="more than once"):
        await vault.record_consents(
            member.member_id,
            [NewConsent("INQUIRY", True), NewConsent("INQUIRY", False)],
            T0,
            recorded_by="member",
            caller="local",
            default_version="1",
        )
    assert await vault.list_consent_events(member.member_id, 10) == []


async def test_answers_are_recorded_under_the_version_published_by_then(vault: Store) -> None:
    assert await vault.current_policy_version(ts(0)) is None
    await vault.publish_policy_version(version("2", 100, 200))
    await vault.publish_policy_version(version("3", 300, 300, "INQUIRY"))
    assert await vault.current_policy_version(ts(99)) is None
    assert await vault.current_policy_version(ts(100)) == "2"
    assert await vault.current_policy_version(ts(299)) == "2"
    assert await vault.current_policy_version(ts(301)) == "3"
    member = await member_with(vault)
    for at, expected in ((50, "1"), (150, "2"), (400, "3")):
        (event,) = await vault.record_consents(  # type: ignore[misc]
            member.member_id,
            [NewConsent("INQUIRY", True)],
            ts(at),
            recorded_by="member",
            caller="local",
            default_version="1",
        )
        assert event.policy_version == expected


async def test_a_version_is_published_once(vault: Store) -> None:
    first = version("2", 100, 100 + 86400, "INQUIRY", "STATISTICS")
    await vault.publish_policy_version(first)
    with pytest.raises(AlreadyExists) as taken:
        await vault.publish_policy_version(version("2", 200, 200))
    assert taken.value.field == "policy_version"
    await vault.publish_policy_version(version("2.1", 150, 150))
    listed = await vault.list_policy_versions()
    assert [v.version for v in listed] == ["2", "2.1"]
    assert listed[0] == first
    assert_utc(listed[0].effective_at)


async def test_the_member_read_says_when_a_grant_must_be_given_again(vault: Store) -> None:
    before = await member_with(vault, ("INQUIRY", True), ("STATISTICS", True))
    refused = await member_with(vault, ("INQUIRY", False))
    await vault.publish_policy_version(version("2", 100, 200, "INQUIRY"))
    after = replace(new_member(), consents=(ConsentRow("INQUIRY", True, "2", ts(150)),))
    await vault.insert_member(after)

    def due(row: MemberRow | None) -> dict[str, object]:
        assert row is not None
        return {c.purpose: c.reconsent_due_at for c in row.consents}

    # A grant recorded before publication: due at the effective time; other purposes
    # and grants recorded after publication are untouched.
    assert due(await vault.get_member(before.member_id)) == {
        "INQUIRY": ts(200),
        "STATISTICS": None,
    }
    assert due(await vault.get_member(after.member_id)) == {"INQUIRY": None}
    # The read marks a refusal too; it is the vault that never calls a refusal outdated.
    assert due(await vault.get_member(refused.member_id)) == {"INQUIRY": ts(200)}
    # A second version: the earliest change after the answer counts; an answer
    # between the two is due only at the second.
    await vault.publish_policy_version(version("3", 300, 400, "INQUIRY"))
    assert due(await vault.get_member(before.member_id))["INQUIRY"] == ts(200)
    assert due(await vault.get_member(after.member_id))["INQUIRY"] == ts(400)
    found = await vault.find_member("login_id", before.blind_indexes["login_id"])
    assert due(found)["INQUIRY"] == ts(200)


async def test_notices_go_page_by_page_to_exactly_the_members_asked_again(
    vault: Store,
) -> None:
    asked = [await member_with(vault, ("INQUIRY", True)) for _ in range(5)]
    await member_with(vault, ("INQUIRY", False))  # refused: nothing to ask
    await member_with(vault, ("STATISTICS", True))  # another purpose
    two = await member_with(vault, ("INQUIRY", True), ("STATISTICS", True))
    asked.append(two)  # one notice, though both purposes changed
    await vault.publish_policy_version(version("2", 100, 100 + 30 * 86400, "INQUIRY", "STATISTICS"))
    await vault.publish_policy_version(version("2.1", 110, 110))  # changes nothing
    # Granted after publication: under the new version, not asked.
    late = replace(new_member(), consents=(ConsentRow("INQUIRY", True, "2", ts(101)),))
    await vault.insert_member(late)

    assert await vault.versions_with_pending_notices(10) == ["2", "2.1"]
    sent: list[str] = []

    def make(member_id: str) -> OutboxMessage:
        sent.append(member_id)
        return notice(member_id)

    pages = []
    while True:
        queued, done = await vault.queue_policy_notices("2", 2, make)
        pages.append(queued)
        if done:
            break
    assert sum(pages) == len(asked) + 1  # + the member who granted STATISTICS only
    assert max(pages) <= 2
    assert sorted(sent) == sent  # member id order: the cursor
    assert len(set(sent)) == len(sent)
    assert set(sent) >= {m.member_id for m in asked}
    assert late.member_id not in sent
    # Done: asking again queues nothing; the version without changes is done at once.
    assert await vault.queue_policy_notices("2", 2, make) == (0, True)
    assert await vault.queue_policy_notices("2.1", 2, make) == (0, True)
    assert await vault.versions_with_pending_notices(10) == []
    due = await vault.due_outbox(T0 + 400 * DAY, 100)
    assert sorted(m.member_id for m in due) == sorted(sent)


async def test_a_member_shredded_before_the_page_gets_no_notice(vault: Store) -> None:
    kept = await member_with(vault, ("INQUIRY", True))
    gone = await member_with(vault, ("INQUIRY", True))
    await vault.publish_policy_version(version("2", 100, 100, "INQUIRY"))
    assert await vault.shred_member(gone.member_id, ts(101), "withdrawal") is not None
    assert await vault.queue_policy_notices("2", 10, notice) == (1, True)
    assert [m.member_id for m in await vault.due_outbox(T0 + DAY, 10)] == [kept.member_id]
