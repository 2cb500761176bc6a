"""FhirSettings refuse half-configured auth and never hold key material."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from integration.fhir.settings import FhirSettings


def test_auth_settings_come_all_together_or_not_at_all(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="go together"):
        FhirSettings(base_url="https://ehr.invalid/fhir/", token_url="https://ehr.invalid/token")
    full = FhirSettings(base_url="https://ehr.invalid/fhir/", token_url="https://ehr.invalid/token",
                        client_id="app", private_key_file=tmp_path / "key.pem")
    assert full.auth_enabled and not FhirSettings().auth_enabled


def test_base_url_gets_one_trailing_slash_so_relative_paths_stay_under_it() -> None:
    assert FhirSettings(base_url="https://ehr.invalid/api/FHIR/R4").fhir_base == "https://ehr.invalid/api/FHIR/R4/"


def test_assertion_lifetime_over_five_minutes_is_refused() -> None:
    with pytest.raises(ValidationError):
        FhirSettings(assertion_lifetime_s=600)
