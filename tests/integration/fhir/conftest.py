"""Fixtures for the FHIR delivery tests: the loopback FHIR server, the R4 schema, test data.

The server fixtures live in ``tests.integration.fhir.peer`` so that other test
areas (the end-to-end DICOM -> FHIR test) can use them as a pytest plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from integration.fhir.auth import generate_private_key_pem, jwks, load_private_key
from integration.fhir.settings import FhirSettings, SigningAlg
from tests.integration.fhir.data import ISSUER, PATIENT_SYSTEM
from tests.integration.fhir.peer import (  # noqa: F401  (fixtures)
    FhirTestServer,
    ListAuditSink,
    audit_sink,
    fhir,
    fhir_schema,
    fhir_server,
)

TEST_CLIENT_ID = "dermgate-test-client"


@pytest.fixture
def patient(fhir: FhirTestServer) -> dict[str, Any]:
    """The test patient, registered on the EHR under the hospital's MRN system."""
    return fhir.create({"resourceType": "Patient", "identifier": [{"system": PATIENT_SYSTEM, "value": "MRN-0001"}],
                        "name": [{"family": "Test", "given": ["Pat"]}], "gender": "unknown"})


@pytest.fixture
def fhir_settings(fhir: FhirTestServer) -> FhirSettings:
    """Settings for the test server without auth (generic-r4)."""
    return FhirSettings(base_url=fhir.base_url, patient_identifier_systems={ISSUER: PATIENT_SYSTEM},
                        timeouts={"connect_s": 2.0, "read_s": 5.0, "write_s": 5.0, "pool_s": 2.0})


@pytest.fixture
def smart_key(tmp_path: Path, fhir: FhirTestServer) -> Callable[[SigningAlg], Path]:
    """Makes a key pair for an algorithm, registers its public JWK Set with the token endpoint
    and returns the private key's path."""
    made: list[Path] = []

    def make(alg: SigningAlg = SigningAlg.RS384, client_id: str = TEST_CLIENT_ID, register: bool = True) -> Path:
        path = tmp_path / f"smart-{alg.value}-{client_id}-{len(made)}.pem"
        made.append(path)
        path.write_bytes(generate_private_key_pem(alg))
        if register:
            fhir.register_client(client_id, jwks([load_private_key(path, alg)]))
        return path
    return make
