"""IOD validation with Debian's dicom3tools ``dciodvfy`` (David Clunie's validator)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

DCIODVFY = shutil.which("dciodvfy")


@dataclass(frozen=True)
class IodReport:
    iod: str
    errors: list[str]
    warnings: list[str]


def dciodvfy(path: Path) -> IodReport:
    """Validate ``path`` against its IOD; skips the test when dicom3tools is not installed."""
    if DCIODVFY is None:
        pytest.skip("dicom3tools (dciodvfy) is not installed")
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    return IodReport(
        iod=lines[0] if lines else "",
        errors=[ln for ln in lines if ln.startswith("Error")],
        warnings=[ln for ln in lines if ln.startswith("Warning")],
    )
