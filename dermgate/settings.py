"""One settings object for the whole service.

Sources, highest first: keyword arguments, environment (``DERMGATE_*``, nested
with ``__``, e.g. ``DERMGATE_DICOM__AE_TITLE``), the TOML file named by
``DERMGATE_CONFIG`` or ``<workdir>/dermgate.toml``, then these defaults. The
defaults are embedded (SQLite + a folder store under the work dir) so nothing
must be set up by hand. Secrets are never values here (only paths to key
files), except a password inside ``database_url``, which ``public_dict`` cuts out.

This is the one module that composes the sections: the core's own (worker, model,
audit, api, DICOM) are defined here, a protocol package's section is defined by that
package (``integration/fhir/settings.py``) and only composed here. The core modules
(pipeline, queue, intake, store, db) import nothing from protocol packages, and
protocol packages take their section from their own package, never from this module
(tests/test_architecture.py checks both).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from integration.fhir.settings import FhirSettings
from integration.hl7v2.settings import Hl7Settings


class Section(BaseModel):
    """A settings section: unknown keys are errors, so a typo cannot pass silently."""
    model_config = ConfigDict(extra="forbid")


class AllowedCaller(Section):
    """A calling AE title, the source hosts (IP addresses) it may connect from and, optionally,
    the TLS client certificates it must present."""
    ae_title: str
    hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1"])
    cert_subjects: list[str] = Field(default_factory=list)  # TLS only: the client certificate must be one of these (subject DN, or DNS:/IP:/URI:/email: SAN)

    @field_validator("cert_subjects")
    @classmethod
    def _subjects(cls, v: list[str]) -> list[str]:
        from integration.dicom_scp.identity import parse_subject
        for entry in v:
            parse_subject(entry)                      # raises ValueError on a malformed entry
        return v


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
    plain_listener: bool = True                       # listen on `port` without TLS; false: DICOM over TLS only
    allowed_callers: list[AllowedCaller] = Field(default_factory=list)
    accept_unknown_callers: bool = False              # reject unknown AEs by default
    max_associations: int = 16
    max_connections_per_host: int = 4                 # concurrent TCP connections from one source address (IPv6: one /64)
    pre_association_timeout: float = 5.0              # seconds a new connection may take (TLS handshake included) to send its A-ASSOCIATE-RQ
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_pdu: int = 65536
    max_pixels: int = 40_000_000                      # refuse absurd dimensions
    max_object_bytes: int = 256 * 1024 * 1024         # refuse larger objects while they arrive (0xC003)
    min_free_bytes: int = 512 * 1024 * 1024           # answer 0xA700 below this
    tls: TlsSettings = Field(default_factory=TlsSettings)
    destinations: list[Destination] = Field(default_factory=list)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        if not 0 < len(v) <= 16:
            raise ValueError("AE title must be 1-16 characters")
        return v

    @model_validator(mode="after")
    def _listens(self) -> DicomSettings:
        if not self.plain_listener and not self.tls.enabled:
            raise ValueError("dicom.plain_listener = false needs dicom.tls.enabled = true (nothing would listen)")
        if self.max_connections_per_host < 1 or self.pre_association_timeout <= 0:
            raise ValueError("dicom.max_connections_per_host must be >= 1 and dicom.pre_association_timeout > 0")
        bound = [c.ae_title for c in self.allowed_callers if c.cert_subjects]
        if bound and not self.tls.enabled:
            raise ValueError(f"dicom.allowed_callers {bound} name cert_subjects: enable dicom.tls "
                             "(they can only associate over TLS)")
        return self


class WorkerSettings(Section):
    lease_seconds: float = 120.0
    max_attempts: int = 5
    delivery_max_attempts: int = 20                   # tries before a delivery becomes `dead` (outages outlast a bad job)
    backoff_base_s: float = 2.0
    backoff_max_s: float = 600.0
    poll_interval_s: float = 0.2
    batch_size: int = 8


class ModelSettings(Section):
    path: Path | None = None                          # default: the model shipped in the package
    threads: int = 0                                  # 0: ONNX Runtime decides


class AuditSettings(Section):
    directory: Path | None = None                     # default <workdir>/audit-trail
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
    token_lifetime_days: float = 90.0                 # lifetime of a token issued by `dermgate api-token add` (its --days wins); tokens issued without an expiry expire this long after `created`
    max_body_bytes: int = 65536                       # request bodies above this are refused with 413, before they are read
    max_stow_bytes: int = 256 * 1024 * 1024           # STOW-RS (/dicomweb/) bodies: whole images, after authentication
    auth_failures_before_lockout: int = 10            # failed authentications from one source, or with one token, within auth_failure_window_s before 429
    auth_failure_window_s: float = 60.0               # the window those failures are counted in
    lockout_s: float = 300.0                          # how long a locked-out source or token is answered 429 (Retry-After)
    audit_coalesce_s: float = 60.0                    # repeated authentication failures of one source become one audit record per window, with their count
    trusted_proxies: list[str] = Field(default_factory=list)  # addresses/CIDRs whose X-Forwarded-For (and X-Forwarded-Proto) is honoured; others' is ignored
    purposes_of_use: list[str] = Field(default_factory=lambda: ["TREAT", "ETREAT", "HOPERAT"])  # X-Purpose-Of-Use values accepted (HL7 v3 PurposeOfUse); others are refused with 400
    default_purpose_of_use: str = "TREAT"             # the purpose recorded when a request names none (always accepted)
    hsts_max_age_s: int = 31_536_000                  # Strict-Transport-Security max-age on HTTPS responses

    @model_validator(mode="after")
    def _consistent(self) -> ApiSettings:
        if self.max_body_bytes < 1 or self.auth_failures_before_lockout < 1 or self.token_lifetime_days <= 0:
            raise ValueError("api.max_body_bytes and api.auth_failures_before_lockout must be >= 1, "
                             "api.token_lifetime_days > 0")
        import ipaddress
        for proxy in self.trusted_proxies:
            ipaddress.ip_network(proxy, strict=False)  # raises ValueError on a malformed entry
        return self


class StoreSettings(Section):
    """Encryption at rest of received objects, derived objects and FHIR bundle files."""
    encrypt: bool | None = None                       # AES-256-GCM per file; default: on in production, off in development
    key_file: Path | None = None                      # store keyring (0600); default <workdir>/keys/store.key; DERMGATE_STORE_KEY wins
    encrypted_volume: bool = False                    # production with encrypt = false: the operator confirms the store lies on an encrypted volume
    accept_plaintext: bool = False                    # with encrypt: also read files written before encryption was switched on


class FhirPullSettings(Section):
    """Which EHR reports are pathology outcomes (``dermgate outcomes pull-fhir``): DiagnosticReports of
    the patients with AI results, searched by category (any of) and, when set, code (any of);
    each entry is a FHIR token ``system|code``."""
    categories: list[str] = Field(default_factory=lambda: [
        "http://terminology.hl7.org/CodeSystem/v2-0074|SP",     # HL7 v2 0074: Surgical Pathology
        "http://terminology.hl7.org/CodeSystem/v2-0074|PAT",    # Pathology
        "http://loinc.org|LP7839-6",                            # LOINC part: Pathology (US Core)
    ])
    codes: list[str] = Field(default_factory=list)   # e.g. "http://loinc.org|22637-3" (path report final dx)
    snomed_map: dict[str, str] = Field(default_factory=dict)   # SNOMED CT code -> class, benign or malignant
    text_map: dict[str, str] = Field(default_factory=dict)     # regular expression -> class, benign or malignant
    lookback_days: int = 365                          # reports issued at most this long ago
    source: str = "histopathology"


class OutcomeSettings(Section):
    """Outcomes (the truth for a lesion) and how they link to AI results."""
    link_window_days: int = 90        # patient + body site: image and outcome at most this many days apart
    fhir_pull: FhirPullSettings = Field(default_factory=FhirPullSettings)


class MonitorSettings(Section):
    """Live performance against outcomes, and its alarms (``dermgate monitor report``)."""
    windows_days: list[int] = Field(default_factory=lambda: [30, 90])
    sensitivity_floor: float = 0.90       # alarm: the 95% lower bound of sensitivity under this
    max_drop_vs_card: float = 0.05        # alarm: AUC or sensitivity this far under the model card's test figure
    min_positives: int = 30               # malignant outcomes a window needs for the drop and false-negative alarms
    floor_min_positives: int = 150        # malignant outcomes a window needs for the sensitivity-floor alarm
    min_outcomes: int = 100               # linked outcomes a window needs for AUC and calibration alarms
    alpha: float = 0.01                   # one-sided test level of the false-negative and calibration alarms
    ece_max_increase: float = 0.05        # alarm: ECE of P(malignant) this far above the model card's
    age_bands: list[int] = Field(default_factory=lambda: [0, 30, 50, 70])   # lower edges, years
    psi_alarm: float = 0.25               # drift alarm: population stability index at or above this
    drift_min_images: int = 200           # images a device needs before its drift alarms count
    drift_window_days: int = 30


class RecallSettings(Section):
    """``dermgate model recall``: what a recalled result becomes in the EHR."""
    fhir_action: Literal["entered-in-error", "amended"] = "entered-in-error"   # amended: kept, with the recall notice


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
    store: StoreSettings = Field(default_factory=StoreSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    fhir: FhirSettings | None = None
    fhir_bundle_dir: Path | None = None               # also write each FHIR bundle here (demo without an EHR)
    outcomes: OutcomeSettings = Field(default_factory=OutcomeSettings)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    recall: RecallSettings = Field(default_factory=RecallSettings)
    hl7: Hl7Settings | None = None                    # HL7 v2 ORU^R01 over MLLP (docs/hl7v2.md)

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
        network interface without TLS, a DICOM SCP that accepts unknown callers, a plain
        DICOM port beside a TLS port that requires client certificates, or a store that is
        neither encrypted nor confirmed to lie on an encrypted volume."""
        if self.environment != "production":
            return self
        loopback = ("127.0.0.1", "::1", "localhost")
        if (self.api.host not in loopback and not (self.api.tls_cert_file and self.api.tls_key_file)
                and not self.api.plain_http_behind_tls_proxy):
            raise ValueError("production: api.host is a network interface, set api.tls_cert_file and "
                             "api.tls_key_file (or put a TLS proxy in front and bind the API to loopback)")
        if self.dicom.accept_unknown_callers:
            raise ValueError("production: dicom.accept_unknown_callers must be false")
        for setting, path in (("audit.signing_key_file", self.audit.signing_key_file),
                              ("audit.key_file", self.audit.key_file)):
            if path is not None and any(Path(path).resolve().is_relative_to(Path(d).resolve())
                                        for d in (self.audit_dir, self.workdir)):
                raise ValueError(f"production: {setting} lies in the work dir or the audit directory, beside the "
                                 "trail it protects; keep it apart (systemd credential, Secret, or the environment)")
        if self.dicom.tls.enabled and self.dicom.tls.require_client_cert and self.dicom.plain_listener:
            raise ValueError("production: dicom.tls.require_client_cert is set but the plain DICOM port still "
                             "listens without any certificate; set dicom.plain_listener = false")
        if self.store.encrypt is False and not self.store.encrypted_volume:
            raise ValueError("production: store.encrypt is false; encrypt the store (remove the setting) or "
                             "confirm that the work dir lies on an encrypted volume with store.encrypted_volume = true")
        return self

    # Derived locations, all under the work dir unless configured.
    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.workdir / 'dermgate.db').resolve()}"

    @property
    def store_dir(self) -> Path:
        return self.workdir / "store"

    @property
    def store_encrypted(self) -> bool:
        """Whether stored files are encrypted: ``store.encrypt``, by default on in production only."""
        return self.store.encrypt if self.store.encrypt is not None else self.environment == "production"

    @property
    def store_key_file(self) -> Path:
        return self.store.key_file or self.workdir / "keys" / "store.key"

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
        """Settings for display and config-change audit: paths only, never key material, and no
        credentials (the password in ``database_url``, any secret-looking field) in any value."""
        from audit.phi import redact_secrets
        return redact_secrets(self.model_dump(mode="json"))
