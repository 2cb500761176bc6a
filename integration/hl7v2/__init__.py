"""HL7 v2.5.1 results out: ORU^R01 (or MDM^T02) over MLLP to the hospital's interface engine."""
