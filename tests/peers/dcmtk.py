"""Source DICOM images made by dcmtk's ``img2dcm`` from sample JPEGs, as a modality would send them.

``img2dcm`` writes VL Photographic Image Storage with the JPEG kept as is (JPEG
Baseline, YBR_FULL_422). The Dermoscopic Photography variant (Supplement 221)
is the same file with the dermoscopic SOP class and the attributes its IOD
requires, set with pydicom.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

# Where dcmtk lives when PATH finds another tool of the same name first: pynetdicom installs its
# own storescu, storescp and echoscu into a virtual environment's bin/ (first on PATH in an
# activated venv or a container image), and they take none of dcmtk's options.
DCMTK_DIRS = ("/usr/bin", "/usr/local/bin")
DCMTK_BANNER = "$dcmtk:"          # how every dcmtk tool starts its --version output


@cache
def dcmtk_tool(name: str) -> str:
    """The path of dcmtk's ``name``: the first one on PATH, then in DCMTK_DIRS, whose ``--version``
    says it is dcmtk (checked once per tool). Falls back to /usr/bin/``name`` so a missing dcmtk
    fails with that path in the error."""
    dirs = [*os.environ.get("PATH", "").split(os.pathsep), *DCMTK_DIRS]
    for directory in dict.fromkeys(d for d in dirs if d):
        candidate = shutil.which(name, path=directory)
        if candidate is None:
            continue
        try:
            out = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if (out.stdout + out.stderr).lstrip().startswith(DCMTK_BANNER):
            return candidate
    return f"/usr/bin/{name}"


IMG2DCM = dcmtk_tool("img2dcm")
_REPO = Path(__file__).resolve().parents[2]
# Only images committed to the repository: CI runs on a clean clone with no shared data beside it.
SAMPLE_DIRS = (_REPO / "dermgate" / "samples", _REPO / "tests" / "data" / "samples")
DERMOSCOPIC_PHOTOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.7"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"


def sample_jpeg(name: str = "ISIC_0024309.jpg") -> Path:
    """A committed HAM10000 sample JPEG (dermgate/samples or tests/data/samples)."""
    for folder in SAMPLE_DIRS:
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"sample image {name} not found in {', '.join(map(str, SAMPLE_DIRS))}")


def img2dcm(jpeg: Path, out: Path, *, dermoscopic: bool = False, patient_id: str = "DG-TEST-0001",
            patient_name: str = "Test^Patient", study_uid: str | None = None,
            accession: str = "ACC-0001") -> Path:
    """Make a DICOM source image from ``jpeg`` with dcmtk's img2dcm (VL Photographic or dermoscopic)."""
    keys = {
        "PatientID": patient_id, "PatientName": patient_name, "PatientBirthDate": "19700101",
        "PatientSex": "O", "StudyDate": "20250101", "StudyTime": "101010", "StudyID": "S1",
        "AccessionNumber": accession, "SeriesNumber": "1", "InstanceNumber": "1",
        "StudyInstanceUID": study_uid or generate_uid(),
    }
    cmd = [IMG2DCM, "--vl-photo", str(jpeg), str(out)]
    for key, value in keys.items():
        cmd += ["-k", f"{key}={value}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)
    ds = dcmread(out)
    ds.pop("Laterality", None)             # unknown laterality is absent for skin
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Manufacturer = "dcmtk img2dcm (test modality)"
    if dermoscopic:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DERMOSCOPIC_PHOTOGRAPHY
        ds.Modality = "DMS"
        ds.Laterality = ""
        # Frame of Reference and Enhanced General Equipment modules of the IOD.
        ds.FrameOfReferenceUID = generate_uid()
        ds.PositionReferenceIndicator = ""
        ds.ManufacturerModelName = "test dermatoscope"
        ds.DeviceSerialNumber = "0001"
        ds.SoftwareVersions = "1.0"
        # Dermoscopic Image module (PS3.3 C.8.12.13): type 1 and type 2 attributes.
        ds.RecognizableVisualFeatures = "NO"
        ds.LightSourcePolarization = None
        ds.EmitterColorTemperature = None
        ds.ContactMethod = None
        ds.OpticalMagnificationFactor = None
    ds.save_as(out)
    return out


# ---- dcmtk network tools (echoscu / storescu / storescp) and converters ------------------------
# dcmtk leaves Nagle's algorithm on unless TCP_NODELAY is set in its environment; on
# loopback every C-STORE then waits ~40 ms for the delayed ACK.

ECHOSCU = dcmtk_tool("echoscu")
STORESCU = dcmtk_tool("storescu")
STORESCP = dcmtk_tool("storescp")
DCMCJPEG = dcmtk_tool("dcmcjpeg")
DCMDJPEG = dcmtk_tool("dcmdjpeg")
DCMCRLE = dcmtk_tool("dcmcrle")
DCMODIFY = dcmtk_tool("dcmodify")


def dcmtk_env() -> dict[str, str]:
    """The environment for dcmtk network tools: TCP_NODELAY=1 (see above)."""
    import os
    return {**os.environ, "TCP_NODELAY": "1"}


def tls_options(key: Path | None, cert: Path | None, ca: Path) -> list[str]:
    """storescu/echoscu TLS options: client key + certificate (or anonymous TLS), trusted CA.

    dcmtk's default profile is BCP 195 non-downgrading (TLS 1.2+); ``-rc`` (the
    default) verifies the SCP's certificate against ``ca``.
    """
    auth = ["+tls", str(key), str(cert), "-pem", "-pw"] if key and cert else ["+tla"]
    return [*auth, "+cf", str(ca)]


def echoscu(host: str, port: int, *, calling: str, called: str, options: list[str] | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run dcmtk's echoscu (C-ECHO); returns the completed process (rc 0 on success)."""
    cmd = [ECHOSCU, "-aet", calling, "-aec", called, *(options or []), host, str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dcmtk_env())


def storescu(host: str, port: int, files: list[Path] | Path, *, calling: str, called: str,
             options: list[str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run dcmtk's storescu over one association for all ``files`` (``-xy`` JPEG, ``-R`` required only...)."""
    paths = [files] if isinstance(files, Path) else files
    cmd = [STORESCU, "-aet", calling, "-aec", called, *(options or []), host, str(port), *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dcmtk_env())


def convert(tool: str, src: Path, dst: Path, *options: str) -> Path:
    """Run a dcmtk converter (dcmcjpeg, dcmdjpeg, dcmcrle) ``src`` -> ``dst``."""
    subprocess.run([tool, *options, str(src), str(dst)], check=True, capture_output=True, timeout=60)
    return dst


def proposal(cfg_file: Path, sop_class: str, transfer_syntaxes: list[str]) -> list[str]:
    """storescu options proposing exactly ``sop_class`` with ``transfer_syntaxes`` (one context).

    Written as a dcmtk association profile (``-xf``): storescu's built-in ``-x?``
    switches cannot propose e.g. JPEG Lossless Process 14 (.57).
    """
    ts_lines = "\n".join(f"TransferSyntax{i} = {ts}" for i, ts in enumerate(transfer_syntaxes, 1))
    cfg_file.write_text("[[TransferSyntaxes]]\n[TS]\n" + ts_lines + "\n\n"
                        "[[PresentationContexts]]\n[PC]\nPresentationContext1 = " + sop_class + "\\TS\n\n"
                        "[[Profiles]]\n[Only]\nPresentationContexts = PC\n")
    return ["-xf", str(cfg_file), "Only"]
