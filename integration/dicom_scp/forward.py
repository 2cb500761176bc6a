"""Forwarding the SC and SR to a PACS: one C-STORE SCU delivery channel per destination.

A channel makes one attempt per ``deliver`` call and says whether another
attempt may succeed; the outbox owns retries, back-off and dead letters.
Delivery is idempotent by nature: a re-run sends the same SOP Instance UIDs
(see ``outputs.derived_uid``), which a PACS stores once.

Every attempt, delivered or not, is recorded as an ``EventType.FORWARDED``
audit event (PS3.15 A.5.3.2 DICOM Instances Transferred, this side the source)
before the outcome is returned; if the record fails, the delivery is reported
as failed and retryable, so nothing is ever delivered unaudited.

Errors::

    ForwardError                a channel is misconfigured (raised at construction)
"""

from __future__ import annotations

import hashlib
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import structlog
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE

from audit.api import AuditEvent, AuditSink, EventType, Outcome
from dermgate.records import DeliveryOutcome
from dermgate.store import StoreError
from integration.dicom_scp import uids

log = structlog.get_logger(__name__)

# C-STORE response statuses (PS3.4 Annex B.2.3, PS3.7 Annex C).
STATUS_SUCCESS = 0x0000
STATUS_WARNING_FIRST, STATUS_WARNING_LAST = 0xB000, 0xBFFF        # coercion, elements discarded, mismatch
STATUS_OUT_OF_RESOURCES_FIRST, STATUS_OUT_OF_RESOURCES_LAST = 0xA700, 0xA7FF
STATUS_DATASET_MISMATCH_FIRST, STATUS_DATASET_MISMATCH_LAST = 0xA900, 0xA9FF
STATUS_CANNOT_UNDERSTAND_FIRST, STATUS_CANNOT_UNDERSTAND_LAST = 0xC000, 0xCFFF
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_DUPLICATE_SOP_INSTANCE = 0x0111                             # already there: delivered
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_NOT_AUTHORIZED = 0x0124
# A-ASSOCIATE-RJ Result (PS3.8 9.3.4).
ASSOCIATION_ACCEPTED = 0x00
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02
# An association is kept this long after a delivery for the next one (the PACS may drop it sooner).
KEEP_ASSOCIATION_S = 5.0
# DICOM source role: the instances were read here and sent (PS3.15 EventActionCode R).
AUDIT_ACTION_READ = "R"

# Offered for every image SOP class: uncompressed in one context, JPEG Baseline in its own,
# so a peer that accepts only one of the two still gets a context for each file.
UNCOMPRESSED = [uids.EXPLICIT_VR_LE, uids.IMPLICIT_VR_LE]
IMAGE_SOP_CLASSES = frozenset({uids.SECONDARY_CAPTURE_IMAGE_STORAGE, uids.VL_PHOTOGRAPHIC_IMAGE_STORAGE,
                               uids.DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE})
# The outbox payload of one image: its Secondary Capture and its SR.
FILES_PER_DELIVERY = 2
# BCP 195 (PS3.15 B.13): ECDHE with AEAD ciphers for TLS 1.2; TLS 1.3 suites are always AEAD.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class ForwardError(Exception):
    """A forward channel is misconfigured."""


@dataclass(frozen=True)
class StoreVerdict:
    """What a C-STORE status means for delivery."""
    ok: bool
    retryable: bool
    meaning: str


def classify_status(status: int) -> StoreVerdict:
    """Map a C-STORE response status to delivered / retry later / give up."""
    if status == STATUS_SUCCESS:
        return StoreVerdict(True, False, "success")
    if STATUS_WARNING_FIRST <= status <= STATUS_WARNING_LAST:
        return StoreVerdict(True, False, "stored with warning")
    if status == STATUS_DUPLICATE_SOP_INSTANCE:
        return StoreVerdict(True, False, "duplicate SOP instance (already stored)")
    if STATUS_OUT_OF_RESOURCES_FIRST <= status <= STATUS_OUT_OF_RESOURCES_LAST:
        return StoreVerdict(False, True, "refused: out of resources")
    if STATUS_DATASET_MISMATCH_FIRST <= status <= STATUS_DATASET_MISMATCH_LAST:
        return StoreVerdict(False, False, "error: data set does not match SOP class")
    if STATUS_CANNOT_UNDERSTAND_FIRST <= status <= STATUS_CANNOT_UNDERSTAND_LAST:
        return StoreVerdict(False, False, "error: cannot understand")
    if status == STATUS_SOP_CLASS_NOT_SUPPORTED:
        return StoreVerdict(False, False, "refused: SOP class not supported")
    if status == STATUS_NOT_AUTHORIZED:
        return StoreVerdict(False, False, "refused: not authorized")
    if status == STATUS_PROCESSING_FAILURE:
        return StoreVerdict(False, True, "processing failure")
    return StoreVerdict(False, True, "failure")


def client_tls_context(ca_file: Path, cert_file: Path | None = None, key_file: Path | None = None) -> ssl.SSLContext:
    """TLS client context for DICOM TLS: TLS 1.2 minimum, server verified against ``ca_file``."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return ctx


@dataclass
class DicomForwardChannel:
    """C-STORE the files in ``payload["files"]`` to one destination AE over one association.

    ``payload``: ``{"files": [path, ...]}``; relative paths resolve against
    ``base_dir``. Patient, study and SOP UIDs for the audit record come from
    the files themselves. With ``files`` (the object store) they are read, and
    decrypted, through it.
    """
    dest_name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "DERMGATE"
    tls: ssl.SSLContext | None = None
    tls_server_hostname: str | None = None
    base_dir: Path | None = None
    audit: AuditSink | None = None
    files: Any = None                       # an object with read_at(path) -> bytes (dermgate.store.ObjectStore)
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    connection_timeout: float = 10.0
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self._init_reuse()
        for label, ae in (("destination", self.ae_title), ("calling", self.calling_ae_title)):
            if not 0 < len(ae.strip()) <= 16:
                raise ForwardError(f"{label} AE title must be 1-16 characters: {ae!r}")
        if not 0 < self.port < 65536:
            raise ForwardError(f"invalid port {self.port}")
        self.name = f"dicom:{self.dest_name}"

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    @property
    def max_delivery_s(self) -> float:
        """The longest one ``deliver`` can take by its timeouts: connect, associate, one C-STORE
        per file, release. The outbox derives its lease from this."""
        return self.connection_timeout + 2 * self.acse_timeout + FILES_PER_DELIVERY * self.dimse_timeout

    def _init_reuse(self) -> None:
        self._lock = threading.Lock()
        self._assoc: Association | None = None
        self._assoc_classes: frozenset[str] = frozenset()
        self._idle: threading.Timer | None = None

    def deliver(self, payload: dict[str, Any]) -> DeliveryOutcome:
        """One attempt to store every file; ok only when all of them are stored."""
        try:
            files = self._read(payload)
        except _Undeliverable as exc:
            return self._finish([], DeliveryOutcome(ok=False, retryable=False, reason=str(exc)), {})
        statuses: dict[str, int] = {}
        with self._lock:
            outcome = self._send(files, statuses)
        return self._finish([f.header for f in files], outcome, statuses)

    def close(self) -> None:
        """Release the association kept open between deliveries."""
        with self._lock:
            self._drop(release=True)

    # --- steps -------------------------------------------------------------

    def _read(self, payload: dict[str, Any]) -> list[_File]:
        """The files' headers only: the data sets travel as they are on disk (see ``_send_file``),
        unless the store encrypts them, when they are decrypted into memory."""
        files = payload.get("files")
        if not files:
            raise _Undeliverable("payload names no files")
        encrypted = self.files is not None and bool(getattr(self.files, "encrypted", False))
        out: list[_File] = []
        for name in files:
            path = Path(name)
            if not path.is_absolute() and self.base_dir is not None:
                path = self.base_dir / path
            try:
                data = self.files.read_at(path) if encrypted else None     # decrypted, in memory
                header = dcmread(BytesIO(data) if data is not None else path, stop_before_pixels=True,
                                 specific_tags=list(_HEADER_KEYWORDS))
                if not header.get("SOPClassUID") or not header.get("SOPInstanceUID"):
                    raise InvalidDicomError("no SOP Class / Instance UID")
            except FileNotFoundError as exc:
                raise _Undeliverable(f"output file missing: {path.name}") from exc
            except (InvalidDicomError, OSError, ValueError, EOFError, StoreError) as exc:
                raise _Undeliverable(f"output file unreadable: {path.name}: {exc}") from exc
            out.append(_File(path, header, data))
        return out

    def _ae(self, classes: Sequence[str]) -> AE:
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = self.acse_timeout
        ae.dimse_timeout = self.dimse_timeout
        ae.network_timeout = self.network_timeout
        ae.connection_timeout = self.connection_timeout
        for sop_class in sorted(classes):
            ae.add_requested_context(sop_class, UNCOMPRESSED)
            if sop_class in IMAGE_SOP_CLASSES:
                ae.add_requested_context(sop_class, uids.JPEG_BASELINE)
        return ae

    def _send(self, files: list[_File], statuses: dict[str, int]) -> DeliveryOutcome:
        """Over the association kept from the last delivery when it still stands and fits, else a new one;
        a kept association that broke is replaced once before the attempt counts as failed."""
        self._cancel_idle()
        classes = frozenset(str(f.header.SOPClassUID) for f in files)
        reused = self._assoc is not None and self._assoc.is_established and classes <= self._assoc_classes
        if not reused:
            self._drop(release=True)
            opened = self._open(classes)
            if isinstance(opened, DeliveryOutcome):
                return opened
        assert self._assoc is not None
        outcome = self._store_all(self._assoc, files, statuses)
        if not outcome.ok and reused and not statuses and outcome.retryable:
            self._drop(release=False)               # the peer let the idle association go: once more, fresh
            opened = self._open(classes)
            if isinstance(opened, DeliveryOutcome):
                return opened
            outcome = self._store_all(self._assoc, files, statuses)
        if outcome.ok:
            self._idle = threading.Timer(KEEP_ASSOCIATION_S, self.close)
            self._idle.daemon = True
            self._idle.start()
        else:
            self._drop(release=True)
        return outcome

    def _open(self, classes: frozenset[str]) -> DeliveryOutcome | None:
        answer: dict[str, Any] = {}           # the peer's A-ASSOCIATE response, when one came

        def on_acse_recv(event: evt.Event) -> None:
            primitive = event.primitive  # type: ignore[attr-defined]
            if isinstance(primitive, A_ASSOCIATE) and primitive.result is not None:
                answer["result"] = primitive.result
                if primitive.result in (REJECTED_PERMANENT, REJECTED_TRANSIENT):
                    answer["text"] = f"{primitive.result_str}, {primitive.source_str}: {primitive.reason_str}"

        tls_args = (self.tls, self.tls_server_hostname or self.host) if self.tls else None
        try:
            assoc = self._ae(sorted(classes)).associate(self.host, self.port, ae_title=self.ae_title,
                                                        tls_args=tls_args,
                                                        evt_handlers=[(evt.EVT_ACSE_RECV, on_acse_recv)])
        except (OSError, ssl.SSLError) as exc:
            return DeliveryOutcome(ok=False, retryable=True, reason=f"cannot connect to {self.destination}: {exc}")
        if not assoc.is_established:
            return self._not_established(assoc, answer)
        self._assoc, self._assoc_classes = assoc, classes
        return None

    def _drop(self, *, release: bool) -> None:
        self._cancel_idle()
        assoc, self._assoc, self._assoc_classes = self._assoc, None, frozenset()
        if assoc is not None and assoc.is_established:
            if release:
                assoc.release()
            else:
                assoc.abort()

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _not_established(self, assoc: Association, answer: dict[str, Any]) -> DeliveryOutcome:
        if assoc.is_rejected:
            transient = answer.get("result") == REJECTED_TRANSIENT
            return DeliveryOutcome(ok=False, retryable=transient,
                                   reason=f"association rejected by {self.destination}: "
                                          f"{answer.get('text', 'no reason given')}")
        if answer.get("result") == ASSOCIATION_ACCEPTED and not assoc.accepted_contexts:
            return DeliveryOutcome(ok=False, retryable=False,
                                   reason=f"{self.destination} accepted none of the offered presentation contexts")
        return DeliveryOutcome(ok=False, retryable=True,
                               reason=f"association with {self.destination} failed (aborted or timed out)")

    def _store_all(self, assoc: Association, files: list[_File], statuses: dict[str, int]) -> DeliveryOutcome:
        for f in files:
            uid = str(f.header.SOPInstanceUID)
            try:
                rsp = _send_file(assoc, f)
            except ValueError as exc:           # no accepted context fits this file's class/syntax
                return DeliveryOutcome(ok=False, retryable=False, reason=f"{self.destination}: {exc}")
            except (InvalidDicomError, OSError) as exc:
                return DeliveryOutcome(ok=False, retryable=False, reason=f"output file unreadable: {exc}")
            if not rsp or "Status" not in rsp:  # timeout, abort or invalid response
                return DeliveryOutcome(ok=False, retryable=True,
                                       reason=f"no C-STORE response from {self.destination}")
            status = int(rsp.Status)
            statuses[uid] = status
            verdict = classify_status(status)
            if not verdict.ok:
                comment = f" ({rsp.ErrorComment})" if rsp.get("ErrorComment") else ""
                return DeliveryOutcome(ok=False, retryable=verdict.retryable,
                                       reason=f"C-STORE status 0x{status:04X} {verdict.meaning}{comment}")
        return DeliveryOutcome(ok=True, retryable=False, remote_ref=self.destination)

    def _finish(self, datasets: list[Dataset], outcome: DeliveryOutcome, statuses: dict[str, int]) -> DeliveryOutcome:
        log.info("dicom.forward", destination=self.dest_name, ok=outcome.ok, retryable=outcome.retryable,
                 files=len(datasets), statuses={_short(k): f"0x{v:04X}" for k, v in statuses.items()},
                 reason=outcome.reason)
        if self.audit is None:
            return outcome
        first = datasets[0] if datasets else None
        event = AuditEvent(
            event=EventType.FORWARDED,
            outcome=Outcome.SUCCESS if outcome.ok else Outcome.SERIOUS_FAILURE,
            actor=self.calling_ae_title,
            action=AUDIT_ACTION_READ,
            destination=self.destination,
            patient_id=str(first.PatientID) if first is not None and first.get("PatientID") else None,
            study_uid=str(first.StudyInstanceUID) if first is not None and "StudyInstanceUID" in first else None,
            sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in datasets),
            detail={"channel": self.name, "statuses": {k: f"0x{v:04X}" for k, v in statuses.items()},
                    "reason": outcome.reason, "retryable": outcome.retryable},
        )
        try:
            self.audit.record(event)
        except Exception as exc:  # noqa: BLE001 - any sink failure means "not audited"
            log.error("dicom.forward.audit_failed", destination=self.dest_name, error=type(exc).__name__)
            return DeliveryOutcome(ok=False, retryable=True, reason=f"audit record failed: {exc}")
        return outcome


class _Undeliverable(Exception):
    """The payload cannot be delivered however often it is tried."""


@dataclass(frozen=True)
class _File:
    path: Path
    header: Dataset            # file meta + the attributes the request and the audit record need
    data: bytes | None = None  # the decrypted file, when the store encrypts (else read from ``path``)


_HEADER_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "PatientID", "StudyInstanceUID")
_CHUNKED = threading.Lock()    # pynetdicom reads its send mode from a module setting


def _send_file(assoc: Association, f: _File) -> Dataset:
    """C-STORE one file. When the peer accepted the file's own transfer syntax its data set is
    streamed from disk as it is (pynetdicom's chunked sending): no decoding, no re-encoding;
    otherwise it is read and converted to the accepted syntax. A decrypted file goes from memory."""
    if f.data is not None:
        return assoc.send_c_store(dcmread(BytesIO(f.data)))
    sop_class, syntax = str(f.header.SOPClassUID), str(f.header.file_meta.TransferSyntaxUID)
    as_is = any(str(cx.abstract_syntax) == sop_class and str(cx.transfer_syntax[0]) == syntax
                for cx in assoc.accepted_contexts)
    if not as_is:
        return assoc.send_c_store(dcmread(f.path))
    with _CHUNKED:
        chunked = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            return assoc.send_c_store(f.path)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = chunked


def _short(uid: str) -> str:
    """A log-safe handle for a UID (hash prefix), never the UID itself."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12]
