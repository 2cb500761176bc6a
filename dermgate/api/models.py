"""Typed bodies of the JSON API (requests and responses), so the OpenAPI document says exactly
what a machine client gets."""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel, Field

from inference.result import CLASSES, DISCLAIMER

Diagnosis = Literal[CLASSES]  # type: ignore[valid-type]


class ErrorOut(BaseModel):
    detail: str = Field(description="why the request was refused")


class ModelOut(BaseModel):
    manufacturer: str
    name: str
    version: str
    sha256: str
    device_uid: str


class AIResult(BaseModel):
    probabilities: dict[str, float] = Field(description="calibrated probability of each of the 7 classes")
    malignancy_probability: float = Field(description="mel + bcc + akiec")
    risk: Literal["Low", "Medium", "High", "Not assessable"]
    uncertainty: float = Field(description="normalised entropy, 0 (certain) to 1")
    low_confidence: bool
    assessable: bool
    reason: str | None = Field(None, description="why the image is not assessable")
    top_class: str
    model: ModelOut
    ood_score: float | None = Field(None, description="distance to the training data (Mahalanobis, docs/monitoring.md)")
    out_of_distribution: bool | None = Field(None, description="the image lies outside the training distribution")


class ResultOut(BaseModel):
    sop_instance_uid: str
    study_instance_uid: str
    state: str = Field(description="job state: received, classified, rendered, delivered or failed")
    result: AIResult | None
    disclaimer: str = DISCLAIMER


class ReviewIn(BaseModel):
    decision: Literal["confirm", "override"]
    diagnosis: Diagnosis | None = None  # type: ignore[valid-type]
    comment: str | None = None


class ReviewOut(BaseModel):
    id: int
    decision: Literal["confirm", "override"]
    diagnosis: str | None
    sop_instance_uid: str
    reviewer: str
    created_at: datetime


class LatestReview(BaseModel):
    decision: str
    reviewer: str
    reviewed_at: datetime


class ResultSummary(BaseModel):
    sop_instance_uid: str
    study_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str | None
    accession_number: str | None
    received_at: datetime
    device: str = Field(description="calling AE title of the modality")
    body_site: str | None
    state: Literal["awaiting review", "reviewed", "processing", "failed"]
    job_state: str
    top_class: str | None
    risk: str | None
    malignancy_probability: float | None
    low_confidence: bool
    assessable: bool
    review: LatestReview | None


class ResultsPage(BaseModel):
    items: list[ResultSummary]
    total: int = Field(description="results matching the filter")
    page: int
    page_size: int
    pages: int
    counts: dict[str, int] = Field(description="results per worklist state (whole worklist)")
    disclaimer: str = DISCLAIMER


class ResultsQuery(BaseModel):
    """Filters of ``GET /api/v1/results`` (no patient data in a URL: filter by state, risk, device, date)."""
    state: Literal["awaiting review", "reviewed", "processing", "failed"] | None = None
    risk: Literal["Low", "Medium", "High", "Not assessable"] | None = None
    device: str | None = None
    received_from: date | None = None
    received_to: date | None = None
    low_confidence: bool | None = None
    not_assessable: bool | None = None


class DeadLetterOut(BaseModel):
    id: int
    channel: str
    kind: str
    attempts: int
    last_error: str | None


class ReadinessOut(BaseModel):
    ready: bool
    checks: dict[str, dict[str, object]]
