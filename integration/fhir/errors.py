"""The FHIR package's one exception tree; httpx errors are translated into it in ``client.py`` only.

    FhirError                      .reason (no PHI), .status, .retryable
    ├── FhirTransientError         retry with back-off (retryable = True)
    │   ├── FhirUnavailable        connection refused / reset / cut mid-response
    │   │   └── FhirTimeout        connect, read, write or pool timeout
    │   ├── FhirServerError        5xx
    │   ├── FhirThrottled          429, or 503 with Retry-After (.retry_after_s)
    │   ├── FhirConflict           409 / 412: version changed under us, re-read and retry
    │   ├── TokenEndpointError     the OAuth token endpoint is down or overloaded
    │   ├── FhirAuthError          token refused, or 401 after a fresh token: a site-wide
    │   │                          configuration problem, not this message's fault, so it
    │   │                          waits (and alerts) instead of dead-lettering every report
    │   ├── PatientNotYetKnown     no / several Patients, policy "retry"
    │   └── ReportNotYetDelivered  a review arrived before its report reached the EHR
    └── FhirPermanentError         dead-letter at once (retryable = False)
        ├── FhirRejected           4xx with the server's OperationOutcome (.issues)
        ├── PatientMatchError      no / several Patients, policy "fail"; unmapped issuer
        ├── ReportWithdrawn        the EHR marked the report entered-in-error / cancelled: never overwritten
        └── FhirConfigError        unusable configuration (bad key, missing URL)
"""

from __future__ import annotations

from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any


class FhirError(Exception):
    retryable = True

    def __init__(self, reason: str, *, status: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after_s = retry_after_s


class FhirTransientError(FhirError):
    retryable = True


class FhirUnavailable(FhirTransientError):
    pass


class FhirTimeout(FhirUnavailable):
    pass


class FhirServerError(FhirTransientError):
    pass


class FhirThrottled(FhirTransientError):
    pass


class FhirConflict(FhirTransientError):
    pass


class TokenEndpointError(FhirTransientError):
    pass


class FhirAuthError(FhirTransientError):
    pass


class PatientNotYetKnown(FhirTransientError):
    pass


class ReportNotYetDelivered(FhirTransientError):
    pass


class FhirPermanentError(FhirError):
    retryable = False


class FhirRejected(FhirPermanentError):
    def __init__(self, reason: str, *, status: int | None = None, issues: list[dict[str, Any]] | None = None) -> None:
        super().__init__(reason, status=status)
        self.issues = issues or []


class PatientMatchError(FhirPermanentError):
    pass


class FhirConfigError(FhirPermanentError):
    pass


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


class ReportWithdrawn(FhirPermanentError):
    """The EHR withdrew the report (``entered-in-error`` / ``cancelled``): a review must not bring it back."""
