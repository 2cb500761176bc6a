"""Binding calling AE titles to TLS client certificates (``dicom.allowed_callers[].cert_subjects``).

A certificate from the configured CA proves only that the CA issued it; which
modality it belongs to is said here. An allow-list entry may name the
certificates its AE title must present, each as one of:

* ``CN=DERMSCOPE01,O=Hospital``     the certificate's whole subject (RFC 4514; attribute
  order, case and repeated blanks ignored; every attribute must match, none may be extra);
* ``DNS:scope01.hospital.example``  a dNSName in the subjectAltName (case ignored);
* ``IP:10.1.2.3``                   an iPAddress in the subjectAltName;
* ``URI:urn:oid:1.2.3``             a uniformResourceIdentifier in the subjectAltName;
* ``email:scope@hospital.example``  an rfc822Name in the subjectAltName (case ignored).

This module needs nothing but ``cryptography``: the settings validate entries with it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

from cryptography import x509

SAN_KINDS: Final = {"DNS": x509.DNSName, "IP": x509.IPAddress, "URI": x509.UniformResourceIdentifier,
                    "EMAIL": x509.RFC822Name}
_CASELESS: Final = frozenset({"DNS", "EMAIL"})

Attributes = frozenset[tuple[str, str]]


@dataclass(frozen=True)
class SubjectMatcher:
    """One ``cert_subjects`` entry, parsed: a whole subject (``kind == "DN"``) or one SAN."""
    kind: str
    value: Attributes | str
    text: str


def _norm(value: str) -> str:
    return " ".join(value.split()).casefold()


def _attributes(name: x509.Name) -> Attributes:
    return frozenset((attr.oid.dotted_string, _norm(str(attr.value))) for attr in name)


def _san_value(kind: str, value: str) -> str:
    if kind == "IP":
        return str(ipaddress.ip_address(value.strip()))
    return value.strip().casefold() if kind in _CASELESS else value.strip()


def parse_subject(entry: str) -> SubjectMatcher:
    """Parse one entry; ``ValueError`` when it is neither a subject DN nor a known SAN form."""
    text = entry.strip()
    if not text:
        raise ValueError("empty certificate subject")
    prefix, sep, rest = text.partition(":")
    if sep and "=" not in prefix and prefix.upper() in SAN_KINDS:
        kind = prefix.upper()
        if not rest.strip():
            raise ValueError(f"certificate subject {entry!r}: nothing after {prefix}:")
        try:
            return SubjectMatcher(kind, _san_value(kind, rest), text)
        except ValueError as exc:
            raise ValueError(f"certificate subject {entry!r}: {exc}") from None
    try:
        # blanks after the commas ("CN=X, O=Y", as OpenSSL prints subjects) are not part of the values
        name = x509.Name.from_rfc4514_string(",".join(part.strip() for part in re.split(r"(?<!\\),", text)))
    except ValueError as exc:
        raise ValueError(f"certificate subject {entry!r} is not an RFC 4514 name nor DNS:/IP:/URI:/email: "
                         f"({exc})") from None
    if not len(name):
        raise ValueError(f"certificate subject {entry!r} names no attribute")
    return SubjectMatcher("DN", _attributes(name), text)


@dataclass(frozen=True)
class PeerCertificate:
    """What a verified client certificate says about its holder, for matching and the audit trail."""
    subject: Attributes
    subject_text: str
    sans: frozenset[tuple[str, str]]

    @classmethod
    def from_der(cls, der: bytes) -> PeerCertificate:
        cert = x509.load_der_x509_certificate(der)
        sans: set[tuple[str, str]] = set()
        try:
            ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            ext = None
        if ext is not None:
            for kind, general_name in SAN_KINDS.items():
                for value in ext.get_values_for_type(general_name):  # type: ignore[type-var,call-overload]
                    try:
                        sans.add((kind, _san_value(kind, str(value))))
                    except ValueError:
                        continue
        return cls(_attributes(cert.subject), cert.subject.rfc4514_string(), frozenset(sans))

    def matches(self, matcher: SubjectMatcher) -> bool:
        if matcher.kind == "DN":
            return self.subject == matcher.value
        return (matcher.kind, matcher.value) in self.sans

    def describe(self) -> str:
        """Subject and SANs as one line for the audit record (no PHI: device identities)."""
        sans = ", ".join(f"{k}:{v}" for k, v in sorted(self.sans))
        return f"{self.subject_text}" + (f" [{sans}]" if sans else "")
