"""FHIR delivery settings, nested into the service settings as ``settings.fhir``.

Only the *path* of the private key lives here, never the key: settings are
printed, diffed and audited (CONFIG_CHANGE), keys are not.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from pydantic import BaseModel, Field, HttpUrl, field_validator, model_validator

DEFAULT_SCOPES = (
    "system/Patient.read system/ImagingStudy.read system/Device.write "
    "system/Observation.write system/DiagnosticReport.read system/DiagnosticReport.write "
    "system/DocumentReference.read system/DocumentReference.write"
)


class ProfileName(str, Enum):
    """EHR profiles: what is sent, and how (see docs/fhir-profiles.md)."""
    GENERIC_R4 = "generic-r4"
    EPIC = "epic"
    ORACLE_HEALTH = "oracle-health"


class SigningAlg(str, Enum):
    """Client assertion algorithms SMART Backend Services requires servers to support."""
    RS384 = "RS384"
    ES384 = "ES384"


class NoMatchPolicy(str, Enum):
    """What to do when no Patient carries the image's identifier."""
    FAIL = "fail"                              # dead-letter with the reason (audited)
    RETRY = "retry"                            # the EHR may not know the patient yet (ADT lag)
    CREATE_PLACEHOLDER = "create-placeholder"  # conditional-create a Patient holding only the identifier


class MultipleMatchPolicy(str, Enum):
    """What to do when several Patients carry the identifier; never guess between them."""
    FAIL = "fail"
    RETRY = "retry"                            # wait for the EHR's merge to settle


class Timeouts(BaseModel):
    """httpx timeouts in seconds; a hung EHR must not hold an outbox lease forever."""
    connect_s: float = 5.0
    read_s: float = 30.0
    write_s: float = 30.0
    pool_s: float = 5.0


class FhirSettings(BaseModel):
    """Everything the FHIR channel needs; ``base_url`` None means FHIR delivery is off."""

    base_url: HttpUrl | None = None
    profile: ProfileName = ProfileName.GENERIC_R4

    # SMART Backend Services (all four None/empty: no auth, e.g. a test server)
    token_url: HttpUrl | None = None
    client_id: str | None = None
    private_key_file: Path | None = None    # PEM; read at start-up, never logged
    alg: SigningAlg = SigningAlg.RS384
    key_id: str | None = None              # JWS "kid"; default: RFC 7638 thumbprint of the public key
    jku: HttpUrl | None = None             # our JWK Set URL, sent as the JWS "jku" header (Epic)
    scopes: str = DEFAULT_SCOPES
    assertion_lifetime_s: int = Field(default=300, ge=10, le=300)  # SMART: at most 5 minutes

    # Patient matching: DICOM Patient ID + Issuer of Patient ID -> Identifier.system
    patient_identifier_systems: dict[str, str] = Field(default_factory=dict)
    default_patient_identifier_system: str | None = None   # used when the issuer is absent or unmapped
    on_no_patient: NoMatchPolicy = NoMatchPolicy.FAIL
    on_multiple_patients: MultipleMatchPolicy = MultipleMatchPolicy.FAIL

    # Business identifiers: systems are "<identifier_namespace>:<kind>"
    identifier_namespace: str = "urn:dermgate"
    link_imaging_study: bool = True        # look up ImagingStudy by Study Instance UID at delivery
    send_observations: bool = True         # False: the report alone (EHRs that refuse Observation create)
    performer_reference: str | None = None # e.g. "Organization/123" (US Core: a reference); default: display only
    performer_display: str = "Dermatology AI decision support service"
    author_reference: str | None = None    # "Practitioner/123": the documents' author (oracle-health requires one)
    local_timezone: str = "UTC"            # site time zone, for StudyDate/Time without Timezone Offset From UTC

    # Reviewing clinicians as Practitioner references: per signed-in user, else looked up by identifier
    practitioner_references: dict[str, str] = Field(default_factory=dict)   # user -> "Practitioner/123"
    practitioner_identifier_system: str | None = None   # Practitioner?identifier=<system>|<user> at delivery

    # Context looked up at delivery (each skipped when the EHR has none or refuses the search)
    link_encounter: bool = True            # Encounter by the image's Admission ID -> report/Observation.encounter
    link_service_request: bool = True      # ServiceRequest by placer/filler/accession number -> basedOn
    order_identifier_system: str | None = None   # system of placer/filler order numbers (logical basedOn)
    send_provenance: bool | None = None    # a Provenance with the model Device as agent; None: the profile decides
    model_card_url: str | None = None      # where the site publishes models/MODEL_CARD.md (Device.note)
    class_snomed_codes: dict[str, str] = Field(default_factory=dict)  # site overrides / additions per class

    timeouts: Timeouts = Field(default_factory=Timeouts)
    verify_tls: bool | Path = True         # or a CA bundle path

    @field_validator("identifier_namespace")
    @classmethod
    def _no_trailing_colon(cls, value: str) -> str:
        return value.rstrip(":/")

    @model_validator(mode="after")
    def _auth_all_or_nothing(self) -> FhirSettings:
        parts = (self.token_url, self.client_id, self.private_key_file)
        if any(p is not None for p in parts) and not all(p is not None for p in parts):
            raise ValueError("token_url, client_id and private_key_file go together")
        return self

    @property
    def auth_enabled(self) -> bool:
        return self.token_url is not None

    @property
    def fhir_base(self) -> str:
        """Base URL with exactly one trailing slash, so relative paths resolve under it."""
        if self.base_url is None:
            raise ValueError("FHIR delivery is not configured (fhir.base_url)")
        return str(self.base_url).rstrip("/") + "/"

    def system(self, kind: str) -> str:
        """Identifier system of one kind of business identifier (report, observation, model...)."""
        return f"{self.identifier_namespace}:{kind}"
