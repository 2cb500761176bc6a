"""Received data sets go to a file as their fragments arrive, never whole into memory.

With ``pynetdicom._config.STORE_RECV_CHUNKED_DATASET`` pynetdicom writes each C-STORE data
set (after a file meta header) to a ``NamedTemporaryFile`` as its P-DATA fragments arrive
and gives the C-STORE handler the path. :func:`install` turns that on, and makes that file
an :class:`IncomingFile`, for the associations of an AE that carries a
:class:`SpoolSettings` (``ae.dermgate_spool``) only: pynetdicom's setting is one for the
process, so :mod:`pynetdicom.dimse_messages` is given a view of it that answers per
association. The IncomingFile

* lives in the store's ``incoming/`` folder: the same file system as the store, so an
  accepted object is renamed into place, not copied; its name carries this host and
  process, so the clean-up at start (:mod:`dermgate.durable`) can tell a dead process's
  leftovers from a live one's;
* stops keeping bytes, and records why, as soon as the object is larger than
  ``max_bytes`` or its header declares more than ``max_pixels`` pixels: the rest of the
  stream is read off the network and dropped (DIMSE answers only after the whole request),
  and the handler answers the refusal without reading anything (:attr:`refusal`).

Associations of other AEs (an SCU, or another SCP, in the same process) keep pynetdicom's
behaviour.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from tempfile import NamedTemporaryFile
from typing import IO, Any, Final

from pydicom import dcmread

from dermgate.durable import TMP_SUFFIX, owner_tag, private_dir
from integration.dicom_scp import status as st

INCOMING_DIR: Final = "incoming"
SPOOL_ATTR: Final = "dermgate_spool"
PROBE_AT: Final = 1 << 20               # parse the header once this much has arrived
_original = NamedTemporaryFile


@dataclass(frozen=True)
class SpoolSettings:
    folder: Path
    max_bytes: int
    max_pixels: int


class IncomingFile:
    """The file one received data set is written to (pynetdicom's ``NamedTemporaryFile`` protocol:
    ``write``, ``file.flush``, ``name``, ``close``)."""

    def __init__(self, cfg: SpoolSettings) -> None:
        private_dir(cfg.folder)          # PHI arrives here: owner only (0700), like the store
        self.cfg = cfg
        self._fp: IO[bytes] = _original(delete=False, mode="wb", dir=cfg.folder,
                                        prefix=f".incoming.{owner_tag()}.", suffix=TMP_SUFFIX)
        self.name = self._fp.name
        self.file = self                 # pynetdicom calls ``.file.flush()``
        self.size = 0                    # bytes received (also those dropped after a refusal)
        self.refusal: tuple[int, str] | None = None
        self._probed = False

    def write(self, data: bytes) -> int:
        n = len(data)
        self.size += n
        if self.refusal is not None:
            return n
        if self.size > self.cfg.max_bytes:
            self._refuse(st.UNSUPPORTED_IMAGE, f"object larger than {self.cfg.max_bytes} bytes")
            return n
        self._fp.write(data)
        if not self._probed and self.size >= PROBE_AT:
            self._probed = True
            self._probe()
        return n

    def flush(self) -> None:
        if not self._fp.closed:
            self._fp.flush()

    def close(self) -> None:
        self._fp.close()

    def _refuse(self, status: int, reason: str) -> None:
        self.refusal = (status, reason)
        try:
            self._fp.truncate(0)         # give the disk back now; the name stays for pynetdicom to unlink
        except OSError:
            pass

    def _probe(self) -> None:
        """Refuse early when the header already declares an image beyond ``max_pixels``."""
        try:
            self._fp.flush()
            with open(self.name, "rb") as fp:
                head = fp.read(PROBE_AT)
            ds = dcmread(BytesIO(head), stop_before_pixels=True)
            rows, columns = int(ds.Rows), int(ds.Columns)
            frames = int(ds.get("NumberOfFrames") or 1)
        except Exception:                # noqa: BLE001 - no early decision; the full checks run later
            return
        if rows > 0 and columns > 0 and frames > 0 and rows * columns * frames > self.cfg.max_pixels:
            self._refuse(st.UNSUPPORTED_IMAGE, f"{rows}x{columns}x{frames} exceeds {self.cfg.max_pixels} pixels")


def _spool_settings() -> SpoolSettings | None:
    """The spool of the AE whose association is receiving on this thread (pynetdicom's DUL thread)."""
    assoc = getattr(threading.current_thread(), "assoc", None)
    return getattr(getattr(assoc, "ae", None), SPOOL_ATTR, None)


def _named_temporary_file(*args: Any, **kwargs: Any) -> Any:
    cfg = _spool_settings()
    if cfg is None:
        return _original(*args, **kwargs)
    return IncomingFile(cfg)


class _SpoolingConfig:
    """pynetdicom's ``_config`` as ``dimse_messages`` reads it: receiving into files for the
    associations of spooling AEs, pynetdicom's own setting for every other association."""

    def __init__(self, config: Any) -> None:
        object.__setattr__(self, "_config", config)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._config, name, value)

    @property
    def STORE_RECV_CHUNKED_DATASET(self) -> bool:  # noqa: N802 - pynetdicom's name
        return _spool_settings() is not None or bool(self._config.STORE_RECV_CHUNKED_DATASET)


_lock = threading.Lock()


def install() -> None:
    """Make pynetdicom receive C-STORE data sets into IncomingFiles for spooling AEs (idempotent)."""
    from pynetdicom import dimse_messages
    with _lock:
        if not isinstance(dimse_messages._config, _SpoolingConfig):
            dimse_messages._config = _SpoolingConfig(dimse_messages._config)  # type: ignore[assignment]
        dimse_messages.NamedTemporaryFile = _named_temporary_file  # type: ignore[attr-defined]
