"""Configuration from ``PRIVACY_VAULT_*`` environment variables.

Defaults give the embedded mode: SQLite and a local key file in ``./privacy-vault-data``,
listening on 127.0.0.1. Any setting ``X`` may instead come from a file named by
``PRIVACY_VAULT_X_FILE`` (mounted secrets), or from ``PRIVACY_VAULT_SECRETS_DIR``.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vault import OWASP, Argon2Profile, KeyProviderSettings, RetentionRule, VaultSettings
from vault.bootstrap import retention_database_url
from vault.login_guard import LoginGuardSettings
from vault.purposes import DEFAULT_CATALOGUE, PurposeCatalogue, PurposesInvalid, parse_catalogue
from vault.statistics import StatisticsSettings

ENV_PREFIX = "PRIVACY_VAULT_"
#: The admin token (a bearer secret in a gRPC header): long enough, printable ASCII
#: without whitespace (what a header carries unchanged), and not one character
#: repeated or a short pattern (16 spaces, "abababab..." are refused).
ADMIN_TOKEN_MIN_LENGTH = 16
ADMIN_TOKEN_MAX_LENGTH = 1024
ADMIN_TOKEN_MIN_DISTINCT = 8
ADMIN_TOKEN_RULE = (
    f"admin_token must be {ADMIN_TOKEN_MIN_LENGTH} to {ADMIN_TOKEN_MAX_LENGTH} printable "
    f"ASCII characters without whitespace, at least {ADMIN_TOKEN_MIN_DISTINCT} of them "
    "distinct (e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
)
#: Where Debian's softhsm2 puts its module: the pkcs11 default when it is installed.
SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")


def listens_on_loopback(address: str) -> bool:
    """Whether ``host:port`` (or a unix socket) is reachable from this host only."""
    if address.startswith("unix:"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _file_sourced_env(fields: Iterable[str]) -> dict[str, str]:
    """``PRIVACY_VAULT_X_FILE=/path`` -> setting X from that file's content.

    Only for real settings X: settings that are themselves paths (``tls_cert_file``)
    keep their plain meaning.
    """
    known = set(fields)
    values: dict[str, str] = {}
    for key, path in os.environ.items():
        name = key.removeprefix(ENV_PREFIX).removesuffix("_FILE").lower()
        if key.startswith(ENV_PREFIX) and key.endswith("_FILE") and name in known:
            values[name] = Path(path).read_text().strip()
    return values


def load_purposes(path: Path | None) -> PurposeCatalogue:
    """The catalogue of ``path`` (the built-in one without); ValueError naming the
    entry and rule, never quoting the file."""
    if path is None:
        return DEFAULT_CATALOGUE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"PRIVACY_VAULT_PURPOSES_FILE cannot be read ({type(exc).__name__})"
        ) from None
    try:
        return parse_catalogue(text)
    except PurposesInvalid as exc:
        raise ValueError(f"PRIVACY_VAULT_PURPOSES_FILE: {exc}") from None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        secrets_dir=os.environ.get("PRIVACY_VAULT_SECRETS_DIR") or None,
        extra="ignore",
    )

    _catalogue: PurposeCatalogue = PrivateAttr(default=DEFAULT_CATALOGUE)

    #: "embedded" (the default: developer-friendly, reflection on) or "production".
    environment: Literal["embedded", "production"] = "embedded"
    data_dir: Path = Path("privacy-vault-data")
    #: sqlite:///path or postgresql://...; default SQLite in data_dir. May hold a password.
    database_url: SecretStr | None = None
    #: The separated storage for withdrawn members' retained data: a database of its
    #: own. Default: ``retention.db`` in data_dir beside an embedded (SQLite) vault;
    #: required with a PostgreSQL vault when WITHDRAWAL_RETENTION_DAYS > 0.
    retention_database_url: SecretStr | None = None
    database_pool_size: int = Field(10, ge=1, le=200)
    #: A mounted key file (read-only); default: ``kek.json`` in data_dir, created on first start.
    local_key_file: Path | None = None
    #: Where the KEKs live: "local" (a key file) or "pkcs11" (an HSM).
    key_provider: Literal["local", "pkcs11"] = "local"
    #: The PKCS#11 module; default: SoftHSM2's, when it is installed.
    pkcs11_module: Path | None = None
    pkcs11_token_label: str = "privacy-vault"  # noqa: S105 - a label, not a secret
    #: The token's user PIN: PRIVACY_VAULT_PKCS11_PIN or PRIVACY_VAULT_PKCS11_PIN_FILE.
    pkcs11_pin: SecretStr | None = None
    pkcs11_label_prefix: str = Field("privacy-vault-kek-", min_length=1)
    pkcs11_workers: int = Field(4, ge=1, le=64)

    listen_address: str = "127.0.0.1:50051"
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: With a client CA, clients must present a certificate it signed (mTLS), and a
    #: caller is the one SPIFFE ID in its certificate's URI SAN. Without one, every
    #: caller is the identity ``local``.
    tls_client_ca_file: Path | None = None
    #: How often, at most, a new connection's handshake checks the three TLS files for
    #: a change (a stat of each); a changed set is reloaded without a restart
    #: (service.server_certificates). 0: at every handshake.
    tls_files_check_seconds: float = Field(1.0, ge=0, le=300)
    #: The caller policy (TOML, see service.caller_policy): which identity may call
    #: which RPCs for which purposes. Unset: the built-in development policy, which
    #: allows every caller everything (refused in production and beyond loopback).
    caller_policy_file: Path | None = None
    #: How often the policy file is checked for a change (one stat), in seconds.
    caller_policy_check_seconds: float = Field(1.0, ge=0, le=300)
    #: Purposes beyond the built-in ones (TOML, see vault.purposes): read and checked
    #: once, at start; an invalid file refuses the start. Unset: the built-in purposes.
    purposes_file: Path | None = None
    #: Take the caller's identity from ``x-forwarded-client-cert`` (a mesh sidecar
    #: terminating mTLS), and only from a loopback peer. Off: the header is ignored.
    trust_forwarded_client_cert: bool = False
    #: Bearer token for KeyAdminService (PRIVACY_VAULT_ADMIN_TOKEN or
    #: PRIVACY_VAULT_ADMIN_TOKEN_FILE). Unset: the admin API is not served at all.
    #: See ADMIN_TOKEN_RULE for what is accepted.
    admin_token: SecretStr | None = None
    #: The shredding horizon's bound: ``privacy-vault keys maintain`` (and the
    #: sidecar) rotate the KEK when the active version is older than this.
    kek_rotation_days: int = Field(90, ge=1, le=3650)
    #: gRPC reflection; default on in the embedded environment, off in production.
    reflection: bool | None = None
    max_request_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    #: Applied to calls that arrive without a deadline.
    default_deadline_seconds: float = Field(10.0, gt=0, le=600)
    shutdown_grace_seconds: float = Field(10.0, ge=0, le=300)
    #: Transport bounds, so no caller can hold calls, connections or memory open
    #: without end. Calls one connection may have open (SETTINGS_MAX_CONCURRENT_STREAMS):
    max_concurrent_streams: int = Field(100, ge=1, le=10_000)
    #: Connections accepted at once; more are closed on arrival.
    max_connections: int = Field(1000, ge=1, le=100_000)
    #: Calls in progress on the whole server; past it, RESOURCE_EXHAUSTED at once.
    max_concurrent_calls: int = Field(4096, ge=1, le=1_000_000)
    #: A connection with no call for this long is closed (GOAWAY).
    max_connection_idle_seconds: float = Field(300.0, gt=0, le=86_400)
    #: Every connection is closed after this long (GOAWAY), its calls given the grace
    #: below to finish; clients reconnect. Bounds what a call with a huge deadline holds.
    max_connection_age_seconds: float = Field(1800.0, gt=0, le=86_400 * 7)
    max_connection_age_grace_seconds: float = Field(60.0, gt=0, le=86_400)
    #: A second, plaintext listener that serves grpc.health.v1 only (e.g. 0.0.0.0:50052):
    #: for probes that cannot do (m)TLS, like Kubernetes' native gRPC probe. It says
    #: SERVING or NOT_SERVING and nothing else. Unset: no such listener.
    health_listen_address: str | None = None
    #: The event loop of `serve` and `sidecar`: uvloop (libuv) spends less CPU per call
    #: than asyncio's own loop (bench/README.md); `asyncio` is the fallback if a platform
    #: or a debugging tool needs the standard loop.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"

    #: Prometheus metrics over plain HTTP on an address of their own (e.g. 0.0.0.0:9464,
    #: port 0 for any free one): ``/metrics``, for ``serve`` and ``sidecar`` alike. No
    #: personal data in any label. Unset (the default): no metrics endpoint.
    metrics_address: str | None = None
    #: Gauges that need a database query (KEK versions and the keys each wraps, the
    #: outbox, the lifecycle's due counts) are re-read at a scrape at most this often.
    metrics_refresh_seconds: float = Field(15.0, ge=0, le=3600)
    #: OpenTelemetry tracing: a span per RPC (W3C trace context from the caller), the
    #: trace id in log lines. Needs the ``otel`` extra; the exporter is OTLP, set by the
    #: standard OTEL_EXPORTER_OTLP_* variables (OTEL_SERVICE_NAME names the service).
    otel_enabled: bool = False

    argon2_time_cost: int = Field(OWASP.time_cost, ge=1)
    argon2_memory_cost: int = Field(OWASP.memory_cost, ge=8)
    argon2_parallelism: int = Field(OWASP.parallelism, ge=1)
    #: Threads hashing passwords; default: one per core.
    password_workers: int | None = Field(None, ge=1, le=256)
    #: Password hashes/verifications admitted at once (running or waiting); past it
    #: RESOURCE_EXHAUSTED with RetryInfo. Default: 8 per password worker.
    password_queue_limit: int | None = Field(None, ge=1, le=100_000)
    #: Account-recovery mails (login-ID reminders, reset tokens) per member per hour.
    recovery_mails_per_hour: int = Field(5, ge=1, le=1000)
    #: FindLoginId/StartPasswordReset work in flight after answering; past it
    #: RESOURCE_EXHAUSTED with RetryInfo.
    recovery_queue_limit: int = Field(64, ge=1, le=100_000)
    #: Member sessions end this long after their last use (idle) and after the
    #: login (absolute), whatever their use; a member's live sessions are bounded.
    session_idle_minutes: int = Field(15, ge=1, le=24 * 60)
    session_lifetime_hours: int = Field(12, ge=1, le=30 * 24)
    sessions_per_member: int = Field(20, ge=1, le=1000)
    #: Brute force (vault.login_guard): consecutive failed password checks that lock
    #: an account, for login_lock_base_seconds doubling with each further failure up
    #: to login_lock_max_seconds; from login_lock_permanent_after on, until a reset.
    login_lock_after: int = Field(10, ge=1, le=99)
    login_lock_base_seconds: float = Field(60.0, gt=0, le=86_400)
    login_lock_max_seconds: float = Field(3600.0, gt=0, le=86_400 * 30)
    login_lock_permanent_after: int = Field(100, ge=2, le=100)
    #: Failed logins one client IP may have (on any accounts) in its window; past it
    #: RESOURCE_EXHAUSTED with RetryInfo until the window ends.
    login_ip_failure_limit: int = Field(100, ge=1, le=1_000_000)
    login_ip_window_seconds: float = Field(900.0, gt=0, le=86_400)

    #: GetStatistics (policy section 3(3)): counts under this are suppressed, and a
    #: request's date range may span at most this many days.
    statistics_min_cell_size: int = Field(10, ge=2, le=1000)
    statistics_max_days: int = Field(92, ge=1, le=3660)

    dek_cache_size: int = Field(10_000, ge=0)
    dek_cache_ttl_seconds: float = Field(300.0, ge=0)

    policy_version: str = "1"
    privacy_officer_contact: str = "the privacy officer (contact not configured)"

    #: smtp://user:pass@host:port or smtps://... (implicit TLS); may hold a password, so
    #: it is checked where it is parsed (service.mailer), never echoed by a validator.
    #: Unset: mails are written as .eml files under data_dir/outbox-mail (embedded).
    smtp_url: SecretStr | None = None
    #: STARTTLS on smtp://: None uses it when the server offers it, True requires it.
    smtp_starttls: bool | None = None
    smtp_timeout_seconds: float = Field(30.0, gt=0, le=600)
    mail_from: str = Field("privacy-vault@localhost", min_length=3)
    #: Delivery attempts before a message is given up (backoff 30 s doubling, capped at 1 h).
    mail_max_attempts: int = Field(24, ge=1, le=1000)
    #: Without SMTP, spooled .eml files (they hold names, addresses, login IDs and
    #: reset codes in clear) are deleted after this many days, and at a shred.
    mail_spool_days: int = Field(7, ge=1, le=3650)

    #: The lifecycle sidecar (privacy policy sections 1, 5, 6): shred after this long
    #: without a login, with an e-mail notice this many days before.
    inactivity_days: int = Field(365, ge=2, le=36500)
    inactivity_notice_days: int = Field(30, ge=1, le=36500)
    #: Access logs (IP, time, use history) are purged after this many days (6 months).
    access_log_retention_days: int = Field(183, ge=1, le=36500)
    #: Withdrawal (policy section 6): what the member entered is kept in the separated
    #: storage this long, for the stated reason, then destroyed. 0: destroyed at once.
    withdrawal_retention_days: int = Field(0, ge=0, le=36500)
    withdrawal_retention_reason: str = Field(
        "information security (internal policy)", min_length=1, max_length=200
    )
    sidecar_interval_seconds: float = Field(60.0, gt=0, le=86400)
    #: Run the sidecar inside ``serve``; default on in embedded, off in production
    #: (where it runs as its own ``privacy-vault sidecar`` process).
    sidecar_in_process: bool | None = None
    #: The sidecar also runs ``keys maintain`` each round: rotate the KEK once the
    #: active version is KEK_ROTATION_DAYS old, re-wrap, destroy unused versions.
    #: Off by default: destroying is irreversible, and a mounted key file cannot rotate.
    sidecar_key_maintenance: bool = False

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    @field_validator("listen_address", "health_listen_address", "metrics_address")
    @classmethod
    def _has_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError("must be host:port")
        return value

    @field_validator("admin_token")
    @classmethod
    def _strong_admin_token(cls, value: SecretStr | None) -> SecretStr | None:
        # The message states the rule only: it never quotes the token.
        if value is None:
            return None
        token = value.get_secret_value()
        if (
            not ADMIN_TOKEN_MIN_LENGTH <= len(token) <= ADMIN_TOKEN_MAX_LENGTH
            or not all("!" <= c <= "~" for c in token)
            or len(set(token)) < ADMIN_TOKEN_MIN_DISTINCT
        ):
            raise ValueError(ADMIN_TOKEN_RULE)
        return value

    @model_validator(mode="after")
    def _tls_pairs(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return self

    @model_validator(mode="after")
    def _purposes(self) -> Settings:
        self._catalogue = load_purposes(self.purposes_file)
        return self

    @property
    def purposes(self) -> PurposeCatalogue:
        """The purpose catalogue: the built-in purposes and the file's."""
        return self._catalogue

    @model_validator(mode="after")
    def _session_idle_within_lifetime(self) -> Settings:
        if self.session_idle_minutes > self.session_lifetime_hours * 60:
            raise ValueError("session_idle_minutes must not exceed session_lifetime_hours")
        return self

    @model_validator(mode="after")
    def _production_callers(self) -> Settings:
        # Production knows who is calling: mTLS identities under a written policy.
        if self.environment == "production":
            missing = [
                f"PRIVACY_VAULT_{name.upper()}"
                for name in ("tls_cert_file", "tls_client_ca_file", "caller_policy_file")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(
                    "environment production needs TLS, a client CA and a caller policy; "
                    f"missing: {', '.join(missing)}"
                )
        return self

    @model_validator(mode="after")
    def _policy_beyond_loopback(self) -> Settings:
        # Without a policy every caller may do everything: fine on loopback, where
        # only this host's processes connect; never for a whole network.
        if self.caller_policy_file is None and not listens_on_loopback(self.listen_address):
            raise ValueError(
                "a listen_address beyond loopback needs PRIVACY_VAULT_CALLER_POLICY_FILE: "
                "without a caller policy every caller is allowed everything"
            )
        return self

    @model_validator(mode="after")
    def _notice_before_expiry(self) -> Settings:
        if self.inactivity_notice_days >= self.inactivity_days:
            raise ValueError("inactivity_notice_days must be less than inactivity_days")
        return self

    @model_validator(mode="after")
    def _separate_retention(self) -> Settings:
        # The vault's own rule (a database of its own; none by default beside a
        # PostgreSQL vault), checked here so a bad setting is a configuration error.
        vault_url = self.database_url.get_secret_value() if self.database_url else None
        where = retention_database_url(self.data_dir, vault_url, self.retention_url)
        if self.withdrawal_retention_days and where is None:
            raise ValueError(
                "withdrawal_retention_days needs retention_database_url with a PostgreSQL vault"
            )
        return self

    @property
    def retention_url(self) -> str | None:
        if self.retention_database_url is None:
            return None
        return self.retention_database_url.get_secret_value()

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        return cls(**{**_file_sourced_env(cls.model_fields), **overrides})

    @property
    def reflection_enabled(self) -> bool:
        return self.environment == "embedded" if self.reflection is None else self.reflection

    @property
    def sidecar_in_process_enabled(self) -> bool:
        if self.sidecar_in_process is None:
            return self.environment == "embedded"
        return self.sidecar_in_process

    @property
    def argon2(self) -> Argon2Profile:
        return Argon2Profile(
            self.argon2_time_cost, self.argon2_memory_cost, self.argon2_parallelism
        )

    @property
    def key_provider_settings(self) -> KeyProviderSettings:
        if self.key_provider == "local":
            return KeyProviderSettings(kind="local", local_key_file=self.local_key_file)
        module = self.pkcs11_module
        if module is None:
            if not SOFTHSM_MODULE.exists():
                raise ValueError(
                    "key_provider pkcs11 needs PRIVACY_VAULT_PKCS11_MODULE "
                    f"(the PKCS#11 library; {SOFTHSM_MODULE} is not installed)"
                )
            module = SOFTHSM_MODULE
        return KeyProviderSettings(
            kind="pkcs11",
            pkcs11_module=module,
            pkcs11_token_label=self.pkcs11_token_label,
            pkcs11_pin=self.pkcs11_pin.get_secret_value() if self.pkcs11_pin else None,
            pkcs11_label_prefix=self.pkcs11_label_prefix,
            pkcs11_workers=self.pkcs11_workers,
        )

    @property
    def vault_settings(self) -> VaultSettings:
        return VaultSettings(
            policy_version=self.policy_version,
            purposes=self.purposes,
            privacy_officer_contact=self.privacy_officer_contact,
            dek_cache_size=self.dek_cache_size,
            dek_cache_ttl=self.dek_cache_ttl_seconds,
            password_queue_limit=self.password_queue_limit,
            recovery_mails_per_hour=self.recovery_mails_per_hour,
            recovery_queue_limit=self.recovery_queue_limit,
            session_idle=timedelta(minutes=self.session_idle_minutes),
            session_lifetime=timedelta(hours=self.session_lifetime_hours),
            sessions_per_member=self.sessions_per_member,
            login_guard=LoginGuardSettings(
                lock_after=self.login_lock_after,
                lock_base=timedelta(seconds=self.login_lock_base_seconds),
                lock_max=timedelta(seconds=self.login_lock_max_seconds),
                permanent_after=self.login_lock_permanent_after,
                ip_failure_limit=self.login_ip_failure_limit,
                ip_window=timedelta(seconds=self.login_ip_window_seconds),
            ),
            withdrawal_retention=RetentionRule(
                timedelta(days=self.withdrawal_retention_days), self.withdrawal_retention_reason
            ),
            statistics=StatisticsSettings(
                minimum_cell=self.statistics_min_cell_size, max_days=self.statistics_max_days
            ),
        )
