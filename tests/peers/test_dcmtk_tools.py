"""The dcmtk tools the tests and benches run are dcmtk's, even where pynetdicom's are first on PATH."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dcmtk_tools_are_found_behind_pynetdicoms_apps_on_path() -> None:
    """An activated venv puts pynetdicom's storescu/storescp/echoscu first on PATH; the tests
    must still run dcmtk's (pynetdicom's storescu rejects -xy: 'unrecognized arguments')."""
    venv_bin = Path(sys.executable).parent
    assert (venv_bin / "storescu").exists(), "pynetdicom installs its apps into the venv's bin/"
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    code = "from tests.peers import dcmtk; print(dcmtk.STORESCU); print(dcmtk.STORESCP); print(dcmtk.ECHOSCU)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True, timeout=60)
    tools = out.stdout.split()
    assert len(tools) == 3
    for tool in tools:
        assert Path(tool).parent != venv_bin, tool
        version = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=10)
        assert version.stdout.startswith("$dcmtk:"), (tool, version.stdout[:200])
