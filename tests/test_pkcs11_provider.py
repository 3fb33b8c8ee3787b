"""The pkcs11 key provider against a real SoftHSM2 token: non-extractable KEKs,
wrapping inside the token, opaque failures, sessions per worker thread, login
errors that never echo the PIN, and a whole vault over gRPC with the DEK cache
keeping the HSM off the hot path."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pkcs11
import pytest
from grpc_support import CLIENT_IP, member_session, sign_up_request
from pydantic import SecretStr

from privacyvault.v1 import member_pb2 as pb
from privacyvault.v1.member_pb2_grpc import MemberServiceStub
from service.config import Settings
from service.server import RunningServer, run_server
from vault import FrozenClock, KeyProviderSettings
from vault._hazmat import wrapped_key_version
from vault.bootstrap import open_key_provider
from vault.errors import DecryptionError, KeyUnavailable
from vault.providers.pkcs11 import Pkcs11KeyProvider

if TYPE_CHECKING:
    from conftest import SoftHsmToken

MATERIAL = bytes(range(32))
CONTEXT = b"dek|test-member|1"
WRAPPED_LEN = 1 + 4 + 12 + 32 + 16
DECRYPTION_FAILED = str(DecryptionError())


def _prefix() -> str:
    """A label prefix of its own per test: tests share one token."""
    return f"pv-test-{secrets.token_hex(4)}-"


def _open(token: SoftHsmToken, prefix: str, **kwargs: Any) -> Pkcs11KeyProvider:
    return Pkcs11KeyProvider.open(
        token.module, token.token_label, token.pin, label_prefix=prefix, **kwargs
    )


@pytest.fixture
async def provider(softhsm_token: SoftHsmToken) -> AsyncIterator[Pkcs11KeyProvider]:
    opened = _open(softhsm_token, _prefix())
    try:
        yield opened
    finally:
        await opened.close()


def _token_keys(token: SoftHsmToken, label: str) -> list[Any]:
    """The key objects with this label, seen through a session of the test's own.
    (Sequential with the provider's calls: the test awaits each one.)"""
    session = pkcs11.lib(str(token.module)).get_token(token_label=token.token_label).open()
    try:
        return list(
            session.get_objects(
                {
                    pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY,
                    pkcs11.Attribute.LABEL: label,
                }
            )
        )
    finally:
        session.close()


def _read_attributes(token: SoftHsmToken, label: str) -> dict[str, Any]:
    session = pkcs11.lib(str(token.module)).get_token(token_label=token.token_label).open()
    try:
        key = session.get_key(label=label)
        a = pkcs11.Attribute
        found = {
            name: key[attr]
            for name, attr in {
                "token": a.TOKEN,
                "private": a.PRIVATE,
                "sensitive": a.SENSITIVE,
                "always_sensitive": a.ALWAYS_SENSITIVE,
                "extractable": a.EXTRACTABLE,
                "never_extractable": a.NEVER_EXTRACTABLE,
                "value_len": a.VALUE_LEN,
                "encrypt": a.ENCRYPT,
                "decrypt": a.DECRYPT,
                "wrap": a.WRAP,
                "unwrap": a.UNWRAP,
                "key_type": a.KEY_TYPE,
            }.items()
        }
        try:
            key[a.VALUE]
        except pkcs11.AttributeSensitive:
            found["value"] = "refused: sensitive"
        return found
    finally:
        session.close()


# --- key objects in the token ----------------------------------------------------------


async def test_create_version_makes_a_non_extractable_sensitive_key_in_the_token(
    softhsm_token: SoftHsmToken,
) -> None:
    prefix = _prefix()
    provider = _open(softhsm_token, prefix)
    try:
        assert not await provider.has_version(1)
        await provider.create_version(1)
        assert await provider.has_version(1)
        # (Read while the provider keeps the process logged in: the key is private.)
        attributes = _read_attributes(softhsm_token, f"{prefix}1")
    finally:
        await provider.close()

    assert attributes == {
        "token": True,
        "private": True,
        "sensitive": True,
        "always_sensitive": True,
        "extractable": False,
        "never_extractable": True,
        "value_len": 32,
        "encrypt": True,
        "decrypt": True,
        "wrap": False,
        "unwrap": False,
        "key_type": pkcs11.KeyType.AES,
        # Reading CKA_VALUE fails: the key bytes never leave the token.
        "value": "refused: sensitive",
    }


async def test_create_version_is_idempotent(
    provider: Pkcs11KeyProvider, softhsm_token: SoftHsmToken
) -> None:
    await provider.create_version(1)
    wrapped = await provider.wrap(1, MATERIAL, CONTEXT)
    await provider.create_version(1)
    assert len(_token_keys(softhsm_token, f"{provider._label_prefix}1")) == 1
    assert await provider.unwrap(1, wrapped, CONTEXT) == MATERIAL


async def test_repr_shows_the_token_and_versions_only(
    provider: Pkcs11KeyProvider, softhsm_token: SoftHsmToken
) -> None:
    await provider.create_version(1)
    text = repr(provider)
    assert text == f"<Pkcs11KeyProvider token={softhsm_token.token_label!r} versions=[1]>"
    assert softhsm_token.pin not in text


# --- wrapping ------------------------------------------------------------------------------


async def test_wrap_unwrap_roundtrip_in_the_hazmat_layout(provider: Pkcs11KeyProvider) -> None:
    await provider.create_version(1)
    await provider.create_version(2)
    first = await provider.wrap(1, MATERIAL, CONTEXT)
    again = await provider.wrap(1, MATERIAL, CONTEXT)
    second = await provider.wrap(2, MATERIAL, CONTEXT)

    assert await provider.unwrap(1, first, CONTEXT) == MATERIAL
    assert await provider.unwrap(1, again, CONTEXT) == MATERIAL
    assert await provider.unwrap(2, second, CONTEXT) == MATERIAL
    # 0x01 | kek_version (4, big-endian) | nonce (12) | ciphertext | tag (16)
    assert len(first) == WRAPPED_LEN
    assert first[:5] == b"\x01\x00\x00\x00\x01"
    assert second[:5] == b"\x01\x00\x00\x00\x02"
    assert wrapped_key_version(first) == 1
    assert wrapped_key_version(second) == 2
    # A fresh random IV each time: same key, same material, different output.
    assert first[5:17] != again[5:17]
    assert first[17:] != again[17:]
    assert MATERIAL not in first


def _tampered(wrapped: bytes) -> dict[str, bytes]:
    def flip(at: int) -> bytes:
        return wrapped[:at] + bytes([wrapped[at] ^ 0x01]) + wrapped[at + 1 :]

    return {
        "empty": b"",
        "truncated": wrapped[:-1],
        "too short for a tag": wrapped[: 1 + 4 + 12 + 15],
        "extended": wrapped + b"\x00",
        "format byte": b"\x02" + wrapped[1:],
        "nonce": flip(5),
        "ciphertext": flip(20),
        "tag": flip(len(wrapped) - 1),
    }


async def test_every_bad_input_is_one_opaque_decryption_error(
    provider: Pkcs11KeyProvider,
) -> None:
    await provider.create_version(1)
    await provider.create_version(2)
    wrapped = await provider.wrap(1, MATERIAL, CONTEXT)
    under_2 = await provider.wrap(2, MATERIAL, CONTEXT)

    cases: dict[str, tuple[int, bytes, bytes]] = {
        f"tampered {name}": (1, blob, CONTEXT) for name, blob in _tampered(wrapped).items()
    }
    cases["wrong context"] = (1, wrapped, b"dek|other-member|1")
    cases["empty context"] = (1, wrapped, b"")
    cases["other version asked"] = (2, wrapped, CONTEXT)
    cases["header says another version"] = (1, under_2, CONTEXT)
    # The header rewritten to name version 2: the HSM's tag check refuses it.
    cases["header rewritten"] = (2, wrapped[:1] + under_2[1:5] + wrapped[5:], CONTEXT)

    messages = {}
    for name, (version, blob, context) in cases.items():
        with pytest.raises(DecryptionError) as caught:
            await provider.unwrap(version, blob, context)
        messages[name] = str(caught.value)
    assert set(messages.values()) == {DECRYPTION_FAILED}, messages
    # The provider is still fine afterwards.
    assert await provider.unwrap(1, wrapped, CONTEXT) == MATERIAL


async def test_a_missing_version_is_key_unavailable(provider: Pkcs11KeyProvider) -> None:
    await provider.create_version(1)
    wrapped = await provider.wrap(1, MATERIAL, CONTEXT)
    assert not await provider.has_version(7)
    with pytest.raises(KeyUnavailable, match="KEK version 7 is not in the PKCS#11 token"):
        await provider.wrap(7, MATERIAL, CONTEXT)
    with pytest.raises(KeyUnavailable, match="KEK version 7"):
        await provider.unwrap(7, wrapped, CONTEXT)


async def test_destroy_version_removes_the_key_object_from_the_token(
    provider: Pkcs11KeyProvider, softhsm_token: SoftHsmToken
) -> None:
    await provider.create_version(1)
    await provider.create_version(2)
    # Every worker thread looks the key up and keeps its handle.
    wrapped = await asyncio.gather(*(provider.wrap(1, MATERIAL, CONTEXT) for _ in range(40)))
    kept = await provider.wrap(2, MATERIAL, CONTEXT)
    label = f"{provider._label_prefix}1"
    assert len(_token_keys(softhsm_token, label)) == 1

    await provider.destroy_version(1)

    assert _token_keys(softhsm_token, label) == []
    assert not await provider.has_version(1)
    # No worker's cached handle outlives the object.
    results = await asyncio.gather(
        *(provider.unwrap(1, blob, CONTEXT) for blob in wrapped), return_exceptions=True
    )
    assert all(isinstance(r, KeyUnavailable) for r in results), results
    await provider.destroy_version(1)  # idempotent
    # Other versions are untouched.
    assert await provider.unwrap(2, kept, CONTEXT) == MATERIAL
    assert len(_token_keys(softhsm_token, f"{provider._label_prefix}2")) == 1


# --- threads and sessions ------------------------------------------------------------------


async def test_200_concurrent_wraps_and_unwraps_across_worker_threads(
    provider: Pkcs11KeyProvider,
) -> None:
    await provider.create_version(1)

    async def roundtrip(i: int) -> bool:
        material = i.to_bytes(2, "big") * 16
        context = f"dek|member-{i}|1".encode()
        wrapped = await provider.wrap(1, material, context)
        return await provider.unwrap(1, wrapped, context) == material

    results = await asyncio.gather(*(roundtrip(i) for i in range(200)))
    assert results == [True] * 200
    # One session per worker thread: four workers, four sessions.
    assert len(provider._sessions) == 4


async def test_the_event_loop_runs_while_the_hsm_works(provider: Pkcs11KeyProvider) -> None:
    await provider.create_version(1)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        await asyncio.gather(*(provider.wrap(1, MATERIAL, CONTEXT) for _ in range(50)))
    finally:
        task.cancel()
    assert ticks > 1


async def test_two_providers_share_the_login_and_close_independently(
    softhsm_token: SoftHsmToken,
) -> None:
    prefix = _prefix()
    first = _open(softhsm_token, prefix)
    second = _open(softhsm_token, prefix, workers=2)
    try:
        await first.create_version(1)
        wrapped = await first.wrap(1, MATERIAL, CONTEXT)
        assert await second.unwrap(1, wrapped, CONTEXT) == MATERIAL
        await first.close()
        assert await second.unwrap(1, wrapped, CONTEXT) == MATERIAL
    finally:
        await first.close()
        await second.close()
    with pytest.raises(KeyUnavailable, match="closed"):
        await second.wrap(1, MATERIAL, CONTEXT)


# --- login -----------------------------------------------------------------------------


@pytest.mark.parametrize("another_provider_open", [False, True])
async def test_a_wrong_pin_is_key_unavailable_and_never_echoed(
    softhsm_token: SoftHsmToken, another_provider_open: bool
) -> None:
    # The token refuses a second login without checking the PIN: the provider
    # must refuse a wrong one even while the process is logged in.
    other = _open(softhsm_token, _prefix()) if another_provider_open else None
    wrong_pin = "wrong-" + secrets.token_hex(6)
    try:
        with pytest.raises(KeyUnavailable) as caught:
            Pkcs11KeyProvider.open(softhsm_token.module, softhsm_token.token_label, wrong_pin)
    finally:
        if other is not None:
            await other.close()
    message = str(caught.value)
    assert "login to the PKCS#11 token" in message
    assert wrong_pin not in message
    assert softhsm_token.pin not in message
    # No PKCS#11 exception rides along in the traceback either.
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__


async def test_an_unknown_token_or_module_is_key_unavailable(
    softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    with pytest.raises(KeyUnavailable, match="no PKCS#11 token is labelled 'no-such-token'"):
        Pkcs11KeyProvider.open(softhsm_token.module, "no-such-token", softhsm_token.pin)
    with pytest.raises(KeyUnavailable, match="does not exist"):
        Pkcs11KeyProvider.open(tmp_path / "missing.so", "x", softhsm_token.pin)


# --- configuration -----------------------------------------------------------------------


def test_the_pin_comes_from_a_secret_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("file-pin-1234\n")
    monkeypatch.setenv("PRIVACY_VAULT_KEY_PROVIDER", "pkcs11")
    monkeypatch.setenv("PRIVACY_VAULT_PKCS11_MODULE", "/opt/hsm/libvendor.so")
    monkeypatch.setenv("PRIVACY_VAULT_PKCS11_TOKEN_LABEL", "prod")
    monkeypatch.setenv("PRIVACY_VAULT_PKCS11_PIN_FILE", str(pin_file))
    monkeypatch.setenv("PRIVACY_VAULT_PKCS11_WORKERS", "8")
    settings = Settings.from_env()
    kp = settings.key_provider_settings
    assert kp.kind == "pkcs11"
    assert kp.pkcs11_module == Path("/opt/hsm/libvendor.so")
    assert kp.pkcs11_token_label == "prod"
    assert kp.pkcs11_pin == "file-pin-1234"
    assert kp.pkcs11_workers == 8
    assert "file-pin-1234" not in repr(settings)
    assert "file-pin-1234" not in repr(kp)


def test_the_pin_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRIVACY_VAULT_KEY_PROVIDER", "pkcs11")
    monkeypatch.setenv("PRIVACY_VAULT_PKCS11_MODULE", "/opt/hsm/libvendor.so")
    monkeypatch.setenv("PRIVACY_VAULT_PKCS11_PIN", "env-pin-5678")
    assert Settings.from_env().key_provider_settings.pkcs11_pin == "env-pin-5678"


def test_a_missing_module_or_pin_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs pkcs11_module") as caught:
        open_key_provider(KeyProviderSettings(kind="pkcs11", pkcs11_pin="the-pin-9"), tmp_path)
    assert "the-pin-9" not in str(caught.value)
    with pytest.raises(ValueError, match="needs pkcs11_pin"):
        open_key_provider(
            KeyProviderSettings(kind="pkcs11", pkcs11_module=tmp_path / "lib.so"), tmp_path
        )


# --- a whole vault over gRPC on the HSM ---------------------------------------------------


def _on_hsm(settings: Settings, token: SoftHsmToken, prefix: str, **more: Any) -> Settings:
    return settings.model_copy(
        update={
            "key_provider": "pkcs11",
            "pkcs11_module": token.module,
            "pkcs11_token_label": token.token_label,
            "pkcs11_pin": SecretStr(token.pin),
            "pkcs11_label_prefix": prefix,
            **more,
        }
    )


async def _serving(
    settings: Settings,
    clock: FrozenClock,
    body: Callable[[RunningServer, MemberServiceStub], Awaitable[None]],
) -> None:
    async with (
        run_server(settings, clock=clock) as running,
        grpc.aio.insecure_channel(running.target) as channel,
    ):
        await body(running, MemberServiceStub(channel))


def _count_unwraps(running: RunningServer) -> list[int]:
    """Instrument the real provider: count its unwrap calls (it still does them)."""
    provider = running.vault.parts.provider
    assert isinstance(provider, Pkcs11KeyProvider)
    count = [0]
    real_unwrap = provider.unwrap

    async def counting_unwrap(version: int, wrapped: bytes, context: bytes) -> bytes:
        count[0] += 1
        return await real_unwrap(version, wrapped, context)

    provider.unwrap = counting_unwrap  # type: ignore[method-assign]
    return count


async def test_a_vault_over_grpc_on_the_pkcs11_provider(
    server_settings: Settings, clock: FrozenClock, softhsm_token: SoftHsmToken
) -> None:
    settings = _on_hsm(server_settings, softhsm_token, _prefix())
    request = sign_up_request()

    async def body(running: RunningServer, members: MemberServiceStub) -> None:
        assert running.vault.parts.provider.name == "pkcs11"
        member_id = (await members.SignUp(request)).member_id
        auth = await members.Authenticate(
            pb.AuthenticateRequest(login_id=request.login_id, password=request.password),
            metadata=CLIENT_IP,
        )
        assert auth.member_id == member_id
        session = (("x-member-session", auth.session_token),)
        got = await members.GetMember(
            pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_MEMBER_REQUEST),
            metadata=session,
        )
        assert (got.member.login_id, got.member.name, got.member.email) == (
            request.login_id,
            request.name,
            request.email,
        )
        outcome = await members.Withdraw(
            pb.WithdrawRequest(member_id=member_id, password=request.password), metadata=session
        )
        assert outcome.WhichOneof("outcome") == "destroyed_at"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await members.GetMember(
                pb.GetMemberRequest(member_id=member_id, purpose=pb.PURPOSE_IDENTIFICATION)
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        # KEK version 1 was made in the token by the first start.
        assert len(_token_keys(softhsm_token, f"{settings.pkcs11_label_prefix}1")) == 1

    await _serving(settings, clock, body)


async def test_the_dek_cache_keeps_the_hsm_off_the_hot_path(
    server_settings: Settings, clock: FrozenClock, softhsm_token: SoftHsmToken
) -> None:
    settings = _on_hsm(server_settings, softhsm_token, _prefix())
    request = sign_up_request()
    member_id = ""
    get = pb.GetMemberRequest(purpose=pb.PURPOSE_IDENTIFICATION)

    async def sign_up(running: RunningServer, members: MemberServiceStub) -> None:
        nonlocal member_id
        unwraps = _count_unwraps(running)
        member_id = (await members.SignUp(request)).member_id
        get.member_id = member_id
        for _ in range(50):
            await members.GetMember(get)
        assert unwraps[0] == 0  # sign-up left the DEK in the cache

    async def cold_cache(running: RunningServer, members: MemberServiceStub) -> None:
        # A restarted server: its cache is empty, so the HSM unwraps once.
        unwraps = _count_unwraps(running)
        for _ in range(50):
            await members.GetMember(get)
        assert unwraps[0] == 1
        assert running.vault.parts.member_keys.cache.get(member_id, 1) is not None

        session = await member_session(members, request)  # the DEK is cached: no unwrap
        await members.Withdraw(
            pb.WithdrawRequest(member_id=member_id, password=request.password), metadata=session
        )
        assert running.vault.parts.member_keys.cache.get(member_id, 1) is None
        assert len(running.vault.parts.member_keys.cache) == 0
        with pytest.raises(grpc.aio.AioRpcError):
            await members.GetMember(get)
        assert unwraps[0] == 1  # the withdrawal's password check used the cached DEK

    async def no_cache(running: RunningServer, members: MemberServiceStub) -> None:
        # The instrument counts: with the cache off, every read goes to the HSM.
        unwraps = _count_unwraps(running)
        other = sign_up_request()
        get.member_id = (await members.SignUp(other)).member_id
        for _ in range(10):
            await members.GetMember(get)
        assert unwraps[0] == 10

    await _serving(settings, clock, sign_up)
    await _serving(settings, clock, cold_cache)
    await _serving(settings.model_copy(update={"dek_cache_size": 0}), clock, no_cache)
