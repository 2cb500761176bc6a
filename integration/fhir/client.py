"""A small FHIR R4 REST client on an injected ``httpx.Client``.

Every request goes through ``_send``: the one place where httpx exceptions and
HTTP error statuses become the package's exception tree (``errors.py``). The
client knows FHIR's REST rules (search, conditional create, transactions,
versioned update) but nothing about dermgate's reports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import httpx

from integration.fhir.errors import (
    FhirAuthError,
    FhirConflict,
    FhirError,
    FhirRejected,
    FhirServerError,
    FhirThrottled,
    FhirTimeout,
    FhirUnavailable,
    TokenEndpointError,
    parse_retry_after,
)
from integration.fhir.settings import FhirSettings

FHIR_JSON = "application/fhir+json"
MAX_REASON_CHARS = 500
MAX_ISSUES_IN_REASON = 3
MAX_PAGES = 50


@dataclass(frozen=True)
class Created:
    """Outcome of a (conditional) create: the resource's reference and whether it is new."""
    reference: str          # "Type/id"
    created: bool
    version_id: str | None = None


def build_http_client(settings: FhirSettings, *, auth: httpx.Auth | None = None,
                      transport: httpx.BaseTransport | None = None) -> httpx.Client:
    """The httpx.Client for an EHR: base URL, timeouts, TLS verification, pluggable auth."""
    t = settings.timeouts
    verify: bool | str = str(settings.verify_tls) if not isinstance(settings.verify_tls, bool) else settings.verify_tls
    return httpx.Client(base_url=settings.fhir_base, auth=auth, transport=transport, verify=verify,
                        timeout=httpx.Timeout(connect=t.connect_s, read=t.read_s, write=t.write_s, pool=t.pool_s),
                        headers={"Accept": FHIR_JSON, "User-Agent": "dermgate-fhir"})


class FhirClient:
    def __init__(self, http: httpx.Client, *, token_url: str | None = None) -> None:
        self.http = http
        self.token_url = token_url

    @property
    def base_url(self) -> str:
        return str(self.http.base_url)

    def close(self) -> None:
        self.http.close()

    # ---- the boundary --------------------------------------------------------------------------

    def _send(self, method: str, url: str, *, json: Any = None, params: Mapping[str, str] | None = None,
              headers: Mapping[str, str] | None = None) -> httpx.Response:
        hdrs = dict(headers or {})
        if json is not None:
            hdrs["Content-Type"] = FHIR_JSON
        try:
            response = self.http.request(method, url, json=json, params=params, headers=hdrs)
        except FhirError:
            raise                                  # from the auth flow (token endpoint)
        except httpx.TimeoutException as exc:
            raise self._transport_error(exc, FhirTimeout, "timed out") from exc
        except httpx.TransportError as exc:
            raise self._transport_error(exc, FhirUnavailable, "connection failed") from exc
        if response.is_success:
            return response
        raise _status_error(response)

    def _transport_error(self, exc: httpx.TransportError, kind: type[FhirError], what: str) -> FhirError:
        try:
            target = str(exc.request.url)
        except RuntimeError:
            target = ""
        if self.token_url and target.split("?")[0] == self.token_url:
            return TokenEndpointError(f"token endpoint {what} ({type(exc).__name__})")
        return kind(f"FHIR server {what} ({type(exc).__name__})")

    # ---- interactions --------------------------------------------------------------------------

    def search(self, resource_type: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        """Search (GET); the matches only, not included resources. No paging: callers search by identifier."""
        bundle = self._send("GET", resource_type, params=params).json()
        return [e["resource"] for e in bundle.get("entry", [])
                if "resource" in e and e.get("search", {}).get("mode", "match") == "match"]

    def search_identifier(self, resource_type: str, system: str, value: str) -> list[dict[str, Any]]:
        return self.search(resource_type, {"identifier": f"{system}|{value}"})

    def search_all(self, resource_type: str, params: Mapping[str, str], max_pages: int = MAX_PAGES) -> list[dict[str, Any]]:
        """Search and follow the ``next`` links (a patient's reports can span pages)."""
        page = self._send("GET", resource_type, params=params).json()
        out: list[dict[str, Any]] = []
        for _ in range(max_pages):
            out += [e["resource"] for e in page.get("entry", [])
                    if "resource" in e and e.get("search", {}).get("mode", "match") == "match"]
            nxt = next((link.get("url") for link in page.get("link", []) if link.get("relation") == "next"), None)
            if not nxt:
                return out
            page = self._send("GET", nxt).json()
        raise FhirRejected(f"{resource_type} search has more than {max_pages} pages")

    def read(self, resource_type: str, resource_id: str) -> tuple[dict[str, Any], str | None]:
        """The resource and its version id (from meta or the ETag)."""
        response = self._send("GET", f"{resource_type}/{resource_id}")
        resource = response.json()
        return resource, resource.get("meta", {}).get("versionId") or _etag_version(response.headers.get("ETag"))

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST a transaction Bundle to the base; the transaction-response Bundle, every entry 2xx
        (a server that quietly processed it as a batch and failed an entry is refused here)."""
        response = self._send("POST", "", json=bundle).json()
        entries = response.get("entry", [])
        if len(entries) != len(bundle.get("entry", [])):
            raise FhirRejected(f"transaction-response has {len(entries)} entries for {len(bundle.get('entry', []))}")
        for n, entry in enumerate(entries):
            status = str(entry.get("response", {}).get("status", ""))
            if not status[:1] == "2":
                issues = entry.get("response", {}).get("outcome", {}).get("issue", [])
                raise FhirRejected(f"transaction entry {n} answered {status or 'nothing'}"
                                   + (f": {_issue_text(issues)}" if issues else ""), issues=issues)
        return response

    def create(self, resource: dict[str, Any], *, if_none_exist: str | None = None) -> Created:
        """Create, conditionally when ``if_none_exist`` is given (200 = it existed, 201 = created)."""
        headers = {"If-None-Exist": if_none_exist} if if_none_exist else None
        response = self._send("POST", resource["resourceType"], json=resource, headers=headers)
        body = _json_or_empty(response)
        ref = _reference_from(response.headers.get("Location"), body)
        if ref is None:
            raise FhirRejected(f"create of {resource['resourceType']} returned no id", status=response.status_code)
        version = body.get("meta", {}).get("versionId") or _etag_version(response.headers.get("ETag"))
        return Created(reference=ref, created=response.status_code == httpx.codes.CREATED, version_id=version)

    def update(self, resource: dict[str, Any], version_id: str) -> dict[str, Any]:
        """Versioned update: PUT with If-Match, so a concurrent change yields 412 instead of being lost."""
        path = f"{resource['resourceType']}/{resource['id']}"
        response = self._send("PUT", path, json=resource, headers={"If-Match": f'W/"{version_id}"'})
        return _json_or_empty(response)

    def create_sequentially(self, bundle: dict[str, Any], *,
                            find: Callable[[dict[str, Any], str], list[dict[str, Any]]] | None = None,
                            conditional: bool = True) -> dict[str, str]:
        """Applies a transaction Bundle's conditional creates one by one, for servers without
        transactions: look the entry up, create only when nothing matches. ``find(resource,
        criteria)`` is the look-up (default: the ``ifNoneExist`` criteria as a search);
        ``conditional`` also sends If-None-Exist with the create. Entries must come in
        dependency order. Returns fullUrl -> "Type/id"."""
        resolved: dict[str, str] = {}
        for entry in bundle.get("entry", []):
            resource = _resolve(entry["resource"], resolved)
            rtype = resource["resourceType"]
            criteria = entry.get("request", {}).get("ifNoneExist")
            ref: str | None = None
            if criteria:
                matches = find(resource, criteria) if find else self.search(rtype, dict(parse_qsl(criteria)))
                if len(matches) > 1:
                    raise FhirRejected(f"{len(matches)} {rtype} resources already carry one business identifier")
                if matches:
                    ref = f"{rtype}/{matches[0]['id']}"
            if ref is None:
                ref = self.create(resource, if_none_exist=criteria if conditional else None).reference
            resolved[entry["fullUrl"]] = ref
        return resolved


# ---- helpers ------------------------------------------------------------------------------------

def _status_error(response: httpx.Response) -> FhirError:
    status = response.status_code
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    issues = _issues(response)
    summary = f"HTTP {status}" + (f": {_issue_text(issues)}" if issues else "")
    summary = summary[:MAX_REASON_CHARS]
    if status == httpx.codes.TOO_MANY_REQUESTS or (status == httpx.codes.SERVICE_UNAVAILABLE and retry_after):
        return FhirThrottled(summary, status=status, retry_after_s=retry_after)
    if status >= 500:
        return FhirServerError(summary, status=status, retry_after_s=retry_after)
    if status in (httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN):
        return FhirAuthError(summary, status=status)
    if status in (httpx.codes.CONFLICT, httpx.codes.PRECONDITION_FAILED):
        return FhirConflict(summary, status=status)
    return FhirRejected(summary, status=status, issues=issues)


def _issues(response: httpx.Response) -> list[dict[str, Any]]:
    body = _json_or_empty(response)
    if body.get("resourceType") != "OperationOutcome":
        return []
    return [i for i in body.get("issue", []) if isinstance(i, dict)]


SEVERITY_ORDER = {"fatal": 0, "error": 1, "warning": 2, "information": 3}


def _issue_text(issues: list[dict[str, Any]]) -> str:
    """The most severe issues first: a 400's reason is its errors, not the warnings beside them."""
    issues = sorted(issues, key=lambda i: SEVERITY_ORDER.get(i.get("severity", ""), 4))
    parts = []
    for issue in issues[:MAX_ISSUES_IN_REASON]:
        text = issue.get("diagnostics") or issue.get("details", {}).get("text") or ""
        where = ",".join(issue.get("expression", []) or issue.get("location", []))
        parts.append(f"{issue.get('severity', '?')} {issue.get('code', '?')}: {text}" + (f" at {where}" if where else ""))
    more = len(issues) - MAX_ISSUES_IN_REASON
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _json_or_empty(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _etag_version(etag: str | None) -> str | None:
    if not etag:
        return None
    return etag.removeprefix("W/").strip('"') or None


def _reference_from(location: str | None, body: dict[str, Any]) -> str | None:
    """"Type/id" from a Location header (.../Type/id/_history/v) or the returned resource."""
    if body.get("resourceType") and body.get("id") and body["resourceType"] != "OperationOutcome":
        return f"{body['resourceType']}/{body['id']}"
    return reference_from_location(location)


def reference_from_location(location: str | None) -> str | None:
    if not location:
        return None
    parts = location.split("?")[0].rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:]) if len(parts) >= 2 else None


def _resolve(resource: dict[str, Any], resolved: Mapping[str, str]) -> dict[str, Any]:
    """The resource with references to earlier entries' fullUrls replaced by their server ids."""
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (resolved.get(v, v) if k == "reference" and isinstance(v, str) else walk(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node
    return walk(resource)
