"""EHR profiles: which resources a report becomes, and how they travel.

A profile is data, not code: the builders and the client read its switches.
What each profile sends, and why, is written down in docs/fhir-profiles.md.

``generic-r4``     transaction Bundle; Device + Observations + DiagnosticReport as
                   separate resources, each a conditional create.
``epic``           one DiagnosticReport per image with the Observations and the Device
                   *contained* (one atomic create); no transaction Bundle, so
                   idempotency is search-before-create on the business identifier.
``oracle-health``  Millennium's DiagnosticReport create takes only cardiology and
                   pathology reports: the report goes as a DocumentReference (PDF,
                   optionally the heatmap PNG), the Observations as separate resources
                   with the Device contained; every date carries a time part;
                   sequential creates with search-before-create.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from integration.fhir.settings import ProfileName


class ReportResource(str, Enum):
    DIAGNOSTIC_REPORT = "DiagnosticReport"
    DOCUMENT_REFERENCE = "DocumentReference"


class ResultsMode(str, Enum):
    RESOURCES = "resources"      # Observations as their own resources, referenced by the report
    CONTAINED = "contained"      # Observations contained in the report
    OMITTED = "omitted"          # the report alone


class DeviceMode(str, Enum):
    RESOURCE = "resource"        # conditional create of a Device (shared by all reports of a model)
    CONTAINED = "contained"      # contained where it is referenced


class Transport(str, Enum):
    TRANSACTION = "transaction"  # POST the Bundle; conditional creates resolved by the server
    SEQUENTIAL = "sequential"    # entry by entry: search the identifier, create when absent


@dataclass(frozen=True)
class Profile:
    name: ProfileName
    report: ReportResource
    results: ResultsMode
    device: DeviceMode
    transport: Transport
    dates_need_time: bool          # never send a bare date (Oracle Health)
    document_includes_png: bool    # DocumentReference: the heatmap as a second content item


PROFILES: dict[ProfileName, Profile] = {
    ProfileName.GENERIC_R4: Profile(
        name=ProfileName.GENERIC_R4, report=ReportResource.DIAGNOSTIC_REPORT, results=ResultsMode.RESOURCES,
        device=DeviceMode.RESOURCE, transport=Transport.TRANSACTION, dates_need_time=False,
        document_includes_png=False),
    ProfileName.EPIC: Profile(
        name=ProfileName.EPIC, report=ReportResource.DIAGNOSTIC_REPORT, results=ResultsMode.CONTAINED,
        device=DeviceMode.CONTAINED, transport=Transport.SEQUENTIAL, dates_need_time=False,
        document_includes_png=False),
    ProfileName.ORACLE_HEALTH: Profile(
        name=ProfileName.ORACLE_HEALTH, report=ReportResource.DOCUMENT_REFERENCE, results=ResultsMode.RESOURCES,
        device=DeviceMode.CONTAINED, transport=Transport.SEQUENTIAL, dates_need_time=True,
        document_includes_png=True),
}


def get_profile(name: ProfileName | str) -> Profile:
    return PROFILES[ProfileName(name)]
