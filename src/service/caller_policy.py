"""The caller policy: which calling service may call which RPCs, stating which purposes.

A TOML file (``PRIVACY_VAULT_CALLER_POLICY_FILE``)::

    trust_domain = "example.org"

    [[caller]]
    identity = "spiffe://example.org/ns/support/sa/helpdesk"  # or a prefix ending in "/*"
    description = "the help desk answers members' inquiries"  # optional
    methods = ["MemberService/GetMember", "MemberService/RecordAccess"]
    purposes = ["INQUIRY"]

Rules, checked strictly (an error names the entry, never quotes the file):

- ``trust_domain`` is pinned: every identity is ``spiffe://<trust_domain>/...``, or
  ``local`` (the identity of every caller when the server has no client CA).
- ``methods`` are ``Service/Method`` of the API. There is no wildcard on purpose: a
  new RPC is granted to nobody until the policy names it.
- ``purposes`` are the Purpose names without ``PURPOSE_``; they are what the caller
  may state on a method that takes a purpose (GetMember). An entry that lists such a
  method needs purposes, and purposes need such a method.
- An identity matches its exact entry; failing that, the longest prefix entry
  (``spiffe://example.org/ns/support/*`` matches everything under ``ns/support/``).
  The most specific entry alone applies: a narrower entry can grant less than its
  namespace. No entry: everything is denied.

:class:`PolicySource` keeps the policy in force and re-reads the file when it changes
(checked with one ``stat`` at most every ``check_every`` seconds, on a call's way in).
An invalid new file is refused with a log line, and the last valid policy stays.
"""

from __future__ import annotations

import os
import re
import time
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from service.errors import ServiceError
from vault.policy import Purpose

log = structlog.get_logger("service.callers")

#: Every caller's identity when the server has no client CA (the embedded default).
LOCAL = "local"
PURPOSES = frozenset(p.value for p in Purpose)
_TOP_KEYS = frozenset({"trust_domain", "caller"})
_CALLER_KEYS = frozenset({"identity", "description", "methods", "purposes"})
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
# A SPIFFE ID's path: segments of letters, digits, '.', '_', '-' (not "." or "..").
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
MAX_IDENTITY = 2048
MAX_DESCRIPTION = 500
_CACHE_LIMIT = 4096


class CallerPolicyInvalid(ServiceError):
    """A policy file that cannot be used; the message names the entry and the rule."""


def spiffe_trust_domain(identity: str) -> str | None:
    """The trust domain of a well-formed SPIFFE ID with a path, else None."""
    if len(identity) > MAX_IDENTITY or not identity.startswith("spiffe://"):
        return None
    domain, slash, path = identity[len("spiffe://") :].partition("/")
    if not slash or not _TRUST_DOMAIN.fullmatch(domain):
        return None
    for segment in path.split("/"):
        if segment in (".", "..") or not _SEGMENT.fullmatch(segment):
            return None
    return domain


@dataclass(frozen=True, slots=True)
class CallerRule:
    identity: str  # exact, or a prefix ending in "/*"
    methods: frozenset[str]  # "MemberService/GetMember"
    purposes: frozenset[str]  # "INQUIRY"
    description: str = ""


class CallerPolicy:
    """An immutable policy; ``allow_all`` is the built-in development policy."""

    def __init__(
        self,
        trust_domain: str | None,
        rules: Iterable[CallerRule],
        *,
        allow_all: bool = False,
        name: str = "file",
    ) -> None:
        self.trust_domain = trust_domain
        self.allow_all = allow_all
        self.name = name
        self.rules = tuple(rules)
        self._exact = {r.identity: r for r in self.rules if not r.identity.endswith("/*")}
        # Longest first: the first prefix that matches is the most specific.
        self._prefixes = sorted(
            ((r.identity[:-1], r) for r in self.rules if r.identity.endswith("/*")),
            key=lambda p: -len(p[0]),
        )
        self._resolved: dict[str, CallerRule | None] = {}

    def __repr__(self) -> str:
        return f"<CallerPolicy {self.name} rules={len(self.rules)}>"

    def rule_for(self, identity: str) -> CallerRule | None:
        """The entry that applies to ``identity`` (remembered: the hot path is a dict hit)."""
        try:
            return self._resolved[identity]
        except KeyError:
            pass
        rule = self._exact.get(identity)
        if rule is None:
            rule = next((r for prefix, r in self._prefixes if identity.startswith(prefix)), None)
        if len(self._resolved) >= _CACHE_LIMIT:
            self._resolved.clear()  # identities are few; this bounds a flood of strangers
        self._resolved[identity] = rule
        return rule

    def allows(self, identity: str, method: str, purpose: str | None = None) -> bool:
        if self.allow_all:
            return True
        rule = self.rule_for(identity)
        if rule is None or method not in rule.methods:
            return False
        return purpose is None or purpose in rule.purposes


DEVELOPMENT_POLICY = CallerPolicy(None, (), allow_all=True, name="development")


def _pattern_domain(identity: str) -> str | None:
    """The trust domain of an identity pattern (an ID, or a prefix of one ending in "/*")."""
    return spiffe_trust_domain(identity[:-2] + "/x" if identity.endswith("/*") else identity)


def _entry_name(index: int, entry: Mapping[str, Any]) -> str:
    """How an error names an entry: its index, and its identity when that is one (an
    identity names a service; anything else from the file is not repeated)."""
    identity = entry.get("identity")
    if isinstance(identity, str) and (identity == LOCAL or _pattern_domain(identity)):
        return f"caller[{index}] ({identity})"
    return f"caller[{index}]"


def _strings(value: object, what: str, limit: int = 1000) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CallerPolicyInvalid(f"{what} must be a list of strings")
    if len(value) > limit:
        raise CallerPolicyInvalid(f"{what} has more than {limit} items")
    return value


def _identity(value: object, trust_domain: str, where: str) -> str:
    if not isinstance(value, str):
        raise CallerPolicyInvalid(f"{where}: identity is required (a string)")
    if value == LOCAL:
        return value
    if _pattern_domain(value) != trust_domain:
        raise CallerPolicyInvalid(
            f"{where}: identity must be a SPIFFE ID spiffe://{trust_domain}/<path>, a prefix "
            f"of one ending in '/*', or '{LOCAL}'"
        )
    return value


def _rule(
    index: int,
    entry: object,
    trust_domain: str,
    methods_with_purpose: Mapping[str, bool],
    known_purposes: frozenset[str],
) -> CallerRule:
    if not isinstance(entry, dict):
        raise CallerPolicyInvalid(f"caller[{index}] must be a table ([[caller]])")
    where = _entry_name(index, entry)
    unknown = set(entry) - _CALLER_KEYS
    if unknown:
        allowed = ", ".join(sorted(_CALLER_KEYS))
        raise CallerPolicyInvalid(f"{where}: {len(unknown)} unknown key(s); allowed: {allowed}")
    identity = _identity(entry.get("identity"), trust_domain, where)
    methods = _strings(entry.get("methods", []), f"{where}: methods")
    for i, method in enumerate(methods):
        if method not in methods_with_purpose:
            raise CallerPolicyInvalid(
                f"{where}: methods[{i}] is not a method of the API (Service/Method, "
                "e.g. MemberService/GetMember; no wildcards)"
            )
    purposes = _strings(entry.get("purposes", []), f"{where}: purposes")
    for i, purpose in enumerate(purposes):
        if purpose not in known_purposes:
            raise CallerPolicyInvalid(
                f"{where}: purposes[{i}] is not a purpose of the catalogue "
                f"(one of {', '.join(sorted(known_purposes))})"
            )
    stated = any(methods_with_purpose[m] for m in methods)
    if stated and not purposes:
        raise CallerPolicyInvalid(f"{where}: lists a method that states a purpose, but no purposes")
    if purposes and not stated:
        raise CallerPolicyInvalid(f"{where}: lists purposes, but no method that states a purpose")
    description = entry.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise CallerPolicyInvalid(
            f"{where}: description must be a string of at most {MAX_DESCRIPTION} characters"
        )
    return CallerRule(identity, frozenset(methods), frozenset(purposes), description)


def parse_policy(
    text: str, methods_with_purpose: Mapping[str, bool], purposes: frozenset[str] = PURPOSES
) -> CallerPolicy:
    """A policy from the file's text; ``methods_with_purpose`` maps every method a
    policy may name ("MemberService/GetMember") to whether its request states a purpose;
    ``purposes`` are the catalogue's keys (the built-in ones and configured ones)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message gives the line and column, never the text.
        raise CallerPolicyInvalid(f"not valid TOML: {exc}") from None
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise CallerPolicyInvalid(
            f"{len(unknown)} unknown top-level key(s); allowed: trust_domain, [[caller]]"
        )
    trust_domain = data.get("trust_domain")
    if not isinstance(trust_domain, str) or not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise CallerPolicyInvalid(
            "trust_domain is required: a SPIFFE trust domain (lower-case letters, digits, "
            "'.', '_', '-'), e.g. example.org"
        )
    entries = data.get("caller", [])
    if not isinstance(entries, list):
        raise CallerPolicyInvalid("caller must be an array of tables ([[caller]])")
    rules: list[CallerRule] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        rule = _rule(index, entry, trust_domain, methods_with_purpose, purposes)
        if rule.identity in seen:
            first = seen[rule.identity]
            raise CallerPolicyInvalid(
                f"caller[{index}] ({rule.identity}): the same identity as caller[{first}]"
            )
        seen[rule.identity] = index
        rules.append(rule)
    return CallerPolicy(trust_domain, rules)


class PolicySource:
    """The policy in force. Without a file: the development policy, which allows
    everything. With one: its last valid version, re-read when the file changes."""

    def __init__(
        self,
        path: Path | None,
        methods_with_purpose: Mapping[str, bool],
        *,
        check_every: float = 1.0,
        purposes: frozenset[str] = PURPOSES,
    ) -> None:
        self.path = path
        self._methods = methods_with_purpose
        #: The catalogue's purpose keys a policy may name.
        self.purposes = purposes
        self._check_every = check_every
        self._next_check = 0.0
        self._seen: tuple[int, int, int, int] | None = None
        self._policy = DEVELOPMENT_POLICY
        if path is not None:
            self._seen = self._signature()
            self._policy = self._load()  # at start an invalid file is fatal

    def _signature(self) -> tuple[int, int, int, int]:
        assert self.path is not None
        st = os.stat(self.path)
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _load(self) -> CallerPolicy:
        assert self.path is not None
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CallerPolicyInvalid(
                f"the caller policy file cannot be read ({type(exc).__name__})"
            ) from None
        return parse_policy(text, self._methods, self.purposes)

    def current(self) -> CallerPolicy:
        """The policy in force; at most every ``check_every`` seconds, one stat of the file."""
        if self.path is None:
            return self._policy
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self._check_every
            self._reload_if_changed()
        return self._policy

    def _reload_if_changed(self) -> None:
        try:
            signature = self._signature()
        except OSError as exc:
            if self._seen is not None:
                error = type(exc).__name__
                log.warning("caller_policy_unreadable", path=str(self.path), error=error)
            self._seen = None
            return
        if signature == self._seen:
            return
        self._seen = signature
        try:
            policy = self._load()
        except CallerPolicyInvalid as exc:
            # The message names the entry and the rule broken, never the file's text.
            log.error(  # noqa: TRY400 - the traceback would add nothing
                "caller_policy_refused",
                path=str(self.path),
                error=exc.message,
                kept_callers=len(self._policy.rules),
            )
            return
        self._policy = policy
        log.info("caller_policy_loaded", path=str(self.path), callers=len(policy.rules))
