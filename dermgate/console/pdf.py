"""The accounting of disclosures for one patient as a PDF (fpdf2), for the patient or the record."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fpdf import FPDF

from audit.codes import OUTCOME_TEXT


def _latin1(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")


def disclosures_pdf(patient_id: str, items: Sequence[Any], *, generated: datetime, by: str) -> bytes:
    pdf = FPDF(orientation="L", unit="mm", format="A4")
    pdf.set_title("Accounting of disclosures")
    pdf.set_author("dermgate")
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 14)
    pdf.cell(0, 8, _latin1(f"Accounting of disclosures - patient {patient_id}"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", size=9)
    pdf.cell(0, 6, _latin1(f"Generated {generated:%Y-%m-%d %H:%M} UTC by {by}; {len(items)} disclosure(s). "
                           "Source: dermgate's signed, encrypted audit trail."), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)
    widths = (14, 36, 32, 62, 30, 20, 58, 25)
    headers = ("Seq", "Time (UTC)", "Event", "Recipient", "By", "Purpose", "What", "Outcome")
    pdf.set_font("Helvetica", "B", 8)
    for w, h in zip(widths, headers):
        pdf.cell(w, 6, h, border=1)
    pdf.ln()
    pdf.set_font("Helvetica", size=7)
    for d in items:
        cells = (str(d.seq), d.time.strftime("%Y-%m-%d %H:%M:%S"), d.event.value, d.recipient, d.by,
                 d.purpose or "", d.what, OUTCOME_TEXT.get(d.outcome, str(d.outcome)))
        for w, text in zip(widths, cells):
            text = _latin1(text)
            while text and pdf.get_string_width(text) > w - 2:
                text = text[:-2] + "~"
            pdf.cell(w, 5, text, border=1)
        pdf.ln()
    return bytes(pdf.output())
