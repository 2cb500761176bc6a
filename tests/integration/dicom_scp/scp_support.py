"""Helpers for the SCP tests: a real DicomService on a free loopback port, on a real SQLite
database and folder store, and a pynetdicom SCU for what dcmtk cannot send (bad inputs).

The audit sink is an in-memory list: the real encrypted trail is tested in tests/audit and
wired by the service; here only what the SCP hands to the sink matters.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydicom import Dataset, dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID
from pynetdicom import AE, _config
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from dermgate.db import Instance, Job, create_schema, make_engine, make_sessionmaker
from dermgate.groupcommit import GroupCommit
from dermgate.intake import Intake
from dermgate.settings import AllowedCaller, DicomSettings
from dermgate.store import ObjectStore
from integration.dicom_scp.scp import DicomService
from tests.peers.audit import ListAudit

MODALITY = "MODALITY"
SCP_AET = "DERMGATE"
LOCALHOST = "127.0.0.1"



@dataclass
class Harness:
    """A running SCP and what it writes to."""
    service: DicomService
    audit: ListAudit
    store: ObjectStore
    sessions: sessionmaker
    root: Path

    @property
    def port(self) -> int:
        assert self.service.port is not None
        return self.service.port

    def instances(self) -> list[Instance]:
        with self.sessions() as s:
            return list(s.scalars(select(Instance).order_by(Instance.id)))

    def jobs(self) -> list[Job]:
        with self.sessions() as s:
            return list(s.scalars(select(Job).order_by(Job.id)))

    def instance(self, sop_uid: str) -> Instance | None:
        with self.sessions() as s:
            return s.scalar(select(Instance).where(Instance.sop_instance_uid == sop_uid))

    def stored_dataset(self, sop_uid: str) -> Dataset:
        inst = self.instance(sop_uid)
        assert inst is not None, "no instance row"
        return dcmread(BytesIO(self.store.read(inst.path)))

    def assert_intact(self) -> None:
        """Every accepted object is on disk with the sha256 its row records."""
        for inst in self.instances():
            data = self.store.read(inst.path)
            assert hashlib.sha256(data).hexdigest() == inst.sha256 == Path(inst.path).stem
            assert len(data) == inst.size


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate``: server-side records land after the client has already given up."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def dicom_settings(**overrides: Any) -> DicomSettings:
    base: dict[str, Any] = dict(
        ae_title=SCP_AET, host=LOCALHOST, port=0,
        allowed_callers=[AllowedCaller(ae_title=MODALITY, hosts=[LOCALHOST])],
        min_free_bytes=1024, acse_timeout=10, dimse_timeout=20, network_timeout=20)
    base.update(overrides)
    return DicomSettings(**base)


@contextmanager
def running_scp(root: Path, cfg: DicomSettings, *, intake: Intake | None = None,
                store: ObjectStore | None = None, coalesce_s: float = 0.0) -> Iterator[Harness]:
    """Start a DicomService on a free port over SQLite + a folder store under ``root``; stop it after.

    ``coalesce_s=0``: every refused connection and failed handshake is its own audit record, as
    the tests of single refusals expect; the flood tests pass the service's window."""
    root.mkdir(parents=True, exist_ok=True)
    engine = make_engine(f"sqlite:///{root / 'dermgate.db'}")
    create_schema(engine)
    sessions = make_sessionmaker(engine)
    store = store or ObjectStore(root / "store")
    audit = ListAudit()
    # As the service wires it: group commit of the intake and the audit records (dermgate/groupcommit.py).
    group = GroupCommit(store, sessions, audit) if intake is None else None
    service = DicomService(cfg, intake or group.intake, group.audit if group else audit,  # type: ignore[union-attr]
                           store, coalesce_s=coalesce_s)
    service.start()
    try:
        yield Harness(service, audit, store, sessions, root)
    finally:
        service.stop(timeout=5)
        if group is not None:
            group.close()
        engine.dispose()


# ---- pixels --------------------------------------------------------------------------------------

def jpeg_rgb(path: Path) -> np.ndarray:
    """The source JPEG decoded to RGB by OpenCV (libjpeg-turbo): the reference pixels."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ---- a pynetdicom SCU for objects dcmtk will not send --------------------------------------------

@dataclass(frozen=True)
class StoreAnswer:
    status: int
    comment: str | None


def send_raw(port: int, *, sop_class: str, sop_instance: str, transfer_syntax: str, dataset_bytes: bytes,
             calling: str = MODALITY, called: str = SCP_AET) -> StoreAnswer:
    """C-STORE ``dataset_bytes`` (encoded, without file meta) under the announced SOP class / instance.

    pynetdicom's chunked sending streams a Part 10 file's data set as it is, taking the
    request's identifiers from the file meta: so a data set that contradicts them, or is
    truncated, goes out as a faulty modality would send it.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "object.dcm"
        buf = DicomBytesIO()
        write_file_meta_info(buf, meta, enforce_standard=True)
        path.write_bytes(b"\x00" * 128 + b"DICM" + buf.getvalue() + dataset_bytes)
        ae = AE(ae_title=calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
        ae.add_requested_context(sop_class, [transfer_syntax])
        assoc = ae.associate(LOCALHOST, port, ae_title=called)
        assert assoc.is_established, "association not established"
        chunked = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            rsp = assoc.send_c_store(path)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = chunked
            assoc.release()
    assert "Status" in rsp, "no C-STORE response (aborted?)"
    return StoreAnswer(int(rsp.Status), rsp.get("ErrorComment"))


def dataset_bytes(ds: Dataset) -> bytes:
    """The data set of ``ds`` encoded in its file meta's transfer syntax, without the file meta."""
    ts = ds.file_meta.TransferSyntaxUID
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = ts.is_implicit_VR
    write_dataset(fp, ds)
    return fp.getvalue()
