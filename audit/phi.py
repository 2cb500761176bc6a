"""Defence in depth for application logs: a structlog processor that blanks PHI-looking fields.

Code should never log PHI in the first place (only UIDs, hashed or truncated);
this processor catches the slip: any key that names a patient identifier,
name, birth date or similar (``patient_id``, ``PatientName``, ``birth-date``,
``dob``, ``mrn`` ...) has its value replaced, at any depth of nested dicts and
lists. Add it to the structlog chain before the renderer::

    structlog.configure(processors=[..., redact_phi, structlog.processors.JSONRenderer()])
"""

from __future__ import annotations

import re
from typing import Any, Iterable, MutableMapping

REDACTED = "[redacted]"

# normalised (lower case, no separators) key names that carry PHI
PHI_KEYS = frozenset({
    "patientid", "patientname", "patientbirthdate", "birthdate", "dateofbirth", "dob", "mrn",
    "medicalrecordnumber", "otherpatientids", "otherpatientnames", "patientaddress", "patienttelephonenumbers",
    "patientmothersbirthname", "issuerofpatientid", "patientsbirthdate", "patientsname", "ssn",
    "socialsecuritynumber", "patient", "patients", "patientfilter",
})
_SEPARATORS = re.compile(r"[\s_\-.]")
_MAX_DEPTH = 8


def _normalise(key: str) -> str:
    return _SEPARATORS.sub("", key).lower().replace("'", "")


def is_phi_key(key: object, extra: frozenset[str] = frozenset()) -> bool:
    if not isinstance(key, str):
        return False
    norm = _normalise(key)
    return norm in PHI_KEYS or norm in extra


def _scrub(value: Any, extra: frozenset[str], depth: int) -> Any:
    if depth > _MAX_DEPTH:
        return value
    if isinstance(value, dict):
        return {k: REDACTED if is_phi_key(k, extra) else _scrub(v, extra, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub(v, extra, depth + 1) for v in value)
    return value


def make_phi_redactor(extra_keys: Iterable[str] = ()):  # type: ignore[no-untyped-def]
    """A redacting processor that also treats ``extra_keys`` (any spelling) as PHI."""
    extra = frozenset(_normalise(k) for k in extra_keys)

    def redact(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key in list(event_dict):
            if key == "event":
                continue                                # the message itself is a constant by convention
            if is_phi_key(key, extra):
                event_dict[key] = REDACTED
            else:
                event_dict[key] = _scrub(event_dict[key], extra, 1)
        return event_dict

    return redact


redact_phi = make_phi_redactor()
"""The default processor: ``structlog.configure(processors=[..., redact_phi, renderer])``."""
