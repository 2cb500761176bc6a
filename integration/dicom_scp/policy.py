"""Association policy: who may associate, and only when something can be stored.

Decisions are made on A-ASSOCIATE-RQ, before pynetdicom negotiates, in an
``EVT_REQUESTED`` handler that sends a real A-ASSOCIATE-RJ (PS3.8 9.3.4):

* calling AE title not on the allow-list, or a listed title from a host not
  listed for it, or (where the entry names ``cert_subjects``) without a TLS client
  certificate bound to it -> rejected-permanent, service-user, calling-AE-title-not-recognized;
* called AE title is not ours -> rejected-permanent, service-user, called-AE-title-not-recognized;
* no proposed presentation context would be accepted -> rejected-permanent,
  service-user, no-reason-given. pynetdicom would otherwise *accept* the
  association with every context rejected, leaving the peer to abort.

The maximum number of concurrent associations is enforced by pynetdicom
(rejected-transient, service-provider presentation, local-limit-exceeded) and
audited here through ``EVT_REJECTED``. Every decision becomes an audit record.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import structlog
from pydicom.uid import UID
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from audit.api import AuditEvent, AuditSink, EventType, Outcome
from dermgate import metrics
from dermgate.settings import DicomSettings
from integration.dicom_scp.identity import PeerCertificate, SubjectMatcher, parse_subject

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# A-ASSOCIATE-RJ (result, source, reason/diag.) -- PS3.8 Table 9-21
REJECTED_PERMANENT: Final = 0x01
REJECTED_TRANSIENT: Final = 0x02
SOURCE_SERVICE_USER: Final = 0x01
SOURCE_SERVICE_PROVIDER_ACSE: Final = 0x02
SOURCE_SERVICE_PROVIDER_PRESENTATION: Final = 0x03
DIAG_NO_REASON: Final = 0x01
DIAG_CALLING_AE_NOT_RECOGNIZED: Final = 0x03
DIAG_CALLED_AE_NOT_RECOGNIZED: Final = 0x07

Rejection = tuple[int, int, int]
REJECT_UNKNOWN_CALLER: Final[Rejection] = (REJECTED_PERMANENT, SOURCE_SERVICE_USER, DIAG_CALLING_AE_NOT_RECOGNIZED)
REJECT_WRONG_CALLED_AE: Final[Rejection] = (REJECTED_PERMANENT, SOURCE_SERVICE_USER, DIAG_CALLED_AE_NOT_RECOGNIZED)
REJECT_NO_CONTEXT: Final[Rejection] = (REJECTED_PERMANENT, SOURCE_SERVICE_USER, DIAG_NO_REASON)

ROLE_MODALITY: Final = "modality"


@dataclass(frozen=True)
class Decision:
    """Accept, or reject with an A-ASSOCIATE-RJ triple and a reason for the audit trail."""
    accepted: bool
    reason: str
    rejection: Rejection | None = None

    @classmethod
    def accept(cls, reason: str) -> Decision:
        return cls(True, reason)

    @classmethod
    def reject(cls, rejection: Rejection, reason: str) -> Decision:
        return cls(False, reason, rejection)


def _networks(hosts: Iterable[str]) -> tuple[Network, ...]:
    """Hosts as single addresses or CIDR blocks ("10.1.2.0/24")."""
    return tuple(ipaddress.ip_network(h.strip(), strict=False) for h in hosts)


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped                  # ::ffff:10.0.0.1 from a dual-stack socket
    return addr


@dataclass(frozen=True)
class CallerRule:
    """One allow-list entry: the hosts a title may come from and, if any, the certificates it must show."""
    networks: tuple[Network, ...]
    subjects: tuple[SubjectMatcher, ...]


class AssociationPolicy:
    """The allow-list of calling AE titles, their source hosts and certificates, and the context check."""

    def __init__(self, cfg: DicomSettings) -> None:
        self.own_ae = cfg.ae_title.strip()
        self.accept_unknown = cfg.accept_unknown_callers
        self.acse_timeout = cfg.acse_timeout
        self.callers: dict[str, list[CallerRule]] = {}
        for caller in cfg.allowed_callers:
            rule = CallerRule(_networks(caller.hosts), tuple(parse_subject(s) for s in caller.cert_subjects))
            self.callers.setdefault(caller.ae_title.strip(), []).append(rule)
        self._all_networks = tuple(net for rules in self.callers.values() for r in rules for net in r.networks)

    def host_listed(self, host: str) -> bool:
        """Could a connection from ``host`` ever be admitted? (Checked at TCP accept.)"""
        if self.accept_unknown:
            return True
        addr = _address(host)
        return addr is not None and any(addr in net for net in self._all_networks)

    def admit(self, calling_ae: str, called_ae: str, host: str, peer: PeerCertificate | None = None) -> Decision:
        """Check the called title, then the calling title, the host it comes from and its certificate."""
        calling, called = calling_ae.strip(), called_ae.strip()
        if called != self.own_ae:
            return Decision.reject(REJECT_WRONG_CALLED_AE, "called AE title is not ours")
        rules = self.callers.get(calling)
        if rules is None:
            if self.accept_unknown:
                return Decision.accept("unknown caller accepted by configuration")
            return Decision.reject(REJECT_UNKNOWN_CALLER, "calling AE title not on the allow-list")
        addr = _address(host)
        from_host = [r for r in rules if addr is not None and any(addr in net for net in r.networks)]
        if not from_host:
            # A listed title from another host is refused even when unknown callers are
            # accepted: it looks like a modality being impersonated.
            return Decision.reject(REJECT_UNKNOWN_CALLER, "calling AE title not allowed from this host")
        for rule in from_host:
            if not rule.subjects:
                return Decision.accept("calling AE title and host on the allow-list")
            if peer is not None and any(peer.matches(m) for m in rule.subjects):
                return Decision.accept("calling AE title, host and client certificate on the allow-list")
        if peer is None:
            return Decision.reject(REJECT_UNKNOWN_CALLER,
                                   "calling AE title needs a TLS client certificate bound to it")
        return Decision.reject(REJECT_UNKNOWN_CALLER, "client certificate is not bound to this calling AE title")

    @staticmethod
    def check_contexts(requested: list[PresentationContext], supported: list[PresentationContext],
                       roles: dict[UID, tuple[bool | None, bool | None]]) -> Decision:
        """Reject unless at least one proposed presentation context would be accepted."""
        results, _ = negotiate_as_acceptor(requested, supported, roles)
        accepted = [cx for cx in results if cx.result == 0x00]
        if not accepted:
            return Decision.reject(REJECT_NO_CONTEXT, "no acceptable presentation context")
        return Decision.accept(f"{len(accepted)} of {len(requested)} presentation contexts acceptable")


# ---- pynetdicom event handlers (bound in scp.py) ---------------------------------------------------

def peer_certificate(event: Event) -> PeerCertificate | None:
    """The verified client certificate of a TLS association (None: plain TCP or no certificate)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        der = sock.getpeercert(binary_form=True)
    except (ValueError, OSError):                # handshake not done / socket gone
        return None
    return PeerCertificate.from_der(der) if der else None


def tls_details(event: Event) -> dict[str, Any]:
    """Protocol, cipher and client certificate subject of a TLS association (empty for plain TCP)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return {"tls": False}
    cert = sock.getpeercert() or {}
    subject = ", ".join("=".join(pair) for rdn in cert.get("subject", ()) for pair in rdn)
    cipher = sock.cipher()
    peer = peer_certificate(event)
    return {"tls": True, "tls_version": sock.version(), "cipher": cipher[0] if cipher else None,
            "client_cert": subject or None, "client_cert_sans": sorted(f"{k}:{v}" for k, v in peer.sans)
            if peer else []}


def _record(audit: AuditSink, event: Event, calling_ae: str, accepted: bool, reason: str, clock: Clock,
            **detail: Any) -> None:
    assoc = event.assoc
    metrics.ASSOCIATIONS.labels(outcome="accepted" if accepted else "rejected").inc()
    log.info("association", accepted=accepted, reason=reason, calling_ae=calling_ae,
             host=assoc.requestor.address, **detail)
    try:
        audit.record(AuditEvent(
            event=EventType.ASSOCIATION, outcome=Outcome.SUCCESS if accepted else Outcome.MINOR_FAILURE,
            actor=calling_ae, actor_role=ROLE_MODALITY, source=assoc.requestor.address,
            destination=assoc.acceptor.ae_title,
            detail={"result": "accepted" if accepted else "rejected", "reason": reason,
                    **tls_details(event), **detail},
            time=clock()))
    except Exception:
        log.exception("association_audit_failed")


def handle_requested(event: Event, policy: AssociationPolicy, audit: AuditSink, clock: Clock) -> None:
    """EVT_REQUESTED: reject before negotiation when the policy says so (fail closed)."""
    assoc = event.assoc
    calling = ""
    try:
        assoc.acse_timeout = policy.acse_timeout     # the short pre-association timeout is over
        rq = assoc.requestor.primitive
        assert rq is not None, "EVT_REQUESTED without an A-ASSOCIATE-RQ"
        calling = str(rq.calling_ae_title).strip()
        decision = policy.admit(calling, str(rq.called_ae_title), assoc.requestor.address,
                                peer_certificate(event))
        if decision.accepted:
            roles = {uid: (item.scu_role, item.scp_role) for uid, item in assoc.requestor.role_selection.items()}
            decision = policy.check_contexts(rq.presentation_context_definition_list,
                                             assoc.acceptor.supported_contexts, roles)
    except Exception:
        log.exception("association_policy_error")
        decision = Decision.reject(REJECT_NO_CONTEXT, "policy error")
    if decision.accepted or decision.rejection is None:
        return                                   # pynetdicom negotiates; EVT_ACCEPTED audits
    _record(audit, event, calling, False, decision.reason, clock, rejection=_triple(decision.rejection))
    assoc.acse.send_reject(*decision.rejection)
    assoc.kill()                                 # as pynetdicom does after its own rejections


def _triple(rejection: tuple[int | None, ...]) -> str:
    """A-ASSOCIATE-RJ result/source/reason as ``"1/1/3"`` for the audit record."""
    return "/".join(str(part) for part in rejection)


def handle_accepted(event: Event, audit: AuditSink, clock: Clock) -> None:
    """EVT_ACCEPTED: audit the accepted association with its negotiated contexts."""
    assoc = event.assoc
    _record(audit, event, assoc.requestor.ae_title, True, "allowed", clock,
            contexts=len(assoc.accepted_contexts))


def handle_rejected(event: Event, audit: AuditSink, clock: Clock) -> None:
    """EVT_REJECTED: pynetdicom's own rejections (association limit reached, user identity)."""
    assoc = event.assoc
    rj = assoc.acceptor.primitive
    triple = (rj.result, rj.result_source, rj.diagnostic) if rj is not None else None
    reason = "association limit reached" if triple == (REJECTED_TRANSIENT, SOURCE_SERVICE_PROVIDER_PRESENTATION,
                                                       0x02) else "rejected by the DICOM stack"
    calling = str(assoc.requestor.primitive.calling_ae_title).strip() if assoc.requestor.primitive else ""
    _record(audit, event, calling, False, reason, clock, rejection=_triple(triple) if triple else None)
