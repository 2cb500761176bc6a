"""dermgate: DICOM in, AI decision support out, FHIR to the EHR, every access audited."""

__version__ = "0.1.0"
