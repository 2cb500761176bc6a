"""Defence in depth for application logs and displayed settings: blank PHI and secrets.

Code should never log PHI in the first place (only UIDs, hashed or truncated);
these processors catch the slip, and catch what other libraries write
(highdicom, pydicom, Alembic, the ``warnings`` module), whose messages carry
raw values such as ``Invalid value for VR DA: '1970-01-31'``:

- by key: any key that names a patient identifier, name, birth date or similar
  (``patient_id``, ``PatientName``, ``birth-date``, ``dob``, ``mrn`` ...) or a
  secret (``password``, ``token``, ``client_secret`` ...) has its value
  replaced, at any depth of nested dicts and lists;
- by value (:func:`redact_text`), in every string including the message
  itself: quoted values (what libraries quote is the offending value), dates,
  DICOM person names (``Family^Given``), and credentials in URLs or
  ``password=`` pairs, and URL query strings (``?identifier=system|MRN``).

Add it to the structlog chain before the renderer::

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
    "socialsecuritynumber", "patient", "patients", "patientfilter", "patientsaddress", "patientstelephonenumbers",
    "patientsex", "patientssex", "patientage", "patientsage", "patientsize", "patientssize", "patientweight",
    "patientsweight", "ethnicgroup", "patientcomments", "accessionnumber", "otherpatientidssequence",
    "patientbirthname", "patientsbirthname", "responsibleperson", "referringphysicianname",
})
# normalised key names (substrings) that carry secrets; a key naming a file or path holds no secret itself
SECRET_WORDS = ("password", "passwd", "secret", "token", "apikey", "privatekey", "credential", "authorization",
                "cookie", "passphrase")
PATH_SUFFIXES = ("file", "path", "dir", "directory", "url")
# keys whose values the logging framework sets (never PHI, and must stay machine-readable)
STRUCTURAL_KEYS = frozenset({"timestamp", "level", "logger", "logger_name"})
_SEPARATORS = re.compile(r"[\s_\-.]")
_MAX_DEPTH = 8

# --- values inside free text -------------------------------------------------------------------------
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]*)@")
_PASSWORD_PAIR = re.compile(r"(?i)\b(password|passwd|pwd|secret|token)\s*[=:]\s*(\"[^\"]*\"|'[^']*'|[^\s,;&]+)")
_QUOTED = re.compile(r"(?<!File )(?:'[^'\n]*'|\"[^\"\n]*\"|`[^`\n]*`)")   # not traceback file names
_DATES = re.compile(r"(?<![\d.])(?:(?:1[89]|20)\d\d[-/.]?(?:0[1-9]|1[0-2])[-/.]?(?:0[1-9]|[12]\d|3[01])"
                    r"|(?:0?[1-9]|[12]\d|3[01])[./](?:0?[1-9]|1[0-2])[./](?:1[89]|20)\d\d)(?![\d.])")
_PERSON_NAME = re.compile(r"[^\s^'\"=]*\^[^\s'\"]*")
_URL_QUERY = re.compile(r"(?P<base>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s?#'\"]*)\?[^\s#'\"]*")   # ?identifier=sys|MRN


def _normalise(key: str) -> str:
    return _SEPARATORS.sub("", key).lower().replace("'", "")


def is_phi_key(key: object, extra: frozenset[str] = frozenset()) -> bool:
    if not isinstance(key, str):
        return False
    norm = _normalise(key)
    return norm in PHI_KEYS or norm in extra


def is_secret_key(key: object) -> bool:
    """``password``, ``client_secret``, ``api_token`` ...; not ``key_file`` or ``tokens_file`` (paths)."""
    if not isinstance(key, str):
        return False
    norm = _normalise(key)
    return any(word in norm for word in SECRET_WORDS) and not norm.endswith(PATH_SUFFIXES)


def redact_credentials(text: str) -> str:
    """Only the secrets: ``scheme://user:PASSWORD@host`` and ``password=...`` pairs (for settings, URLs)."""
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    return _PASSWORD_PAIR.sub(lambda m: f"{m.group(1)}={REDACTED}", text)


def redact_text(text: str) -> str:
    """Free text (a log message, an error, a retry reason) with every value that may be PHI blanked."""
    text = redact_credentials(text)
    text = _URL_QUERY.sub(lambda m: f"{m['base']}?{REDACTED}", text)
    text = _QUOTED.sub(lambda m: m.group(0)[0] + REDACTED + m.group(0)[-1], text)
    text = _DATES.sub(REDACTED, text)
    return _PERSON_NAME.sub(REDACTED, text)


def _scrub(value: Any, extra: frozenset[str], depth: int) -> Any:
    if depth > _MAX_DEPTH:
        return REDACTED if isinstance(value, (dict, list, tuple, str)) else value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: REDACTED if is_phi_key(k, extra) or is_secret_key(k) else _scrub(v, extra, depth + 1)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub(v, extra, depth + 1) for v in value)
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return redact_text(str(value))                      # exceptions, paths, objects: their text may carry values


def make_phi_redactor(extra_keys: Iterable[str] = ()):  # type: ignore[no-untyped-def]
    """A redacting processor that also treats ``extra_keys`` (any spelling) as PHI."""
    extra = frozenset(_normalise(k) for k in extra_keys)

    def redact(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key in list(event_dict):
            if key in STRUCTURAL_KEYS or key.startswith("_"):
                continue                                # framework fields (and structlog's private ones)
            if is_phi_key(key, extra) or is_secret_key(key):
                event_dict[key] = REDACTED
            else:                                       # the message too: other libraries put values in it
                event_dict[key] = _scrub(event_dict[key], extra, 1)
        return event_dict

    return redact


redact_phi = make_phi_redactor()
"""The default processor: ``structlog.configure(processors=[..., redact_phi, renderer])``."""


def redact_secrets(value: Any, depth: int = 0) -> Any:
    """Settings for display or an audit record: secret-looking keys blanked, credentials cut out of URLs.

    Paths, ports, AE titles and the like stay readable (unlike :func:`redact_text`).
    """
    if depth > _MAX_DEPTH:
        return value
    if isinstance(value, str):
        return redact_credentials(value)
    if isinstance(value, dict):
        return {k: (REDACTED if is_secret_key(k) and v not in (None, "") else redact_secrets(v, depth + 1))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_secrets(v, depth + 1) for v in value)
    return value
