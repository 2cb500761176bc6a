"""EHR profiles: which resources a report becomes, and how they travel.

A profile is data, not code: the builders and the client read its switches.
What each profile sends, and why, is written down in docs/fhir-profiles.md.

``generic-r4``     transaction Bundle; Device + Observations + DiagnosticReport as
                   separate resources, each a conditional create.
``epic``           one DiagnosticReport per image with the Observations and the Device
                   *contained* (one atomic create); no transaction Bundle, so
                   idempotency is search-before-create on the business identifier.
``oracle-health``  Millennium's DiagnosticReport create takes only cardiology and
                   pathology reports: the report goes as a DocumentReference (one
                   content entry, the PDF: Millennium takes one attachment and no
                   image/png), US Core category ``clinical-note``, author a Practitioner
                   reference; the Observations as separate resources with the Device
                   contained; every date carries a time part; sequential creates with
                   search-before-create.

Searches: ``generic-r4`` finds its resources by business identifier (FHIR's token
search, and conditional create). Neither vendor documents a search by identifier
alone for these resources (Epic: DiagnosticReport by ``_id``/``patient``/``date``,
Observation by patient plus code or category; Millennium: DocumentReference by
``_id`` or ``patient``), so the vendor profiles search by ``patient`` (plus the
category where the vendor needs one) and pick the identifier out of the results.
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


class SearchStyle(str, Enum):
    IDENTIFIER = "identifier"    # ?identifier=system|value (and conditional create)
    PATIENT = "patient"          # ?patient=Patient/x[&category=...], matched on the identifier locally


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
    search: SearchStyle = SearchStyle.IDENTIFIER
    media: bool = True             # DiagnosticReport.media -> Media with the heatmap (US Core Report and Note)
    provenance: bool = False       # a Provenance resource (agent: the model Device)
    author_must_be_practitioner: bool = False


PROFILES: dict[ProfileName, Profile] = {
    ProfileName.GENERIC_R4: Profile(
        name=ProfileName.GENERIC_R4, report=ReportResource.DIAGNOSTIC_REPORT, results=ResultsMode.RESOURCES,
        device=DeviceMode.RESOURCE, transport=Transport.TRANSACTION, dates_need_time=False,
        document_includes_png=False, provenance=True),
    ProfileName.EPIC: Profile(
        name=ProfileName.EPIC, report=ReportResource.DIAGNOSTIC_REPORT, results=ResultsMode.CONTAINED,
        device=DeviceMode.CONTAINED, transport=Transport.SEQUENTIAL, dates_need_time=False,
        document_includes_png=False, search=SearchStyle.PATIENT),
    ProfileName.ORACLE_HEALTH: Profile(
        name=ProfileName.ORACLE_HEALTH, report=ReportResource.DOCUMENT_REFERENCE, results=ResultsMode.RESOURCES,
        device=DeviceMode.CONTAINED, transport=Transport.SEQUENTIAL, dates_need_time=True,
        document_includes_png=False, search=SearchStyle.PATIENT, media=False, author_must_be_practitioner=True),
}


def get_profile(name: ProfileName | str) -> Profile:
    return PROFILES[ProfileName(name)]
