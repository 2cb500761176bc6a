"""After kill -9 (issue 16): the restarted service cleans what the dead process left in the store, and a
worker restarted on the same host takes over the dead process's leases at once, not after the lease.

Real processes: ``dermgate serve`` started as a subprocess and killed with SIGKILL, pynetdicom as the
modality for a large object (sent in small PDUs, so that the kill lands mid-transfer), dcmtk's
storescu for the images the workers classify.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from sqlalchemy import func, select

from dermgate.app import Runtime
from dermgate.db import Job, JobState
from dermgate.durable import TMP_SUFFIX, host_tag
from dermgate.service import Service
from integration.dicom_scp import uids
from tests.dermgate.test_service_e2e import MODALITY_AE, make_settings, make_sources, model_dir, wait_for
from tests.integration.dicom_scp.test_scp_resources import native_object
from tests.peers.dcmtk import storescu
from tests.peers.orthanc import free_port
from tests.peers.process import stop


def serve(workdir: Path, roles: str, **env: str) -> subprocess.Popen[bytes]:
    environ = {**os.environ, "DERMGATE_WORKDIR": str(workdir), **env}
    if model_dir():
        environ["DERMGATE_MODEL__PATH"] = str(model_dir())
    return subprocess.Popen([sys.executable, "-m", "dermgate.cli", "serve", "--roles", roles], env=environ,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else "exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the SCP did not listen")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_files_a_killed_process_left_in_the_store_are_removed_at_start(tmp_path: Path) -> None:
    """kill -9 mid-C-STORE leaves the half-received object in store/incoming/; a dead writer's
    temporary file may sit beside any stored file. The next start removes both, never a live one's."""
    workdir, port = tmp_path / "work", free_port()
    workdir.mkdir()
    (workdir / "dermgate.toml").write_text(
        f"[dicom]\nport = {port}\nmax_pdu = 4096\nmin_free_bytes = 1048576\n"
        f'[[dicom.allowed_callers]]\nae_title = "{MODALITY_AE}"\nhosts = ["127.0.0.1"]\n')
    big = native_object(tmp_path / "big.dcm", 5000, 5000)           # 75 MB in 4 KiB PDUs: seconds
    server = serve(workdir, "scp")
    wait_listening(server, port)
    incoming = workdir / "store" / "incoming"
    sender = threading.Thread(target=_send_quietly, args=(port, big), daemon=True)
    sender.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(p.stat().st_size > 1 << 20 for p in _files(incoming)):
        time.sleep(0.01)
    server.send_signal(signal.SIGKILL)
    server.wait()
    sender.join(60)
    left = _files(incoming)
    assert left and all(p.name.endswith(TMP_SUFFIX) for p in left), "the kill did not land mid-transfer"
    # What write_atomic leaves when killed between create and rename: a dead process's, and a live one's.
    objects = workdir / "store" / "objects" / "ab"
    objects.mkdir(parents=True)
    dead = objects / f".ab12.dcm.{host_tag()}+{dead_pid()}.{uuid.uuid4().hex}{TMP_SUFFIX}"
    alive_writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    live = objects / f".ab34.dcm.{host_tag()}+{alive_writer.pid}.{uuid.uuid4().hex}{TMP_SUFFIX}"
    foreign_old = objects / f".ab56.dcm.otherhost+{dead_pid()}.{uuid.uuid4().hex}{TMP_SUFFIX}"
    for path in (dead, live, foreign_old):
        path.write_bytes(b"partial")
    old = time.time() - 2 * 24 * 3600
    os.utime(foreign_old, (old, old))
    restarted = serve(workdir, "scp")
    try:
        wait_listening(restarted, port)
        assert not _files(incoming), _files(incoming)
        assert not dead.exists() and not foreign_old.exists()
        assert live.exists(), "a live process's temporary file was removed"
    finally:
        stop(restarted)
        alive_writer.kill()
        alive_writer.wait()


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []


def _send_quietly(port: int, path: Path) -> None:
    ae = AE(ae_title=MODALITY_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(uids.VL_PHOTOGRAPHIC_IMAGE_STORAGE, [ExplicitVRLittleEndian])
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="DERMGATE")
        if assoc.is_established:
            assoc.send_c_store(path)
            assoc.abort()
    except Exception:                     # noqa: BLE001 - the server is killed under it: expected
        pass
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


def test_a_worker_restarted_on_the_same_host_takes_over_its_dead_process_leases_at_once(tmp_path: Path) -> None:
    """With the default 120 s lease, a worker killed -9 while it holds jobs used to leave them for
    two minutes; the next worker on the host sees the owner's process is gone and resumes them."""
    settings = make_settings(tmp_path / "work", None)                 # lease_seconds: the default 120
    assert settings.worker.lease_seconds >= 120
    rt = Runtime(settings)
    scp = Service(rt, roles={"scp"})
    scp.start()
    try:
        files = make_sources(tmp_path / "src")
        assert storescu("127.0.0.1", settings.dicom.port, files, calling=MODALITY_AE, called="DERMGATE",
                        options=["-xy", "-R"]).returncode == 0
    finally:
        scp.stop()
    env = {"DERMGATE_WORKER__BATCH_SIZE": "1"}
    first = serve(settings.workdir, "worker", **env)
    deadline, held = time.monotonic() + 90, None
    while held is None and time.monotonic() < deadline:
        with rt.sessions() as s:
            held = s.scalar(select(Job.lease_owner).where(Job.lease_owner.is_not(None)).limit(1))
        time.sleep(0.02)
    first.kill()
    first.wait()
    assert held is not None, "the first worker never took a lease: the kill -9 tested nothing"
    assert f"@{host_tag()}:{first.pid}:" in held, held
    started = time.monotonic()
    second = serve(settings.workdir, "worker", **env)
    try:
        jobs = wait_for(rt, len(files), timeout=75)                    # well inside the 120 s lease
    finally:
        stop(second)
    assert all(j.state is JobState.DELIVERED for j in jobs), [j.last_error for j in jobs]
    assert time.monotonic() - started < 75
    with rt.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.lease_owner.is_not(None))) == 0
    rt.close()
