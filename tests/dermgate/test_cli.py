"""The ``dermgate`` command as an operator uses it: demo, jobs, outbox, audit on one work dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.dermgate.test_service_e2e import model_dir


def dermgate(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if model_dir():
        env["DERMGATE_MODEL__PATH"] = str(model_dir())
    return subprocess.run([sys.executable, "-m", "dermgate.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


def test_demo_classifies_every_sample_and_commands_act_on_its_workdir(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    run = dermgate("demo", "--workdir", str(work), cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "not a diagnosis" in run.stdout
    table = [line for line in run.stdout.splitlines() if line.startswith("ISIC_")]
    assert len(table) == 9 and all("delivered" in line for line in table)
    assert len(list((work / "store" / "derived").rglob("sc.dcm"))) == 9
    # Commands run inside the folder act on it.
    jobs = dermgate("jobs", "list", cwd=work)
    assert jobs.returncode == 0 and jobs.stdout.count("delivered") == 9
    verify = dermgate("audit", "verify", cwd=work)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    search = dermgate("audit", "search", "--patient", "DEMO-0001", cwd=work)   # recorded as os:<user> (issue 12)
    assert search.returncode == 0 and "dicom.store" in search.stdout
    outbox = dermgate("outbox", "list", "--workdir", str(work), cwd=tmp_path)
    assert outbox.returncode == 0


def test_audit_verify_fails_and_names_the_record_after_tampering(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    assert dermgate("demo", "--workdir", str(work), cwd=tmp_path).returncode == 0
    log = next(p for p in sorted((work / "audit-trail").rglob("*")) if p.is_file() and p.stat().st_size > 2000)
    data = bytearray(log.read_bytes())
    data[len(data) // 2] ^= 0x01
    log.write_bytes(bytes(data))
    verify = dermgate("audit", "verify", cwd=work)
    assert verify.returncode == 1
    assert "record" in (verify.stdout + verify.stderr).lower()
