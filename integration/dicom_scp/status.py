"""DIMSE status codes the SCP answers with (PS3.4 B.2.3, PS3.7 C), named once.

C-STORE failures fall in three ranges (PS3.4 Table B.2-1):

* ``A7xx`` Refused: Out of Resources -- transient, the SCU may retry later;
* ``A9xx`` Error: Data Set does not match SOP Class;
* ``Cxxx`` Error: Cannot understand -- permanent, resending the same object fails again.

Within ``Cxxx`` each reason has its own code so an SCU (and the audit trail) can tell
them apart without parsing the Error Comment (0000,0902) that accompanies every failure.
"""

from __future__ import annotations

from typing import Final

# Success and general (PS3.7 C.1)
SUCCESS: Final = 0x0000

# Storage Service Class (PS3.4 B.2.3)
OUT_OF_RESOURCES: Final = 0xA700                # store full, unwritable, or the database unavailable
DATASET_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900  # SOP Class in the data set != the presentation context's
CANNOT_UNDERSTAND: Final = 0xC000               # an unexpected error: never an abort
MISSING_ATTRIBUTE: Final = 0xC001               # Patient ID / Study Instance UID / SOP Instance UID absent
NO_PIXEL_DATA: Final = 0xC002                   # Pixel Data (7FE0,0010) absent or empty
UNSUPPORTED_IMAGE: Final = 0xC003               # dimensions, samples, bits or photometric out of bounds
UNDECODABLE_PIXEL_DATA: Final = 0xC004          # the codec failed, or the frame is truncated / wrong size
UNREADABLE_DATASET: Final = 0xC005              # the data set itself cannot be parsed (truncated stream)
# The SOP Instance UID was already received with *different* bytes. The first
# object is kept (it may already be classified and reported) and the new one is
# refused permanently: retrying cannot succeed, the sender must issue a new UID.
# PS3.7's 0x0111 "Duplicate SOP Instance" is a DIMSE-N status, so a Cxxx code is used.
SOP_INSTANCE_CONFLICT: Final = 0xC006

# Error Comment (0000,0902) is LO: at most 64 characters (PS3.7 E.1).
ERROR_COMMENT_MAX: Final = 64

STATUS_NAMES: Final[dict[int, str]] = {
    SUCCESS: "success",
    OUT_OF_RESOURCES: "out_of_resources",
    DATASET_DOES_NOT_MATCH_SOP_CLASS: "dataset_does_not_match_sop_class",
    CANNOT_UNDERSTAND: "cannot_understand",
    MISSING_ATTRIBUTE: "missing_attribute",
    NO_PIXEL_DATA: "no_pixel_data",
    UNSUPPORTED_IMAGE: "unsupported_image",
    UNDECODABLE_PIXEL_DATA: "undecodable_pixel_data",
    UNREADABLE_DATASET: "unreadable_dataset",
    SOP_INSTANCE_CONFLICT: "sop_instance_conflict",
}


def status_name(code: int) -> str:
    """A stable label for metrics and audit details (``0x....`` when not ours)."""
    return STATUS_NAMES.get(code, f"0x{code:04X}")
