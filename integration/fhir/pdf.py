"""A one-page PDF for humans: findings, heatmap, class probabilities and the disclaimer.

Drawn with matplotlib's object API (``Figure``, never pyplot: no global state,
safe in worker threads) and its PDF backend, so no extra dependency. The PDF
carries no patient name or birth date; it is filed into the patient's chart by
the EHR, which adds its own header.
"""

from __future__ import annotations

from datetime import datetime
from io import BytesIO

from matplotlib.figure import Figure
from matplotlib.image import imread

from dermgate.records import ImageRef
from inference.result import CLASS_NAMES, CLASSES, DISCLAIMER, MALIGNANT, Prediction

A4_INCHES = (8.27, 11.69)
TITLE = "Dermoscopy AI report (decision support)"
BANNER = "AI result, not a diagnosis. To be interpreted by a clinician."
MALIGNANT_COLOR = "#b2182b"
BENIGN_COLOR = "#2166ac"


def render_report_pdf(image: ImageRef, prediction: Prediction, cam_png: bytes, *, issued: datetime) -> bytes:
    """The report as PDF bytes (deterministic for the same inputs: no creation date embedded)."""
    fig = Figure(figsize=A4_INCHES)
    fig.text(0.07, 0.955, TITLE, fontsize=16, weight="bold")
    fig.text(0.07, 0.93, BANNER, fontsize=10, color=MALIGNANT_COLOR, weight="bold")
    fig.text(0.07, 0.80, _findings_text(image, prediction, issued), fontsize=9, family="monospace",
             va="bottom", linespacing=1.5)

    ax_img = fig.add_axes((0.07, 0.42, 0.40, 0.34))
    ax_img.imshow(imread(BytesIO(cam_png), format="png"))
    ax_img.set_title("Grad-CAM heatmap: regions that drove the result", fontsize=9)
    ax_img.set_axis_off()

    ax_bar = fig.add_axes((0.62, 0.45, 0.33, 0.28))
    probs = [100.0 * prediction.probabilities.get(c, 0.0) for c in CLASSES]
    colors = [MALIGNANT_COLOR if c in MALIGNANT else BENIGN_COLOR for c in CLASSES]
    ax_bar.barh([CLASS_NAMES[c] for c in CLASSES], probs, color=colors)
    ax_bar.invert_yaxis()
    ax_bar.set_xlim(0, 100)
    ax_bar.set_xlabel("probability (%)", fontsize=8)
    ax_bar.tick_params(labelsize=7)
    ax_bar.set_title("Class probabilities (red: malignant classes)", fontsize=9)

    fig.text(0.07, 0.30, _wrap(_method_text(prediction), 110), fontsize=8, va="top", linespacing=1.4)
    fig.text(0.07, 0.08, _wrap(DISCLAIMER + " " + BANNER, 100), fontsize=10, weight="bold", va="bottom")

    buf = BytesIO()
    fig.savefig(buf, format="pdf", metadata={"Creator": "dermgate", "Producer": "dermgate",
                                             "CreationDate": None, "Title": TITLE})
    return buf.getvalue()


def _findings_text(image: ImageRef, p: Prediction, issued: datetime) -> str:
    lines = [
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
        f"Confidence        : {'LOW - interpret with particular care' if p.low_confidence else 'normal'}"
        f"  (uncertainty {p.uncertainty:.2f})",
    ]
    return "\n".join(lines)


def _method_text(p: Prediction) -> str:
    m = p.model
    return (f"Method: {m.manufacturer} {m.name} version {m.version} (model sha256 {m.sha256[:16]}...), "
            "a convolutional network trained on HAM10000 dermoscopy images (7 classes), with calibrated "
            "probabilities and a Grad-CAM explanation of the most likely class. It has not been validated "
            "for every population, device or lesion type; it does not see the patient's history.")


def _wrap(text: str, width: int) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width))
