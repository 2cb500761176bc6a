"""One settings object for the whole service.

Sources, highest first: keyword arguments, environment (``DERMGATE_*``, nested
with ``__``, e.g. ``DERMGATE_DICOM__AE_TITLE``), the TOML file named by
``DERMGATE_CONFIG`` or ``<workdir>/dermgate.toml``, then these defaults. The
defaults are embedded (SQLite + a folder store under the work dir) so nothing
must be set up by hand. Secrets are never values here: only paths to key files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from integration.fhir.settings import FhirSettings


class Section(BaseModel):
    """A settings section: unknown keys are errors, so a typo cannot pass silently."""
    model_config = ConfigDict(extra="forbid")


class AllowedCaller(Section):
    """A calling AE title and the source hosts (IP addresses) it may connect from."""
    ae_title: str
    hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1"])


class Destination(Section):
    """A C-STORE destination (PACS) for the SC and SR outputs."""
    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False


class TlsSettings(Section):
    """DICOM TLS (PS3.15 B.12/B.13, BCP 195): TLS 1.2 minimum."""
    enabled: bool = False
    port: int = 2762                                  # IANA-registered DICOM over TLS
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None                       # for verifying client certificates
    require_client_cert: bool = False


class DicomSettings(Section):
    ae_title: str = "DERMGATE"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_callers: list[AllowedCaller] = Field(default_factory=list)
    accept_unknown_callers: bool = False              # reject unknown AEs by default
    max_associations: int = 16
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_pdu: int = 65536
    max_pixels: int = 40_000_000                      # refuse absurd dimensions
    min_free_bytes: int = 512 * 1024 * 1024           # answer 0xA700 below this
    tls: TlsSettings = Field(default_factory=TlsSettings)
    destinations: list[Destination] = Field(default_factory=list)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        if not 0 < len(v) <= 16:
            raise ValueError("AE title must be 1-16 characters")
        return v


class WorkerSettings(Section):
    lease_seconds: float = 120.0
    max_attempts: int = 5
    backoff_base_s: float = 2.0
    backoff_max_s: float = 600.0
    poll_interval_s: float = 0.2
    batch_size: int = 8


class ModelSettings(Section):
    path: Path | None = None                          # default: the model shipped in the package
    threads: int = 0                                  # 0: ONNX Runtime decides


class AuditSettings(Section):
    directory: Path | None = None                     # default <workdir>/audit
    key_file: Path | None = None                      # default <workdir>/keys/audit.key (demo)
    signing_key_file: Path | None = None
    checkpoint_every: int = 100
    syslog_host: str | None = None
    syslog_port: int = 6514
    syslog_ca_file: Path | None = None


class ApiSettings(Section):
    host: str = "127.0.0.1"
    port: int = 8080
    tokens_file: Path | None = None                   # bearer tokens -> user, role (sha256 only); default <workdir>/keys/api-tokens.json
    tls_cert_file: Path | None = None                 # serve HTTPS (TLS 1.2+) with this certificate chain
    tls_key_file: Path | None = None                  # ... and this private key (file, 0600)
    plain_http_behind_tls_proxy: bool = False         # production: allow plain HTTP because an ingress/mesh terminates TLS


class OidcSettings(Section):
    """The hospital's OpenID Connect provider (Entra ID, Okta, Keycloak, ADFS): authorization code + PKCE."""
    issuer: str                                       # discovery at <issuer>/.well-known/openid-configuration
    client_id: str
    client_secret_file: Path | None = None            # confidential client (file, 0600); PKCE is used either way
    redirect_uri: str | None = None                   # default: <console origin>/auth/oidc/callback
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email"])
    role_claim: str = "roles"                         # dotted path into the ID token claims, e.g. realm_access.roles
    role_map: dict[str, str] = Field(default_factory=dict)   # claim value (group/role) -> dermgate role
    username_claim: str = "preferred_username"
    display_name_claim: str = "name"
    practitioner_claim: str | None = None             # claim holding the FHIR Practitioner id or reference
    practitioner_table: dict[str, str] = Field(default_factory=dict)  # username -> Practitioner/<id>
    button_label: str = "Sign in with the hospital account"
    ca_file: Path | None = None                       # to verify the provider's TLS certificate
    leeway_s: int = 60                                # clock skew allowed on exp / iat

    @field_validator("role_map")
    @classmethod
    def _roles(cls, v: dict[str, str]) -> dict[str, str]:
        bad = sorted(set(v.values()) - set(CONSOLE_ROLES))
        if bad:
            raise ValueError(f"role_map values must be among {', '.join(CONSOLE_ROLES)}: {bad}")
        return v


CONSOLE_ROLES = ("clinician", "compliance", "operator", "admin")


class ConsoleSettings(Section):
    """The web console (served by the api role)."""
    enabled: bool = True
    local_accounts: bool = True                       # off where every user signs in through OpenID Connect
    idle_timeout_s: int = 15 * 60                     # automatic logoff (HIPAA 164.312(a)(2)(iii))
    absolute_lifetime_s: int = 12 * 3600
    lockout_threshold: int = 5                        # failed sign-ins in a row ...
    lockout_s: int = 15 * 60                          # ... lock the account this long
    page_size: int = 50
    low_confidence_first: bool = True
    model_card_url: str | None = None                 # default: the card shipped with the model, served by us
    oidc: OidcSettings | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DERMGATE_", env_nested_delimiter="__", extra="forbid")

    workdir: Path = Field(default_factory=lambda: Path.cwd())
    database_url: str | None = None                   # default sqlite:///<workdir>/dermgate.db
    environment: Literal["development", "production"] = "development"
    log_level: str = "INFO"
    log_stderr_only: bool = False                     # containers: JSON logs to stderr, no log file
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    fhir: FhirSettings | None = None
    fhir_bundle_dir: Path | None = None               # also write each FHIR bundle here (demo without an EHR)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = os.environ.get("DERMGATE_CONFIG")
        if not toml:
            wd = os.environ.get("DERMGATE_WORKDIR")
            candidate = Path(wd or ".") / "dermgate.toml"
            toml = str(candidate) if candidate.exists() else None
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    @model_validator(mode="after")
    def _production_is_secure(self) -> Settings:
        """Outside development, refuse what would expose patient data: an HTTP API on a
        network interface without TLS, or a DICOM SCP that accepts unknown callers."""
        if self.environment != "production":
            return self
        loopback = ("127.0.0.1", "::1", "localhost")
        if (self.api.host not in loopback and not (self.api.tls_cert_file and self.api.tls_key_file)
                and not self.api.plain_http_behind_tls_proxy):
            raise ValueError("production: api.host is a network interface, set api.tls_cert_file and "
                             "api.tls_key_file (or put a TLS proxy in front and bind the API to loopback)")
        if self.dicom.accept_unknown_callers:
            raise ValueError("production: dicom.accept_unknown_callers must be false")
        return self

    # Derived locations, all under the work dir unless configured.
    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.workdir / 'dermgate.db').resolve()}"

    @property
    def store_dir(self) -> Path:
        return self.workdir / "store"

    @property
    def audit_dir(self) -> Path:
        return self.audit.directory or self.workdir / "audit-trail"

    @property
    def api_tokens_file(self) -> Path:
        return self.api.tokens_file or self.workdir / "keys" / "api-tokens.json"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def public_dict(self) -> dict[str, Any]:
        """Settings for display and config-change audit: paths only, never key material."""
        return self.model_dump(mode="json")
