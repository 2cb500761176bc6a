"""Fixtures for the FHIR delivery tests.

They live in ``tests.integration.fhir.peer`` so that other test areas (the
end-to-end DICOM -> FHIR test) can load the same ones as a pytest plugin:
``pytest_plugins = ["tests.integration.fhir.peer"]`` in tests/conftest.py.
"""
