"""The PKCS#11 key provider: KEKs are non-extractable AES-256 keys inside an HSM.

KEK version N is a token object: an AES-256 secret key labelled
``f"{label_prefix}{N}"``, generated in the token with ``CKA_SENSITIVE=TRUE``,
``CKA_EXTRACTABLE=FALSE``, ``CKA_PRIVATE=TRUE`` and only ``CKA_ENCRYPT`` and
``CKA_DECRYPT`` allowed. Its value never leaves the token: wrapping and
unwrapping are ``C_Encrypt``/``C_Decrypt`` calls inside the HSM.

Wrapping is AES-256-GCM (``CKM_AES_GCM``), not ``CKM_AES_KEY_WRAP_PAD``: GCM
authenticates associated data, so the same header and context bind as in
``vault._hazmat``, and the output is the same self-describing layout::

    wrapped key = 0x01 | kek_version (4, BE) | nonce (12) | AES-256-GCM(key | tag)
    AAD         = "pv.wrap" | header | len(context) (2, BE) | context

so ``_hazmat.wrapped_key_version`` reads a wrapped key from either provider. The
96-bit IV is ours (``os.urandom``), passed in ``CK_GCM_PARAMS``: SoftHSM and
python-pkcs11's ``GCMParams`` take the caller's IV for a single-part
``C_Encrypt`` (HSMs that insist on generating GCM IVs themselves, e.g. some in
FIPS mode, are not supported yet).

Threads. python-pkcs11 initialises a module with ``C_Initialize(NULL)``, under
which PKCS#11 forbids concurrent calls; SoftHSM then turns its own mutexes off
and corrupts its heap when two threads call in at once (seen: ``free(): invalid
pointer``). So every call into one module holds one process-wide lock. The
calls still run off the event loop, on this provider's own thread pool, and
each worker thread has its own session (opened lazily) and its own cache of
key-object handles.

Login. PKCS#11 login state belongs to the process, not to a session: the first
provider on a token logs in with a session it keeps open; sessions opened later
inherit that login. A token refuses a second ``C_Login`` without checking the
PIN, so a second provider on the same token in the same process must present
the PIN the first one logged in with (a digest is compared) - a wrong PIN fails
there too. The PIN itself is not kept, logged or put in any message.

Failures: any failure to unwrap is the one opaque ``DecryptionError``; a
missing key object, a token that is unreachable or a failed login is
``KeyUnavailable``.

Limits: ``create_version`` is atomic within a process, not across processes
sharing a token (two processes creating the same version at once leave two
objects with one label, which later lookups refuse). A token that loses its
login (an HSM restart) needs the service restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import os
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from vault import _hazmat
from vault.errors import DecryptionError, KeyUnavailable

if TYPE_CHECKING:
    from pkcs11 import Session, Token

log = structlog.get_logger("vault.keys")

DEFAULT_LABEL_PREFIX = "privacy-vault-kek-"
KEK_BITS = 256
_HEADER = struct.Struct(">BI")  # as _hazmat: format version, KEK version
_MIN_WRAPPED = _HEADER.size + _hazmat.NONCE_SIZE + _hazmat.TAG_SIZE
_T = TypeVar("_T")


def _wrap_aad(header: bytes, context: bytes) -> bytes:
    # The very AAD _hazmat.wrap_key binds, built by the same function.
    return _hazmat.wrap_associated_data(header, context)


# --- the process-wide state of a loaded module -------------------------------------


@dataclass(eq=False)
class _Module:
    """A loaded PKCS#11 module, shared by every provider in the process."""

    lib: Any
    #: Held by every call into the module (see the module docstring).
    calls: threading.Lock = field(default_factory=threading.Lock)


@dataclass(eq=False)
class _Login:
    """The session that keeps this process logged in to one token."""

    session: Session
    pin_digest: bytes
    users: int = 1


_registry_lock = threading.Lock()
_modules: dict[str, _Module] = {}
_logins: dict[tuple[str, str], _Login] = {}


def _pin_digest(pin: str) -> bytes:
    return hashlib.sha256(b"privacy-vault pkcs11 pin\x00" + pin.encode()).digest()


def _import_pkcs11() -> Any:
    try:
        import pkcs11
    except ImportError:
        raise KeyUnavailable(
            "the pkcs11 key provider needs python-pkcs11 (pip install python-pkcs11)"
        ) from None
    return pkcs11


def _unavailable_errors(p11: Any) -> tuple[type[BaseException], ...]:
    """PKCS#11 errors that say the token, session or login is gone (not the data)."""
    return (
        p11.DeviceError,
        p11.DeviceMemory,
        p11.DeviceRemoved,
        p11.SessionClosed,
        p11.SessionHandleInvalid,
        p11.TokenNotPresent,
        p11.TokenNotRecognised,
        p11.UserNotLoggedIn,
    )


def _attach(module_path: Path, token_label: str, pin: str) -> tuple[_Module, Token]:
    """Load the module, find the token and log in (once per process and token)."""
    p11 = _import_pkcs11()
    key = str(module_path)
    with _registry_lock:
        module = _modules.get(key)
        if module is None:
            if not module_path.is_file():
                raise KeyUnavailable(f"the PKCS#11 module {module_path} does not exist")
            try:
                module = _Module(p11.lib(key))
            except p11.PKCS11Error as exc:
                raise KeyUnavailable(
                    f"the PKCS#11 module {module_path} cannot be loaded ({type(exc).__name__})"
                ) from None
            _modules[key] = module
        with module.calls:
            try:
                token = module.lib.get_token(token_label=token_label)
            except p11.NoSuchToken:
                raise KeyUnavailable(f"no PKCS#11 token is labelled {token_label!r}") from None
            except p11.PKCS11Error as exc:
                raise KeyUnavailable(
                    f"the PKCS#11 token {token_label!r} is unreachable ({type(exc).__name__})"
                ) from None
            digest = _pin_digest(pin)
            login = _logins.get((key, token_label))
            if login is not None:
                if not hmac.compare_digest(login.pin_digest, digest):
                    raise KeyUnavailable(
                        f"login to the PKCS#11 token {token_label!r} failed "
                        "(not the PIN this process is logged in with)"
                    )
                login.users += 1
                return module, token
            try:
                session = token.open(rw=True, user_pin=pin)
            except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange, p11.PinExpired):
                raise KeyUnavailable(
                    f"login to the PKCS#11 token {token_label!r} failed (wrong PIN)"
                ) from None
            except p11.PinLocked:
                raise KeyUnavailable(
                    f"login to the PKCS#11 token {token_label!r} failed (the PIN is locked)"
                ) from None
            except p11.PKCS11Error as exc:
                # Never str(exc): only the error's type, which cannot carry the PIN.
                raise KeyUnavailable(
                    f"login to the PKCS#11 token {token_label!r} failed ({type(exc).__name__})"
                ) from None
            _logins[(key, token_label)] = _Login(session, digest)
            return module, token


def _detach(module_path: Path, token_label: str) -> None:
    key = (str(module_path), token_label)
    with _registry_lock:
        login = _logins.get(key)
        if login is None:
            return
        login.users -= 1
        if login.users > 0:
            return
        del _logins[key]
        module = _modules[str(module_path)]
        with module.calls, contextlib.suppress(Exception):
            login.session.close()  # the last session closed logs the process out


# --- the provider ---------------------------------------------------------------------


class _WorkerState(threading.local):
    """One worker thread's session and the key-object handles found with it."""

    def __init__(self) -> None:
        self.session: Session | None = None
        self.keys: dict[int, Any] = {}
        self.epoch = 0


class Pkcs11KeyProvider:
    """KEKs in a PKCS#11 token; use :meth:`open`."""

    name = "pkcs11"

    def __init__(
        self,
        *,
        module_path: Path,
        module: _Module,
        token: Token,
        token_label: str,
        label_prefix: str,
        executor: ThreadPoolExecutor,
    ) -> None:
        self._p11 = _import_pkcs11()
        self._unavailable = _unavailable_errors(self._p11)
        self._module_path = module_path
        self._module = module
        self._token = token
        self._token_label = token_label
        self._label_prefix = label_prefix
        self._executor = executor
        self._worker = _WorkerState()
        self._sessions: list[Session] = []  # every worker's, to close them all
        # Bumped by destroy_version (under the module lock): workers then drop the
        # key handles they hold, so none outlives its object.
        self._epoch = 0
        self._versions: set[int] = set()  # seen in the token; for repr only
        self._closed = False

    @classmethod
    def open(
        cls,
        module: Path,
        token_label: str,
        pin: str,
        label_prefix: str = DEFAULT_LABEL_PREFIX,
        workers: int = 4,
    ) -> Pkcs11KeyProvider:
        """Load ``module``, log in to the token labelled ``token_label`` and start
        ``workers`` threads. Raises :class:`KeyUnavailable` when that fails."""
        if workers < 1:
            raise ValueError("the pkcs11 provider needs at least one worker thread")
        if not label_prefix:
            raise ValueError("the pkcs11 key label prefix must not be empty")
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pv-pkcs11")
        try:
            # On a worker, as every other PKCS#11 call; open() runs once, at start.
            attached, token = executor.submit(_attach, module, token_label, pin).result()
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(
            module_path=module,
            module=attached,
            token=token,
            token_label=token_label,
            label_prefix=label_prefix,
            executor=executor,
        )

    def __repr__(self) -> str:
        return f"<Pkcs11KeyProvider token={self._token_label!r} versions={sorted(self._versions)}>"

    def __reduce__(self) -> Any:
        raise TypeError("Pkcs11KeyProvider holds an HSM login and cannot be pickled")

    # --- running calls on the workers ------------------------------------------------

    async def _run(self, operation: Callable[[Session], _T]) -> _T:
        if self._closed:
            raise KeyUnavailable("the pkcs11 key provider is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, functools.partial(self._in_session, operation)
        )

    def _in_session(self, operation: Callable[[Session], _T]) -> _T:
        worker = self._worker
        with self._module.calls:
            if worker.epoch != self._epoch:
                worker.keys.clear()
                worker.epoch = self._epoch
            try:
                if worker.session is None:
                    # No PIN: the process is logged in already (see _attach).
                    worker.session = self._token.open(rw=True)
                    self._sessions.append(worker.session)
                return operation(worker.session)
            except self._unavailable as exc:
                self._drop_session(worker)
                raise KeyUnavailable(
                    f"the PKCS#11 token {self._token_label!r} is unreachable ({type(exc).__name__})"
                ) from None
            except self._p11.PKCS11Error as exc:
                # Anything the operation did not classify itself.
                worker.keys.clear()
                raise KeyUnavailable(
                    f"the PKCS#11 token {self._token_label!r} failed ({type(exc).__name__})"
                ) from None

    def _drop_session(self, worker: _WorkerState) -> None:
        worker.keys.clear()
        session, worker.session = worker.session, None
        if session is not None:
            with contextlib.suppress(ValueError):
                self._sessions.remove(session)
            with contextlib.suppress(Exception):
                session.close()

    # --- key objects -------------------------------------------------------------------

    def _label(self, version: int) -> str:
        if version < 1:
            raise ValueError("KEK versions start at 1")
        return f"{self._label_prefix}{version}"

    def _find(self, session: Session, version: int) -> Any | None:
        """The version's key object, or None. Called with the module lock held."""
        worker = self._worker
        key = worker.keys.get(version)
        if key is not None:
            return key
        p11 = self._p11
        label = self._label(version)
        try:
            key = session.get_key(
                object_class=p11.ObjectClass.SECRET_KEY, key_type=p11.KeyType.AES, label=label
            )
        except p11.NoSuchKey:
            self._versions.discard(version)
            return None
        except p11.MultipleObjectsReturned:
            raise KeyUnavailable(
                f"several key objects in the PKCS#11 token are labelled {label!r}; "
                "remove the one no key is wrapped under"
            ) from None
        # A key that could leave the token is not a KEK this provider will use.
        if key[p11.Attribute.EXTRACTABLE] or not key[p11.Attribute.SENSITIVE]:
            raise KeyUnavailable(f"the key object {label!r} is extractable; refusing to use it")
        if key[p11.Attribute.VALUE_LEN] != _hazmat.KEY_SIZE:
            raise KeyUnavailable(f"the key object {label!r} is not an AES-256 key")
        worker.keys[version] = key
        self._versions.add(version)
        return key

    def _require(self, session: Session, version: int) -> Any:
        key = self._find(session, version)
        if key is None:
            raise KeyUnavailable(f"KEK version {version} is not in the PKCS#11 token")
        return key

    def _gone(self, version: int) -> KeyUnavailable:
        # The handle a worker held was destroyed (by another process, perhaps).
        self._worker.keys.pop(version, None)
        self._versions.discard(version)
        return KeyUnavailable(f"KEK version {version} is not in the PKCS#11 token")

    # --- the KeyProvider Protocol ----------------------------------------------------

    async def has_version(self, version: int) -> bool:
        return await self._run(lambda s: self._find(s, version) is not None)

    async def create_version(self, version: int) -> None:
        if await self._run(functools.partial(self._create, version=version)):
            log.info("kek_version_created", provider=self.name, kek_version=version)

    def _create(self, session: Session, *, version: int) -> bool:
        # The module lock is held: nothing else in this process creates meanwhile.
        if self._find(session, version) is not None:
            return False
        p11 = self._p11
        attr = p11.Attribute
        session.generate_key(
            p11.KeyType.AES,
            KEK_BITS,
            label=self._label(version),
            id=struct.pack(">I", version),
            store=True,
            capabilities=p11.MechanismFlag.ENCRYPT | p11.MechanismFlag.DECRYPT,
            template={
                attr.TOKEN: True,
                attr.PRIVATE: True,
                attr.SENSITIVE: True,
                attr.EXTRACTABLE: False,
                attr.ENCRYPT: True,
                attr.DECRYPT: True,
                attr.WRAP: False,
                attr.UNWRAP: False,
                attr.SIGN: False,
                attr.VERIFY: False,
                attr.DERIVE: False,
                attr.MODIFIABLE: False,
            },
        )
        self._require(session, version)
        return True

    async def destroy_version(self, version: int) -> None:
        if await self._run(functools.partial(self._destroy, version=version)):
            log.info("kek_version_material_destroyed", provider=self.name, kek_version=version)

    def _destroy(self, session: Session, *, version: int) -> bool:
        p11 = self._p11
        objects = list(
            session.get_objects(
                {
                    p11.Attribute.CLASS: p11.ObjectClass.SECRET_KEY,
                    p11.Attribute.LABEL: self._label(version),
                }
            )
        )
        for obj in objects:
            obj.destroy()
        self._epoch += 1  # every worker forgets its handles before its next call
        self._worker.keys.clear()
        self._versions.discard(version)
        return bool(objects)

    async def wrap(self, version: int, material: bytes, context: bytes) -> bytes:
        return await self._run(
            functools.partial(self._wrap, version=version, material=material, context=context)
        )

    def _wrap(self, session: Session, *, version: int, material: bytes, context: bytes) -> bytes:
        p11 = self._p11
        key = self._require(session, version)
        header = _HEADER.pack(_hazmat.FORMAT_V1, version)
        nonce = os.urandom(_hazmat.NONCE_SIZE)
        params = p11.GCMParams(nonce, _wrap_aad(header, context), _hazmat.TAG_SIZE * 8)
        try:
            sealed = key.encrypt(material, mechanism=p11.Mechanism.AES_GCM, mechanism_param=params)
        except (p11.ObjectHandleInvalid, p11.KeyHandleInvalid):
            raise self._gone(version) from None
        if len(sealed) != len(material) + _hazmat.TAG_SIZE:
            raise KeyUnavailable("the PKCS#11 token returned a malformed AES-GCM ciphertext")
        return header + nonce + bytes(sealed)

    async def unwrap(self, version: int, wrapped: bytes, context: bytes) -> bytes:
        return await self._run(
            functools.partial(self._unwrap, version=version, wrapped=wrapped, context=context)
        )

    def _unwrap(self, session: Session, *, version: int, wrapped: bytes, context: bytes) -> bytes:
        p11 = self._p11
        key = self._require(session, version)
        # Every way a blob can be bad ends in the same DecryptionError, as in _hazmat.
        if len(wrapped) < _MIN_WRAPPED:
            raise DecryptionError
        fmt, kek_version = _HEADER.unpack_from(wrapped)
        if fmt != _hazmat.FORMAT_V1 or kek_version != version:
            raise DecryptionError
        header = wrapped[: _HEADER.size]
        nonce = wrapped[_HEADER.size : _HEADER.size + _hazmat.NONCE_SIZE]
        sealed = wrapped[_HEADER.size + _hazmat.NONCE_SIZE :]
        params = p11.GCMParams(nonce, _wrap_aad(header, context), _hazmat.TAG_SIZE * 8)
        try:
            material = key.decrypt(sealed, mechanism=p11.Mechanism.AES_GCM, mechanism_param=params)
        except (p11.ObjectHandleInvalid, p11.KeyHandleInvalid):
            raise self._gone(version) from None
        except self._unavailable:
            raise  # the token, not the data: KeyUnavailable (in _in_session)
        except p11.PKCS11Error:
            # A bad tag is CKR_ENCRYPTED_DATA_INVALID, or CKR_GENERAL_ERROR on SoftHSM.
            raise DecryptionError from None
        if len(material) != _hazmat.KEY_SIZE:
            raise DecryptionError
        return bytes(material)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        self._executor.shutdown(wait=True)  # lets calls under way finish
        with self._module.calls:
            for session in self._sessions:
                with contextlib.suppress(Exception):
                    session.close()
            self._sessions.clear()
        _detach(self._module_path, self._token_label)
