"""Real peers for tests on loopback (dcmtk, dicom3tools, Orthanc, PostgreSQL), as pytest fixtures."""
