"""The JSON API beside the console: routers per resource with typed responses, the bearer scheme
and the refusals in OpenAPI, and the audited, paged ``GET /api/v1/results`` worklist."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from fastapi.testclient import TestClient

from audit.api import EventType
from dermgate.api.deps import hash_token
from dermgate.api.main import create_app
from dermgate.app import Runtime
from dermgate.db import JobState
from dermgate.settings import ApiSettings, Settings
from tests.console.conftest import result, seed

CLIN = {"Authorization": "Bearer clin-token"}


def runtime(tmp_path: Path) -> Runtime:
    tokens = tmp_path / "tokens.json"
    created = datetime.now(timezone.utc).isoformat()     # tokens live api.token_lifetime_days from here
    tokens.write_text(json.dumps({hash_token("clin-token"): {"user": "ehr-worklist", "role": "clinician",
                                                             "created": created},
                                  hash_token("ops-token"): {"user": "it.ops", "role": "operator", "created": created}}))
    return Runtime(Settings(workdir=tmp_path / "work", api=ApiSettings(tokens_file=tokens)))


def test_openapi_declares_the_bearer_scheme_typed_models_and_refusals(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    spec = TestClient(create_app(rt, check_model=False)).get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer",
        "description": "API token issued by `dermgate api-token add` (sent as `Authorization: Bearer ...`)"}
    get_one = spec["paths"]["/api/v1/results/{sop_instance_uid}"]["get"]
    assert get_one["security"] == [{"bearer": []}]
    assert {"401", "403", "404"} <= set(get_one["responses"])
    assert all(p["name"].lower() != "authorization" for p in get_one.get("parameters", []))
    review = spec["paths"]["/api/v1/results/{sop_instance_uid}/review"]["post"]
    assert {"201", "401", "403", "404", "409"} <= set(review["responses"])
    assert review["responses"]["201"]["content"]["application/json"]["schema"]["$ref"].endswith("/ReviewOut")
    schemas = spec["components"]["schemas"]
    assert {"ResultOut", "AIResult", "ReviewOut", "DeadLetterOut", "ResultsPage", "ErrorOut"} <= set(schemas)
    assert spec["paths"]["/api/v1/outbox/dead"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"]["items"]["$ref"].endswith("/DeadLetterOut")
    assert not any(p.startswith(("/worklist", "/case", "/login")) for p in spec["paths"])   # console pages hidden
    rt.close()


def test_results_list_is_paged_ordered_typed_and_audited(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    seed(rt, 1, patient="P-LOW", res=result("Low"))
    seed(rt, 1, patient="P-HIGH", res=result("High", top="mel", p_mal=0.9), minutes_ago=10)
    seed(rt, 1, patient="P-BUSY", state=JobState.RECEIVED)
    client = TestClient(create_app(rt, check_model=False))
    assert client.get("/api/v1/results").status_code == 401
    assert client.get("/api/v1/results", headers={"Authorization": "Bearer ops-token"}).status_code == 403
    page = client.get("/api/v1/results", params={"page_size": 2}, headers=CLIN)
    assert page.status_code == 200
    body = page.json()
    assert [i["patient_id"] for i in body["items"]] == ["P-HIGH", "P-LOW"]
    assert (body["total"], body["pages"], body["counts"]["awaiting review"], body["counts"]["processing"]) == (3, 2, 2, 1)
    assert body["items"][0]["risk"] == "High" and body["items"][0]["review"] is None
    high = client.get("/api/v1/results", params={"risk": "High"}, headers=CLIN).json()
    assert [i["patient_id"] for i in high["items"]] == ["P-HIGH"]
    assert client.get("/api/v1/results", params={"state": "bogus"}, headers=CLIN).status_code == 422
    one = client.get(f"/api/v1/results/{body['items'][0]['sop_instance_uid']}", headers=CLIN).json()
    assert one["result"]["model"]["version"] == "1.1.0" and one["result"]["risk"] == "High"
    reads = [r.event for r in rt.audit.events() if r.event.event is EventType.API_ACCESS]
    assert reads[0].detail["what"] == "results" and reads[0].detail["patients"] == ["P-HIGH", "P-LOW"]
    assert reads[0].actor == "ehr-worklist" and reads[0].purpose == "TREAT"
    rt.close()
