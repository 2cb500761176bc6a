"""The console's pages: sign-in, worklist, case and review, audit trail, IT.

Every page is rendered on the server; forms post back with the session's CSRF token; the
patient id never appears in a URL the console makes (search filters stay in the server-side
session), except ``/audit?patient=ID``, which the console accepts for links from other systems.
Every view of patient data and of the audit trail is audited with user, role and purpose of use.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from audit.api import AuditEvent, EventType, Outcome
from audit.codes import OUTCOME_TEXT
from dermgate import __version__
from dermgate.app import Runtime
from dermgate.console.accounts import Accounts, console_key
from dermgate.console.sessions import COOKIE, SECURE_COOKIE, ConsoleUser, Sessions
from dermgate.db import utcnow
from dermgate.results import RISKS, STATES, WorklistFilter, case_of, devices, worklist
from inference.result import CLASS_NAMES, CLASSES, DISCLAIMER, MALIGNANT

HERE = Path(__file__).resolve().parent
LOGIN_CSRF_COOKIE = "dermgate_login_csrf"
OIDC_FLOW_COOKIE = "dermgate_oidc_flow"
CLINICAL = ("clinician", "admin")
COMPLIANCE = ("compliance", "admin")
OPERATIONS = ("operator", "admin")
LANDING = {"clinician": "/worklist", "admin": "/worklist", "compliance": "/audit", "operator": "/ops"}
# Paths the console serves; its security headers go on these only (the JSON API has its own).
CONSOLE_PREFIXES = ("/login", "/logout", "/auth/", "/worklist", "/case/", "/audit", "/ops", "/model-card",
                    "/static/", "/account")


class SignInRequired(Exception):
    def __init__(self, reason: str | None) -> None:
        super().__init__(reason)
        self.reason = reason


class Forbidden(Exception):
    pass


class NotFound(Exception):
    pass


@dataclass
class Console:
    rt: Runtime
    templates: Jinja2Templates
    accounts: Accounts
    sessions: Sessions
    oidc: Any = None                       # OidcClient when configured

    @property
    def settings(self) -> Any:
        return self.rt.settings.console


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


def is_tls(request: Request, rt: Runtime) -> bool:
    if request.url.scheme == "https":
        return True
    return rt.settings.api.plain_http_behind_tls_proxy and request.headers.get("x-forwarded-proto") == "https"


def cookie_name(request: Request, rt: Runtime) -> str:
    return SECURE_COOKIE if is_tls(request, rt) else COOKIE


def _console(request: Request) -> Console:
    return request.app.state.console


def signed_in(*roles: str) -> Any:
    """Dependency: the signed-in user, holding one of ``roles`` (any role when none given)."""
    def dep(request: Request) -> ConsoleUser:
        c = _console(request)
        user, why = c.sessions.resolve(request.cookies.get(cookie_name(request, c.rt)), source=client_ip(request))
        if user is None:
            raise SignInRequired(why)
        request.state.user = user
        if roles and user.role not in roles:
            c.rt.audit.record(AuditEvent(event=EventType.AUTH_FAILURE, outcome=Outcome.MINOR_FAILURE,
                                         actor=user.username, actor_role=user.role, source=client_ip(request),
                                         detail={"path": request.url.path, "reason": f"role {user.role} not allowed",
                                                 "via": "console"}))
            raise Forbidden()
        return user
    return Depends(dep)


def audit_view(c: Console, user: ConsoleUser, request: Request, what: str, *, patient_id: str | None = None,
               study_uid: str | None = None, sop_uids: tuple[str, ...] = (), detail: dict[str, Any] | None = None,
               outcome: Outcome = Outcome.SUCCESS) -> None:
    """A view of patient data (DCM 110110 Patient Record, read), before the data is sent."""
    c.rt.audit.record(AuditEvent(event=EventType.API_ACCESS, outcome=outcome, actor=user.username,
                                 actor_role=user.role, action="R", purpose=user.purpose, source=client_ip(request),
                                 patient_id=patient_id, study_uid=study_uid, sop_instance_uids=sop_uids,
                                 detail={"what": what, "via": "console", **(detail or {})}))


def render(c: Console, request: Request, name: str, status_code: int = 200, **ctx: Any) -> HTMLResponse:
    user = getattr(request.state, "user", None)
    base = {"user": user, "version": __version__, "disclaimer": DISCLAIMER, "class_names": CLASS_NAMES,
            "idle_timeout_s": c.settings.idle_timeout_s, "flash": None}
    if user is not None and user.data.get("flash"):
        base["flash"] = user.data["flash"]
        c.sessions.save_data(user, "flash", None)
    return c.templates.TemplateResponse(request, name, {**base, **ctx}, status_code=status_code)


def flash(c: Console, user: ConsoleUser, message: str) -> None:
    c.sessions.save_data(user, "flash", message)


def check_csrf(c: Console, user: ConsoleUser, token: str | None) -> None:
    if not Sessions.csrf_ok(user, token):
        raise Forbidden()


def see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _fmt_time(value: datetime | None) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if value else ""


def _pct(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else ""


def _date(text: str | None) -> date | None:
    try:
        return date.fromisoformat(text) if text else None
    except ValueError:
        return None


# ---- security headers --------------------------------------------------------------------------

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")


def security_headers(response: Response, *, tls: bool, static: bool) -> None:
    h = response.headers
    h["Content-Security-Policy"] = CSP
    h["X-Frame-Options"] = "DENY"
    h["X-Content-Type-Options"] = "nosniff"
    h["Referrer-Policy"] = "no-referrer"
    h["Cross-Origin-Opener-Policy"] = "same-origin"
    h["Cross-Origin-Resource-Policy"] = "same-origin"
    h["Permissions-Policy"] = "camera=(), microphone=(), geolocation=(), payment=()"
    if tls:
        h["Strict-Transport-Security"] = "max-age=31536000; includeSubDomains"
    if static:
        h.setdefault("Cache-Control", "public, max-age=3600")
    else:
        h["Cache-Control"] = "no-store"          # every page and image may hold PHI
        h["Pragma"] = "no-cache"


def is_console_path(path: str) -> bool:
    return path == "/" or path.startswith(CONSOLE_PREFIXES)


# ---- the app ---------------------------------------------------------------------------------------

def install(app: FastAPI, rt: Runtime, *, oidc_now: Callable[[], float] | None = None) -> Console:
    key = console_key(rt.settings.workdir)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["when"] = _fmt_time
    templates.env.filters["pct"] = _pct
    templates.env.filters["short"] = lambda v: v.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M") if v else ""
    templates.env.globals["OUTCOME_TEXT"] = {o.value: t for o, t in OUTCOME_TEXT.items()}
    c = Console(rt, templates, Accounts(rt.sessions, rt.settings.console, key),
                Sessions(rt.sessions, rt.settings.console, rt.audit))
    if rt.settings.console.oidc is not None:
        from dermgate.console.oidc import OidcClient
        kwargs: dict[str, Any] = {"now": oidc_now} if oidc_now else {}
        c.oidc = OidcClient(rt.settings.console.oidc, key, **kwargs)
    app.state.console = c
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="console-static")
    app.include_router(router)

    @app.middleware("http")
    async def _console_headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        if is_console_path(request.url.path):
            security_headers(response, tls=is_tls(request, rt), static=request.url.path.startswith("/static/"))
        return response

    @app.exception_handler(SignInRequired)
    async def _to_login(request: Request, exc: SignInRequired) -> Response:
        target = "/login?reason=idle" if exc.reason in ("idle", "expired") else "/login"
        response = see_other(target)
        if exc.reason in ("idle", "expired", "ended"):
            response.delete_cookie(cookie_name(request, rt), path="/")
        return response

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        return render(c, request, "error.html", 403, title="Not allowed",
                      message="Your role does not give access to this page, or the form expired. "
                              "Reload the page and try again.")

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> Response:
        return render(c, request, "error.html", 404, title="Not found", message="There is nothing at this address.")
    return c


router = APIRouter(include_in_schema=False)


# ---- sign-in -------------------------------------------------------------------------------------------

@router.get("/")
def home(request: Request) -> Response:
    c = _console(request)
    user, _ = c.sessions.resolve(request.cookies.get(cookie_name(request, c.rt)), touch=False)
    return see_other(LANDING.get(user.role, "/worklist") if user else "/login")


def _login_page(c: Console, request: Request, *, error: str | None = None, status_code: int = 200,
                username: str = "") -> Response:
    import secrets
    token = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(32)
    notice = None
    if request.query_params.get("reason") == "idle":
        minutes = max(1, c.settings.idle_timeout_s // 60)
        notice = f"You were signed out after {minutes} minute{'s' if minutes != 1 else ''} without activity."
    elif request.query_params.get("reason") == "signed-out":
        notice = "You are signed out."
    response = render(c, request, "login.html", status_code, login_csrf=token, error=error, notice=notice,
                      username=username, local=c.settings.local_accounts,
                      oidc_label=c.settings.oidc.button_label if c.oidc else None)
    response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=is_tls(request, c.rt),
                        path="/")
    return response


@router.get("/login")
def login_form(request: Request) -> Response:
    c = _console(request)
    # A page left open past the idle limit lands here (the page's timer): end that session now.
    user, _ = c.sessions.resolve(request.cookies.get(cookie_name(request, c.rt)), source=client_ip(request),
                                 touch=False)
    if user is not None and request.query_params.get("reason") != "idle":
        return see_other(LANDING.get(user.role, "/worklist"))
    response = _login_page(c, request)
    if user is None:
        response.delete_cookie(cookie_name(request, c.rt), path="/")
    return response


def _start_session(c: Console, request: Request, *, username: str, role: str, method: str,
                   display_name: str | None, practitioner: str | None) -> Response:
    token = c.sessions.create(username=username, role=role, auth_method=method, display_name=display_name,
                              practitioner_reference=practitioner)
    c.rt.audit.record(AuditEvent(event=EventType.LOGIN, outcome=Outcome.SUCCESS, actor=username, actor_role=role,
                                 action="E", source=client_ip(request), detail={"auth": method, "via": "console"}))
    response = see_other(LANDING.get(role, "/worklist"))
    response.set_cookie(cookie_name(request, c.rt), token, httponly=True, samesite="lax",
                        secure=is_tls(request, c.rt), path="/")
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
    return response


@router.post("/login")
def login(request: Request, username: Annotated[str, Form()] = "", password: Annotated[str, Form()] = "",
          otp: Annotated[str, Form()] = "", csrf_token: Annotated[str, Form()] = "") -> Response:
    import hmac
    c = _console(request)
    if not c.settings.local_accounts:
        raise NotFound()
    expected = request.cookies.get(LOGIN_CSRF_COOKIE) or ""
    if not expected or not hmac.compare_digest(expected, csrf_token):
        return _login_page(c, request, error="The sign-in form expired. Please try again.", status_code=400)
    username = username.strip()[:128]
    account, outcome = c.accounts.authenticate(username, password, otp or None)
    if outcome == "ok" and account is not None:
        return _start_session(c, request, username=account.username, role=account.role, method="local",
                              display_name=account.display_name, practitioner=account.practitioner_reference)
    serious = outcome in ("locked-now", "locked")
    reason = {"unknown": "unknown user", "disabled": "account disabled", "locked": "account locked",
              "bad-password": "wrong password", "otp-required": "one-time code missing",
              "bad-otp": "wrong one-time code",
              "locked-now": f"account locked after {c.settings.lockout_threshold} failed sign-ins"}[outcome]
    c.rt.audit.record(AuditEvent(event=EventType.AUTH_FAILURE,
                                 outcome=Outcome.SERIOUS_FAILURE if serious else Outcome.MINOR_FAILURE,
                                 actor=username or "unknown", actor_role=account.role if account else None,
                                 source=client_ip(request), detail={"reason": reason, "auth": "local",
                                                                    "via": "console"}))
    message = ("Enter the one-time code from your authenticator app." if outcome == "otp-required" else
               "Sign-in failed: the user name, password or one-time code is wrong, or the account is "
               "locked or disabled. Repeated failures lock the account for a while.")
    return _login_page(c, request, error=message, status_code=401, username=username)


@router.post("/logout")
def logout(request: Request, csrf_token: Annotated[str, Form()] = "") -> Response:
    c = _console(request)
    user, _ = c.sessions.resolve(request.cookies.get(cookie_name(request, c.rt)), touch=False)
    if user is not None:
        check_csrf(c, user, csrf_token)
        c.sessions.end(user, source=client_ip(request))
    response = see_other("/login?reason=signed-out")
    response.delete_cookie(cookie_name(request, c.rt), path="/")
    return response


@router.get("/auth/oidc/login")
def oidc_login(request: Request) -> Response:
    c = _console(request)
    if c.oidc is None:
        raise NotFound()
    redirect_uri = c.settings.oidc.redirect_uri or str(request.url_for("oidc_callback"))
    try:
        url, flow = c.oidc.start(redirect_uri)
    except Exception as exc:  # noqa: BLE001 - provider down: say so on the sign-in page
        c.rt.audit.record(AuditEvent(event=EventType.AUTH_FAILURE, outcome=Outcome.SERIOUS_FAILURE, actor="unknown",
                                     source=client_ip(request), detail={"reason": "identity provider unreachable",
                                                                        "error": type(exc).__name__, "auth": "oidc"}))
        return _login_page(c, request, error="The hospital sign-in service cannot be reached.", status_code=502)
    response = see_other(url)
    response.set_cookie(OIDC_FLOW_COOKIE, flow, httponly=True, samesite="lax", secure=is_tls(request, c.rt),
                        path="/auth/oidc/", max_age=600)
    return response


@router.get("/auth/oidc/callback", name="oidc_callback")
def oidc_callback(request: Request) -> Response:
    from dermgate.console.oidc import OidcError
    c = _console(request)
    if c.oidc is None:
        raise NotFound()
    try:
        who = c.oidc.finish(request.cookies.get(OIDC_FLOW_COOKIE), dict(request.query_params))
    except OidcError as exc:
        c.rt.audit.record(AuditEvent(event=EventType.AUTH_FAILURE, outcome=Outcome.MINOR_FAILURE, actor="unknown",
                                     source=client_ip(request), detail={"reason": exc.reason, "auth": "oidc",
                                                                        "via": "console"}))
        message = ("Your hospital account has no dermgate role. Ask the service desk for access."
                   if "no dermgate role" in exc.reason else "Sign-in through the hospital account failed.")
        response = _login_page(c, request, error=message, status_code=403 if "role" in exc.reason else 401)
        response.delete_cookie(OIDC_FLOW_COOKIE, path="/auth/oidc/")
        return response
    response = _start_session(c, request, username=who.username, role=who.role, method="oidc",
                              display_name=who.display_name, practitioner=who.practitioner_reference)
    response.delete_cookie(OIDC_FLOW_COOKIE, path="/auth/oidc/")
    return response


# ---- clinicians: worklist, case, review ---------------------------------------------------------------

def _filter_of(data: dict[str, Any]) -> WorklistFilter:
    f = data.get("worklist") or {}
    na = f.get("not_assessable")
    lc = f.get("low_confidence")
    return WorklistFilter(state=f.get("state") or None, risk=f.get("risk") or None,
                          received_from=_date(f.get("received_from")), received_to=_date(f.get("received_to")),
                          device=f.get("device") or None, not_assessable=None if na in (None, "") else na == "yes",
                          low_confidence=None if lc in (None, "") else lc == "yes",
                          patient_id=f.get("patient_id") or None, accession_number=f.get("accession_number") or None)


@router.get("/worklist")
def worklist_page(request: Request, user: ConsoleUser = signed_in(*CLINICAL), page: int = 1) -> Response:
    c = _console(request)
    f = _filter_of(user.data)
    result = worklist(c.rt.sessions, f, page=page, page_size=c.settings.page_size)
    patients = sorted({r.patient_id for r in result.rows})
    audit_view(c, user, request, "worklist", patient_id=f.patient_id,
               detail={"page": result.page, "rows": len(result.rows), "total": result.total,
                       "patients": patients, **f.describe()})
    return render(c, request, "worklist.html", page=result, f=user.data.get("worklist") or {},
                  states=STATES, risks=RISKS, devices=devices(c.rt.sessions), filtered=f != WorklistFilter())


@router.post("/worklist")
def worklist_filter(request: Request, user: ConsoleUser = signed_in(*CLINICAL),
                    csrf_token: Annotated[str, Form()] = "", action: Annotated[str, Form()] = "apply",
                    state: Annotated[str, Form()] = "", risk: Annotated[str, Form()] = "",
                    received_from: Annotated[str, Form()] = "", received_to: Annotated[str, Form()] = "",
                    device: Annotated[str, Form()] = "", not_assessable: Annotated[str, Form()] = "",
                    low_confidence: Annotated[str, Form()] = "", patient_id: Annotated[str, Form()] = "",
                    accession_number: Annotated[str, Form()] = "") -> Response:
    c = _console(request)
    check_csrf(c, user, csrf_token)
    values = {} if action == "clear" else {
        "state": state if state in STATES else "", "risk": risk if risk in RISKS else "",
        "received_from": received_from if _date(received_from) else "",
        "received_to": received_to if _date(received_to) else "", "device": device.strip()[:16],
        "not_assessable": not_assessable if not_assessable in ("yes", "no") else "",
        "low_confidence": low_confidence if low_confidence in ("yes", "no") else "",
        "patient_id": patient_id.strip()[:64], "accession_number": accession_number.strip()[:16]}
    c.sessions.save_data(user, "worklist", values)
    return see_other("/worklist")


def _patient_header(c: Console, path: str) -> dict[str, str]:
    """Name and birth date from the stored object's header (the second and third identifiers)."""
    import pydicom
    try:
        ds = pydicom.dcmread(c.rt.store.path(path), stop_before_pixels=True,
                             specific_tags=["PatientName", "PatientBirthDate", "PatientSex"])
    except Exception:  # noqa: BLE001 - the page still shows the patient id
        return {}
    name = str(ds.get("PatientName", "") or "").replace("^", ", ", 1).replace("^", " ")
    dob = str(ds.get("PatientBirthDate", "") or "")
    return {"name": name, "birth_date": f"{dob[:4]}-{dob[4:6]}-{dob[6:8]}" if len(dob) == 8 else "",
            "sex": str(ds.get("PatientSex", "") or "")}


def _next_awaiting(c: Console, job_id: int) -> int | None:
    nxt = worklist(c.rt.sessions, WorklistFilter(state="awaiting review"), page=1, page_size=2)
    return next((r.job_id for r in nxt.rows if r.job_id != job_id), None)


@router.get("/case/{job_id}")
def case_page(job_id: int, request: Request, user: ConsoleUser = signed_in(*CLINICAL)) -> Response:
    c = _console(request)
    found = case_of(c.rt.sessions, job_id)
    if found is None:
        raise NotFound()
    inst = found.instance
    audit_view(c, user, request, "case", patient_id=inst.patient_id, study_uid=inst.study_instance_uid,
               sop_uids=(inst.sop_instance_uid,), detail={"job": job_id, "other_images": len(found.others)})
    result = found.job.result or {}
    probs = sorted((result.get("probabilities") or {}).items(), key=lambda kv: kv[1], reverse=True)
    return render(c, request, "case.html", case=found, r=found.row, result=result, probabilities=probs,
                  malignant=MALIGNANT, classes=CLASSES, patient=_patient_header(c, inst.path),
                  outputs=found.job.outputs or {}, next_id=_next_awaiting(c, job_id),
                  model_card_url=c.settings.model_card_url or "/model-card",
                  can_review=user.role == "clinician" and found.row.state in ("awaiting review", "reviewed"))


def _image_response(data: bytes, media_type: str) -> Response:
    return Response(data, media_type=media_type, headers={"Cache-Control": "no-store"})


@router.get("/case/{job_id}/image")
def case_image(job_id: int, request: Request, user: ConsoleUser = signed_in(*CLINICAL)) -> Response:
    from dermgate.console.images import received_image
    c = _console(request)
    found = case_of(c.rt.sessions, job_id)
    if found is None:
        raise NotFound()
    inst = found.instance
    audit_view(c, user, request, "image", patient_id=inst.patient_id, study_uid=inst.study_instance_uid,
               sop_uids=(inst.sop_instance_uid,))
    data, media = received_image(c.rt.store, inst.path)
    return _image_response(data, media)


@router.get("/case/{job_id}/heatmap.png")
def case_heatmap(job_id: int, request: Request, user: ConsoleUser = signed_in(*CLINICAL),
                 legend: bool = False) -> Response:
    from dermgate.console.images import heatmap_overlay
    c = _console(request)
    found = case_of(c.rt.sessions, job_id)
    png_path = (found.job.outputs or {}).get("cam_png_path") if found else None
    if found is None or not png_path:
        raise NotFound()
    inst = found.instance
    audit_view(c, user, request, "heatmap", patient_id=inst.patient_id, study_uid=inst.study_instance_uid,
               sop_uids=(inst.sop_instance_uid,))
    png = c.rt.store.read(png_path)
    return _image_response(png if legend else heatmap_overlay(c.rt.store, inst.path, png), "image/png")


@router.post("/case/{job_id}/review")
def case_review(job_id: int, request: Request, user: ConsoleUser = signed_in("clinician"),
                csrf_token: Annotated[str, Form()] = "", decision: Annotated[str, Form()] = "",
                diagnosis: Annotated[str, Form()] = "", comment: Annotated[str, Form()] = "") -> Response:
    from dermgate.review import ReviewError, submit_review
    c = _console(request)
    check_csrf(c, user, csrf_token)
    found = case_of(c.rt.sessions, job_id)
    if found is None:
        raise NotFound()
    try:
        submit_review(c.rt, found.instance.sop_instance_uid, reviewer=user.label, decision=decision,
                      diagnosis=diagnosis or None if decision == "override" else None,
                      comment=comment.strip()[:2000] or None, source=client_ip(request),
                      reviewer_reference=user.practitioner_reference, role=user.role, channel="console",
                      actor=user.username)
    except ReviewError as exc:
        flash(c, user, f"Review not recorded: {exc}")
        return see_other(f"/case/{job_id}")
    flash(c, user, "Review recorded: AI result confirmed." if decision == "confirm" else
          f"Review recorded: overridden as {CLASS_NAMES.get(diagnosis, diagnosis)}.")
    return see_other(f"/case/{job_id}")


@router.get("/model-card")
def model_card(request: Request, user: ConsoleUser = signed_in()) -> Response:
    from inference.engine import default_model_dir
    c = _console(request)
    model = c.rt.settings.model.path
    folder = (model if model and model.is_dir() else model.parent if model else default_model_dir())
    card = folder / "MODEL_CARD.md"
    text = card.read_text(encoding="utf-8") if card.exists() else "No model card is installed with this model."
    return render(c, request, "model_card.html", card=text)


# ---- compliance: the audit trail ----------------------------------------------------------------------

def _trail(c: Console) -> Any:
    return getattr(c.rt.audit, "trail", c.rt.audit)


def _audit_query(values: dict[str, Any]) -> Any:
    from audit.search import AuditQuery

    def when(text: str | None, end: bool = False) -> datetime | None:
        d = _date(text)
        if d is None:
            return None
        t = datetime(d.year, d.month, d.day, tzinfo=timezone.utc)
        return t + timedelta(days=1) - timedelta(microseconds=1) if end else t
    events = tuple(e for e in EventType if e.value == values.get("event"))
    return AuditQuery(patient_id=values.get("patient") or None, actor=values.get("user") or None,
                      ae_title=values.get("ae_title") or None, event_types=events,
                      since=when(values.get("since")), until=when(values.get("until"), end=True))


AUDIT_FIELDS = ("patient", "user", "ae_title", "event", "since", "until")
AUDIT_PAGE = 100


@router.get("/audit")
def audit_page(request: Request, user: ConsoleUser = signed_in(*COMPLIANCE), page: int = 1,
               run: int = 0) -> Response:
    from audit.search import search
    c = _console(request)
    params = {k: request.query_params.get(k, "").strip()[:128] for k in AUDIT_FIELDS if request.query_params.get(k)}
    if params:      # a link from another system (``/audit?patient=ID``): keep it for paging and export
        c.sessions.save_data(user, "audit", params)
    values = params or (user.data.get("audit") or {} if run else {})
    records: list[Any] | None = None
    if values:
        records = search(_trail(c), _audit_query(values), requested_by=user.username, role=user.role,
                         purpose=user.purpose, source=client_ip(request))
        records.reverse()                                      # newest first
    total = len(records or [])
    pages = max(1, -(-total // AUDIT_PAGE))
    page = min(max(1, page), pages)
    shown = (records or [])[(page - 1) * AUDIT_PAGE: page * AUDIT_PAGE]
    return render(c, request, "audit.html", values=values, records=shown, total=total, page=page, pages=pages,
                  searched=records is not None, event_types=[e.value for e in EventType])


@router.post("/audit")
def audit_search(request: Request, user: ConsoleUser = signed_in(*COMPLIANCE),
                 csrf_token: Annotated[str, Form()] = "", patient: Annotated[str, Form()] = "",
                 user_name: Annotated[str, Form(alias="user")] = "", ae_title: Annotated[str, Form()] = "",
                 event: Annotated[str, Form()] = "", since: Annotated[str, Form()] = "",
                 until: Annotated[str, Form()] = "") -> Response:
    c = _console(request)
    check_csrf(c, user, csrf_token)
    values = {k: v.strip()[:128] for k, v in {"patient": patient, "user": user_name, "ae_title": ae_title,
                                              "event": event, "since": since, "until": until}.items() if v.strip()}
    c.sessions.save_data(user, "audit", values)
    return see_other("/audit?run=1")


@router.get("/audit/record/{seq}")
def audit_record(seq: int, request: Request, user: ConsoleUser = signed_in(*COMPLIANCE)) -> Response:
    c = _console(request)
    trail = _trail(c)
    record = next((r for r in trail.records() if r.seq == seq), None)
    event = record.event if record else None
    c.rt.audit.record(AuditEvent(event=EventType.AUDIT_QUERY, outcome=Outcome.SUCCESS if record else
                                 Outcome.MINOR_FAILURE, actor=user.username, actor_role=user.role,
                                 purpose=user.purpose, source=client_ip(request),
                                 patient_id=event.patient_id if event else None,
                                 detail={"record": seq, "via": "console"}))
    if record is None:
        raise NotFound()
    detail = json.dumps(event.detail, indent=2, sort_keys=True, default=str) if event else ""
    envelope = {k: v for k, v in record.envelope.items() if k not in ("ct", "nonce")}
    return render(c, request, "audit_record.html", record=record, event=event, detail=detail,
                  envelope=json.dumps(envelope, indent=2, sort_keys=True))


def _last_verification(c: Console) -> dict[str, Any] | None:
    """The newest ``verify`` of the trail recorded in the trail itself (the CLI's or the console's)."""
    last = None
    for r in _trail(c).events():
        e = r.event
        if e is not None and e.event is EventType.AUDIT_QUERY and e.detail.get("command") == "verify":
            last = {"time": r.event_time, "by": e.actor, "ok": e.detail.get("ok"), "records": e.detail.get("records"),
                    "first_bad_seq": e.detail.get("first_bad_seq"), "summary": e.detail.get("summary")}
    return last


@router.get("/audit/verify")
def audit_verify_page(request: Request, user: ConsoleUser = signed_in(*COMPLIANCE)) -> Response:
    c = _console(request)
    return render(c, request, "audit_verify.html", last=_last_verification(c))


@router.post("/audit/verify")
def audit_verify(request: Request, user: ConsoleUser = signed_in(*COMPLIANCE),
                 csrf_token: Annotated[str, Form()] = "") -> Response:
    c = _console(request)
    check_csrf(c, user, csrf_token)
    report = _trail(c).verify()
    detail: dict[str, Any] = {"command": "verify", "ok": report.ok, "records": report.records,
                              "summary": report.summary()[:300], "via": "console"}
    if report.first_bad is not None:
        detail["first_bad_seq"] = report.first_bad.seq
    try:
        c.rt.audit.record(AuditEvent(event=EventType.AUDIT_QUERY, actor=user.username, actor_role=user.role,
                                     purpose=user.purpose, source=client_ip(request), detail=detail,
                                     outcome=Outcome.SUCCESS if report.ok else Outcome.SERIOUS_FAILURE))
    except Exception:  # noqa: BLE001 - a damaged log may refuse the append; the verdict stands
        pass
    flash(c, user, report.summary())
    return see_other("/audit/verify")


@router.get("/audit/disclosures")
def disclosures_form(request: Request, user: ConsoleUser = signed_in(*COMPLIANCE)) -> Response:
    c = _console(request)
    return render(c, request, "disclosures.html", items=None, patient="", values={})


@router.post("/audit/disclosures")
def disclosures_report(request: Request, user: ConsoleUser = signed_in(*COMPLIANCE),
                       csrf_token: Annotated[str, Form()] = "", patient: Annotated[str, Form()] = "",
                       since: Annotated[str, Form()] = "", until: Annotated[str, Form()] = "",
                       include_failed: Annotated[str, Form()] = "", output: Annotated[str, Form()] = "html") -> Response:
    from audit.export import disclosures
    c = _console(request)
    check_csrf(c, user, csrf_token)
    patient = patient.strip()[:64]
    if not patient:
        return render(c, request, "disclosures.html", items=None, patient="", values={},
                      error="Enter the patient id.", status_code=400)
    q = _audit_query({"since": since, "until": until})
    items = disclosures(_trail(c), patient, requested_by=user.username, include_failed=include_failed == "yes",
                        since=q.since, until=q.until, role=user.role, purpose=user.purpose)
    generated = utcnow()
    if output == "pdf":
        from dermgate.console.pdf import disclosures_pdf
        pdf = disclosures_pdf(patient, items, generated=generated, by=user.label)
        return Response(pdf, media_type="application/pdf",
                        headers={"Content-Disposition": 'attachment; filename="disclosures.pdf"'})
    return render(c, request, "disclosures.html", items=items, patient=patient, generated=generated,
                  values={"since": since, "until": until, "include_failed": include_failed})


@router.post("/audit/export")
def audit_export(request: Request, user: ConsoleUser = signed_in(*COMPLIANCE),
                 csrf_token: Annotated[str, Form()] = "", fmt: Annotated[str, Form(alias="format")] = "csv") -> Response:
    from audit.export import ExportContext, ExportFormat, export
    c = _console(request)
    check_csrf(c, user, csrf_token)
    values = user.data.get("audit") or {}
    try:
        f = ExportFormat(fmt)
    except ValueError:
        raise Forbidden() from None
    trail = _trail(c)
    text = export(trail, f, _audit_query(values), requested_by=user.username, destination="console download",
                  role=user.role, purpose=user.purpose, ctx=ExportContext(log_id=trail.log_id))
    media, ext = {ExportFormat.FHIR: ("application/fhir+json", "json"), ExportFormat.DICOM: ("application/xml", "xml"),
                  ExportFormat.CSV: ("text/csv", "csv")}[f]
    return Response(text, media_type=media,
                    headers={"Content-Disposition": f'attachment; filename="audit-export.{ext}"'})


# ---- IT: queues, dead letters, readiness --------------------------------------------------------------

def _model_in_use(c: Console) -> dict[str, Any]:
    eng = c.rt.__dict__.get("classifier")
    if eng is not None:
        info = eng.model_info
        return {"name": info.name, "version": info.version, "sha256": info.sha256, "providers": eng.providers,
                "loaded": True}
    try:
        from inference.engine import MANIFEST_FILE, default_model_dir
        m = c.rt.settings.model.path
        folder = m if m and m.is_dir() else m.parent if m else default_model_dir()
        raw = json.loads((folder / MANIFEST_FILE).read_text())
        return {"name": raw.get("name"), "version": raw.get("version"), "sha256": raw.get("sha256"),
                "providers": [], "loaded": False}
    except Exception:  # noqa: BLE001
        return {"name": "unknown", "version": "", "sha256": "", "providers": [], "loaded": False}


@router.get("/ops")
def ops_page(request: Request, user: ConsoleUser = signed_in(*OPERATIONS)) -> Response:
    from sqlalchemy import select

    from audit.search import AuditQuery, search
    from dermgate.admin import outbox_counts
    from dermgate.db import Instance, Job, JobState, OutboxItem, OutboxState
    from dermgate.health import readiness
    from dermgate.pipeline import queue_depth
    c = _console(request)
    with c.rt.sessions() as s:
        dead = list(s.scalars(select(OutboxItem).where(OutboxItem.state == OutboxState.DEAD)
                              .order_by(OutboxItem.id).limit(200)))
        failed = [(j, i.calling_ae) for j, i in s.execute(
            select(Job, Instance).join(Instance, Instance.id == Job.instance_id)
            .where(Job.state == JobState.FAILED).order_by(Job.id).limit(200))]
    recent = search(_trail(c), AuditQuery(event_types=(EventType.ASSOCIATION,),
                                          since=utcnow() - timedelta(hours=24)),
                    requested_by=user.username, role=user.role, purpose=user.purpose, source=client_ip(request))
    associations = [r for r in reversed(recent)][:25]
    checks = readiness(c.rt, check_model="classifier" in c.rt.__dict__)
    return render(c, request, "ops.html", depth=queue_depth(c.rt.sessions), outbox=outbox_counts(c.rt.sessions),
                  dead=dead, failed=failed, associations=associations, checks=checks,
                  ready=all(v["ok"] for v in checks.values()), model=_model_in_use(c))


def _ids(values: list[str]) -> list[int] | None:
    ids = [int(v) for v in values if v.isdigit()]
    return ids or None


@router.post("/ops/outbox/{action}")
async def ops_outbox(action: str, request: Request, user: ConsoleUser = signed_in(*OPERATIONS)) -> Response:
    from starlette.concurrency import run_in_threadpool

    from dermgate.admin import purge_dead_letters, retry_dead_letters
    c = _console(request)
    form = await request.form()
    check_csrf(c, user, str(form.get("csrf_token", "")))
    ids = _ids([str(v) for v in form.getlist("id")])
    if action not in ("retry", "purge", "retry-jobs"):
        raise NotFound()
    if ids is None and form.get("all") != "yes":
        flash(c, user, "Nothing selected.")
        return see_other("/ops")
    if action == "retry-jobs":
        from dermgate.admin import retry_jobs
        n = await run_in_threadpool(retry_jobs, c.rt.sessions, c.rt.audit, ids, actor=user.username,
                                    role=user.role, source=client_ip(request))
        flash(c, user, f"{n} failed job(s) queued again.")
        return see_other("/ops")
    fn = retry_dead_letters if action == "retry" else purge_dead_letters
    n = await run_in_threadpool(fn, c.rt.sessions, c.rt.audit, ids, actor=user.username, role=user.role,
                                source=client_ip(request))
    flash(c, user, f"{n} dead letter(s) {'queued again' if action == 'retry' else 'purged'}.")
    return see_other("/ops")
