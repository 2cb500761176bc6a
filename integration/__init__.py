"""Protocol edges: DICOM (``integration.dicom_scp``) and FHIR (``integration.fhir``)."""
