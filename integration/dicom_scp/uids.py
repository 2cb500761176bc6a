"""Named DICOM constants: SOP classes, transfer syntaxes, coding schemes and codes.

Append-friendly: one constant per line, grouped by kind, each with the part of
the standard it comes from. Codes are ``pydicom.sr.coding.Code`` values so that
pydicom, highdicom and our own writers share one spelling.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

from pydicom.sr.coding import Code
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
)

# --- SOP classes (PS3.4 Annex B.5) -------------------------------------------
VERIFICATION: Final = UID("1.2.840.10008.1.1")
SECONDARY_CAPTURE_IMAGE_STORAGE: Final = UID("1.2.840.10008.5.1.4.1.1.7")
MULTIFRAME_TRUE_COLOR_SC_IMAGE_STORAGE: Final = UID("1.2.840.10008.5.1.4.1.1.7.4")
VL_PHOTOGRAPHIC_IMAGE_STORAGE: Final = UID("1.2.840.10008.5.1.4.1.1.77.1.4")
DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE: Final = UID("1.2.840.10008.5.1.4.1.1.77.1.7")  # Sup 221
COMPREHENSIVE_3D_SR_STORAGE: Final = UID("1.2.840.10008.5.1.4.1.1.88.34")            # IHE AIR

# --- Transfer syntaxes (PS3.5 Annex A) ----------------------------------------
IMPLICIT_VR_LE: Final = ImplicitVRLittleEndian
EXPLICIT_VR_LE: Final = ExplicitVRLittleEndian
DEFLATED_EXPLICIT_VR_LE: Final = DeflatedExplicitVRLittleEndian
JPEG_BASELINE: Final = JPEGBaseline8Bit            # 1.2.840.10008.1.2.4.50
JPEG_EXTENDED: Final = JPEGExtended12Bit           # 1.2.840.10008.1.2.4.51
JPEG_LOSSLESS: Final = JPEGLossless                # 1.2.840.10008.1.2.4.57
JPEG_LOSSLESS_SV1: Final = JPEGLosslessSV1         # 1.2.840.10008.1.2.4.70
JPEG_2000_LOSSLESS: Final = JPEG2000Lossless       # 1.2.840.10008.1.2.4.90
JPEG_2000: Final = JPEG2000                        # 1.2.840.10008.1.2.4.91
RLE_LOSSLESS: Final = RLELossless                  # 1.2.840.10008.1.2.5
UNCOMPRESSED_TRANSFER_SYNTAXES: Final = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)

# --- Coding scheme designators (PS3.16 Section 8) ----------------------------
DCM: Final = "DCM"                 # DICOM Controlled Terminology (PS3.16 Annex D)
SCT: Final = "SCT"                 # SNOMED CT
UCUM: Final = "UCUM"               # units
UMLS: Final = "UMLS"
IHE: Final = "99IHE"               # IHE private scheme (IHE AIR "Newcode1")
LOCAL: Final = "99DERMGATE"        # this product's private scheme, documented below

# Private coding schemes are identified in SOP Common's Coding Scheme
# Identification Sequence (PS3.3 C.12.1.1.7 / PS3.16 8.2).
PRIVATE_CODING_SCHEMES: Final = MappingProxyType({
    LOCAL: ("dermgate local codes", "dermgate project"),
    IHE: ("IHE private codes", "IHE International"),
})

# --- Purposes of reference ---------------------------------------------------
# Contributing Equipment of an AI result (IHE AIR, Rad TF-3 6.5.x, "Newcode1").
PROCESSING_ALGORITHM: Final = Code("Newcode1", IHE, "Processing Algorithm")
# Source Image Sequence of a derived image: CID 7202 "Source Image Purpose of Reference".
SOURCE_IMAGE_FOR_PROCESSING: Final = Code("121322", DCM, "Source image for image processing operation")

# --- TID 1500 measurement report (PS3.16 Annex A) -----------------------------
IMAGING_MEASUREMENT_REPORT: Final = Code("126000", DCM, "Imaging Measurement Report")      # CID 7021
QUALITATIVE_EVALUATIONS: Final = Code("C0034375", UMLS, "Qualitative Evaluations")        # TID 1500 row 12
DERMOSCOPIC_PHOTOGRAPHY_PROCEDURE: Final = Code("446078004", SCT, "Dermoscopic photography")  # procedure reported
PROBABILITY: Final = Code("122157", DCM, "Probability")
PROBABILITY_OF_CANCER: Final = Code("111047", DCM, "Probability of cancer")               # CID 6048
YES: Final = Code("373066001", SCT, "Yes")                                                # CID 230
NO: Final = Code("373067005", SCT, "No")

# Units (UCUM).
UNIT_PERCENT: Final = Code("%", UCUM, "Percent")
UNIT_NONE: Final = Code("1", UCUM, "no units")

# Risk values: CID 3118 "Risk" where a standard concept exists.
LOW_RISK: Final = Code("75976002", SCT, "Low risk")
MODERATE_RISK: Final = Code("25594002", SCT, "Moderate risk")
HIGH_RISK: Final = Code("15508007", SCT, "High risk")

# --- Local codes (99DERMGATE) -------------------------------------------------
# Concept names for which no standard code exists. Meanings are the definitions.
RISK_CATEGORY: Final = Code("RISK-CATEGORY", LOCAL, "Malignancy risk category")
NOT_ASSESSABLE: Final = Code("NOT-ASSESSABLE", LOCAL, "Not assessable by the algorithm")
UNCERTAINTY: Final = Code("UNCERTAINTY", LOCAL, "Normalized entropy of class probabilities")
LOW_CONFIDENCE: Final = Code("LOW-CONFIDENCE", LOCAL, "Low confidence result")
OUT_OF_DISTRIBUTION: Final = Code("OUT-OF-DISTRIBUTION", LOCAL, "Image outside the training distribution")
OOD_SCORE: Final = Code("OOD-SCORE", LOCAL, "Distance to the training feature distribution")
NOT_ASSESSABLE_REASON: Final = Code("NA-REASON", LOCAL, "Reason not assessable")
DISCLAIMER_TEXT: Final = Code("DISCLAIMER", LOCAL, "Decision support disclaimer")
CLASSIFIED_FRAMES: Final = Code("FRAMES", LOCAL, "Frames classified")      # multi-frame sources

# --- Findings for the seven HAM10000 classes ---------------------------------
# SNOMED CT where a concept was verified against published sources (DICOM PS3.16
# via pydicom's code dictionary, SNOMED browsers). bkl and vasc are groups of
# several disorders with no single SNOMED concept; for df the sources disagreed.
# Those three carry local codes until a terminology review assigns concepts.
FINDING_CODES: Final = MappingProxyType({
    "akiec": Code("201101007", SCT, "Actinic keratosis"),                 # CID 4405
    "bcc": Code("254701007", SCT, "Basal cell carcinoma of skin"),
    "bkl": Code("BKL", LOCAL, "Benign keratosis-like lesion"),
    "df": Code("DF", LOCAL, "Dermatofibroma"),
    "mel": Code("93655004", SCT, "Malignant melanoma of skin"),
    "nv": Code("400096001", SCT, "Melanocytic nevus"),
    "vasc": Code("VASC", LOCAL, "Vascular lesion"),
})

# --- What the SCP accepts (integration/dicom_scp/scp.py) ----------------------
# An explicit list, not every storage class (issue 2, "The SCP").
SCP_STORAGE_SOP_CLASSES: Final = (
    DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE,
    VL_PHOTOGRAPHIC_IMAGE_STORAGE,
    SECONDARY_CAPTURE_IMAGE_STORAGE,
)
# Uncompressed first; JPEG Lossless both as Process 14 (.57) and its SV1 (.70).
SCP_TRANSFER_SYNTAXES: Final = (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    JPEG_BASELINE,
    JPEG_EXTENDED,
    JPEG_LOSSLESS_SV1,
    JPEG_LOSSLESS,
    JPEG_2000_LOSSLESS,
    JPEG_2000,
    RLE_LOSSLESS,
)
