"""A one-page PDF for humans: findings, heatmap, class probabilities and the disclaimer.

Written with fpdf2 (text stays text: searchable and readable by screen
readers and EHR indexers), about 10x faster than drawing it with matplotlib,
which mattered: the PDF is built in the pipeline worker for every image. The
EHR files it into the patient's chart. Deterministic: the creation date is the
report's issue time, so the same inputs give the same bytes.

A printout leaves the chart, so it carries two patient identifiers (The Joint
Commission's NPSG.01.01.01): the name and date of birth from the DICOM header,
and the patient ID (MRN) with its issuer.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from datetime import datetime
from io import BytesIO
from typing import Any

import cv2
import numpy as np
from fpdf import FPDF

from dermgate.records import ImageRef
from inference.result import CLASS_NAMES, CLASSES, DISCLAIMER, MALIGNANT, Prediction

TITLE = "Dermoscopy AI report (decision support)"
BANNER = "AI result, not a diagnosis. To be interpreted by a clinician."
MALIGNANT_RGB = (178, 24, 43)
BENIGN_RGB = (33, 102, 172)
MARGIN_MM = 18.0
PAGE_W_MM = 210.0
PICTURE_MAX_PX = 480            # the heatmap is printed 80 mm wide: 150 dpi
PICTURE_JPEG_QUALITY = 90


def render_report_pdf(image: ImageRef, prediction: Prediction, cam_png: bytes, *, issued: datetime,
                      notes: Sequence[str] = (), thresholds: Any = None) -> bytes:
    """The report as PDF bytes (deterministic for the same inputs). ``notes`` (e.g. that only
    the first frame of a multi-frame source was classified) are printed below the findings."""
    pdf = FPDF(format="A4", unit="mm")
    pdf.set_compression(False)          # small anyway; plain text streams are easy to audit and test
    pdf.set_creation_date(issued)
    pdf.set_title(TITLE)
    pdf.set_creator("dermgate")
    pdf.set_producer("dermgate")
    pdf.set_margins(MARGIN_MM, MARGIN_MM, MARGIN_MM)
    pdf.set_auto_page_break(False)
    pdf.add_page()
    width = PAGE_W_MM - 2 * MARGIN_MM

    pdf.set_font("Helvetica", "B", 16)
    pdf.cell(width, 9, TITLE, new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "B", 10)
    pdf.set_text_color(*MALIGNANT_RGB)
    pdf.cell(width, 6, BANNER, new_x="LMARGIN", new_y="NEXT")
    pdf.set_text_color(0, 0, 0)
    pdf.ln(4)

    pdf.set_font("Courier", "", 9)
    for line in _findings_text(image, prediction, issued, thresholds).splitlines():
        pdf.cell(width, 4.6, _latin1(line), new_x="LMARGIN", new_y="NEXT")
    if notes:
        pdf.set_font("Helvetica", "B", 9)
        for note in notes:
            pdf.cell(width, 4.6, _latin1(note), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(4)

    top = pdf.get_y()
    pdf.set_font("Helvetica", "", 9)
    pdf.cell(80, 5, "Grad-CAM heatmap: regions that drove the result", new_x="LMARGIN", new_y="NEXT")
    pdf.image(_picture(cam_png), x=MARGIN_MM, y=top + 6, w=80)
    _bars(pdf, prediction, x=MARGIN_MM + 92, y=top, w=width - 92)

    pdf.set_xy(MARGIN_MM, 205)
    pdf.set_font("Helvetica", "", 8)
    pdf.multi_cell(width, 4, _method_text(prediction))
    pdf.set_xy(MARGIN_MM, 260)
    pdf.set_font("Helvetica", "B", 10)
    pdf.multi_cell(width, 5, "\n".join(textwrap.wrap(DISCLAIMER + " " + BANNER, 100)))
    return bytes(pdf.output())


def _picture(cam_png: bytes) -> BytesIO:
    """The heatmap for the page: JPEG at print resolution. fpdf embeds a JPEG as it is
    (DCTDecode) but decodes and deflates a PNG again, which was most of the PDF's cost;
    the lossless heatmap stays in the FHIR report's PNG and in the Secondary Capture."""
    bgr = cv2.imdecode(np.frombuffer(cam_png, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        return BytesIO(cam_png)                      # not a PNG: fpdf says what is wrong with it
    if bgr.shape[1] > PICTURE_MAX_PX:
        height = max(1, round(bgr.shape[0] * PICTURE_MAX_PX / bgr.shape[1]))
        bgr = cv2.resize(bgr, (PICTURE_MAX_PX, height), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, PICTURE_JPEG_QUALITY])
    return BytesIO(buf.tobytes() if ok else cam_png)


def _bars(pdf: FPDF, p: Prediction, *, x: float, y: float, w: float) -> None:
    """Horizontal bars of the 7 class probabilities (red: the malignant classes)."""
    pdf.set_xy(x, y)
    pdf.set_font("Helvetica", "", 9)
    pdf.cell(w, 5, "Class probabilities (red: malignant classes)")
    row = 9.0
    for i, cls in enumerate(CLASSES):
        top = y + 8 + i * row
        value = 100.0 * p.probabilities.get(cls, 0.0)
        pdf.set_xy(x, top)
        pdf.set_font("Helvetica", "", 7)
        pdf.cell(w, 3.5, CLASS_NAMES[cls])
        pdf.set_fill_color(*(MALIGNANT_RGB if cls in MALIGNANT else BENIGN_RGB))
        pdf.rect(x, top + 3.8, max(0.3, (w - 14) * value / 100.0), 3.2, style="F")
        pdf.set_xy(x + w - 13, top + 3.6)
        pdf.cell(13, 3.5, f"{value:.1f}%", align="R")


def _latin1(text: str) -> str:
    """The PDF's core fonts have Latin-1 glyphs only: anything else (a body site in Japanese,
    an accession number in Greek) prints as '?' rather than failing the report."""
    return text.encode("latin-1", "replace").decode("latin-1")


def patient_name(pn: str | None) -> str | None:
    """DICOM PN "Family^Given^Middle^Prefix^Suffix" as "FAMILY, Given Middle"."""
    if not pn:
        return None
    parts = [x.strip() for x in pn.split("=")[0].split("^")]
    family = parts[0].upper() if parts else ""
    given = " ".join(x for x in parts[1:3] if x)
    return ", ".join(x for x in (family, given) if x) or None


def birth_date(da: str | None) -> str | None:
    return f"{da[0:4]}-{da[4:6]}-{da[6:8]}" if da and len(da) == 8 and da.isdigit() else None


def _findings_text(image: ImageRef, p: Prediction, issued: datetime, thresholds: Any = None) -> str:
    ctx = image.context
    mrn = image.patient_id + (f" ({image.issuer_of_patient_id})" if image.issuer_of_patient_id else "")
    lines = [
        f"Patient           : {(patient_name(ctx.patient_name) if ctx else None) or '-'}",
        f"Date of birth     : {(birth_date(ctx.patient_birth_date) if ctx else None) or '-'}",
        f"Patient ID (MRN)  : {mrn}",
        f"Study date/time   : {image.study_date or '-'} {image.study_time or ''}".rstrip(),
        f"Accession number  : {image.accession_number or '-'}",
        f"Image (SOP UID)   : {image.sop_instance_uid}",
        f"Body site         : {image.body_site or '-'}",
        f"Report issued     : {issued.isoformat(timespec='seconds')}",
        "",
    ]
    if not p.assessable:
        lines.append(f"NOT ASSESSABLE    : {p.reason or 'unknown reason'}")
        return "\n".join(lines)
    top = p.top_class
    lines += [
        f"Most likely class : {CLASS_NAMES[top]} ({100 * p.probabilities[top]:.1f}%)",
        f"p(malignant)      : {100 * p.malignancy_probability:.1f}%  (melanoma + BCC + AKIEC)",
        f"Risk category     : {p.risk.value}",
        *([f"Referral threshold: p(malignant) >= {100 * thresholds.referral:.1f}% (High from "
           f"{100 * thresholds.high:.1f}%)"] if thresholds is not None else []),
        f"Confidence        : {'LOW - interpret with particular care' if p.low_confidence else 'normal'}"
        f"  (uncertainty {p.uncertainty:.2f})",
    ]
    if p.out_of_distribution:
        lines.append("Distribution      : OUTSIDE the training distribution - interpret with particular care")
    return "\n".join(lines)


def _method_text(p: Prediction) -> str:
    m = p.model
    return (f"Method: {m.manufacturer} {m.name} version {m.version} (model sha256 {m.sha256[:16]}...), "
            "a convolutional network trained on HAM10000 dermoscopy images (7 classes), with calibrated "
            "probabilities and a Grad-CAM explanation of the most likely class. It has not been validated "
            "for every population, device or lesion type; it does not see the patient's history.")
