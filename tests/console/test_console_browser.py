"""The console in a real browser: Debian's chromium driven by selenium (chromium-driver).

One dermgate (SCP, worker, dispatcher, API + console) on loopback, fed the bundled samples by a
DICOM association like the demo's, delivering to the loopback FHIR server, with the loopback
OpenID provider as the hospital's identity provider. In the browser: sign-in with a local
account and through the provider, the worklist, a case page with both images loaded and the
heatmap controls, a review by keyboard that reaches the FHIR server as a ``final`` report, the
compliance officer's audit search that shows the clinician's view, the IT page, and the idle
logoff. axe-core runs on every page: no serious or critical violation. Screenshots are saved
under ``runs/console-screenshots`` (or ``$DERMGATE_SCREENSHOTS``) at a tablet's 1024 x 768.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from audit.api import EventType
from dermgate.app import Runtime
from dermgate.db import Instance, Job, JobState
from dermgate.demo import DEMO_SCOPE_AE, SAMPLES, load_samples, send
from dermgate.service import Service
from dermgate.settings import (AllowedCaller, ApiSettings, ConsoleSettings, DicomSettings, ModelSettings,
                               OidcSettings, Settings, WorkerSettings)
from integration.fhir.settings import FhirSettings
from tests.console.conftest import PASSWORD, accounts
from tests.dermgate.test_service_e2e import model_dir
from tests.integration.fhir.data import PATIENT_SYSTEM, patient_resource
from tests.integration.fhir.peer import free_port
from tests.peers.oidc import AXE_JS, PASSWORD as IDP_PASSWORD, ROLE_MAP, require_node_packages

ROOT = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("DERMGATE_SCREENSHOTS", ROOT / "runs" / "console-screenshots"))
N_IMAGES = 3
# The first test also starts the site (model, SCP, processing); shared CI machines can be slow.
pytestmark = pytest.mark.timeout(1800)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1024,768")


def _require_browser() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium and chromium-driver are needed (apt-get install chromium chromium-driver)")
        pytest.skip("chromium / chromedriver not installed")
    return browser, driver


@dataclass
class Site:
    base: str
    rt: Runtime
    fhir: Any
    state: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, fhir_server: Any, oidc_provider: Any) -> Iterator[Site]:
    _require_browser()
    require_node_packages()
    fhir_server.reset()
    work = tmp_path_factory.mktemp("console-site")
    port = free_port()
    client_id, secret = oidc_provider.register(f"http://127.0.0.1:{port}/auth/oidc/callback")
    (work / "oidc-secret").write_text(secret)
    samples = load_samples(SAMPLES)[:N_IMAGES]
    for _, ds, _ in samples:
        fhir_server.create(patient_resource(str(ds.PatientID)))
    settings = Settings(
        workdir=work / "work",
        dicom=DicomSettings(port=free_port(), allowed_callers=[AllowedCaller(ae_title=DEMO_SCOPE_AE)],
                            min_free_bytes=16 * 1024 * 1024),
        model=ModelSettings(path=model_dir(), threads=2), worker=WorkerSettings(poll_interval_s=0.05),
        api=ApiSettings(host="127.0.0.1", port=port),
        fhir=FhirSettings.model_validate({"base_url": fhir_server.base_url,
                                          "patient_identifier_systems": {"DEMO-HOSPITAL": PATIENT_SYSTEM}}),
        console=ConsoleSettings(oidc=OidcSettings(issuer=oidc_provider.issuer, client_id=client_id,
                                                  client_secret_file=work / "oidc-secret", role_map=ROLE_MAP,
                                                  practitioner_claim="fhir_practitioner")))
    rt = Runtime(settings)
    acc = accounts(rt)
    acc.add("dr.browser", "clinician", PASSWORD, display_name="Dr. Bea Browser",
            practitioner_reference="Practitioner/prac-browser")
    acc.add("pat.privacy", "compliance", PASSWORD, display_name="Pat Privacy")
    acc.add("it.ops", "operator", PASSWORD, display_name="Ivy Ops")
    service = Service(rt, roles={"scp", "worker", "dispatcher", "api"})
    service.start()
    try:
        send([ds for _, ds, _ in samples], settings.dicom.port, settings.dicom.ae_title)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            with rt.sessions() as s:
                states = [j.state for j in s.scalars(__import__("sqlalchemy").select(Job))]
            if len(states) == N_IMAGES and all(st in (JobState.DELIVERED, JobState.FAILED) for st in states):
                break
            time.sleep(0.2)
        assert states == [JobState.DELIVERED] * N_IMAGES, states
        yield Site(f"http://127.0.0.1:{port}", rt, fhir_server)
    finally:
        service.stop(timeout=10)
        rt.close()


@pytest.fixture(scope="module")
def driver(site: Site) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    browser, chromedriver = _require_browser()
    profile = tempfile.mkdtemp(prefix="dermgate-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    drv = webdriver.Chrome(options=options, service=DriverService(executable_path=chromedriver))
    drv.set_script_timeout(180)
    drv.set_page_load_timeout(180)
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


# ---- helpers -----------------------------------------------------------------------------------------

def axe(drv: Any, page: str) -> None:
    """axe-core on the current page: no serious or critical WCAG 2.1 A/AA violation."""
    drv.execute_script(AXE_JS.read_text(encoding="utf-8"))
    violations = drv.execute_async_script("""
        const done = arguments[arguments.length - 1];
        axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']}})
           .then(r => done(r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                                                   nodes: v.nodes.slice(0, 3).map(n => n.target.join(' '))}))))
           .catch(e => done([{id: 'axe-error', impact: 'critical', help: String(e), nodes: []}]));
    """)
    bad = [v for v in violations if v["impact"] in ("serious", "critical")]
    assert not bad, f"accessibility violations on {page}: {bad}"


def shot(drv: Any, name: str) -> None:
    """The whole page at the tablet's width (the window grows to the page's height, then back)."""
    height = int(drv.execute_script("return document.documentElement.scrollHeight"))
    drv.set_window_size(1024, min(max(768, height + 90), 3000))
    try:
        drv.save_screenshot(str(SHOTS / f"{name}.png"))
    finally:
        drv.set_window_size(1024, 768)


def wait(drv: Any, condition: Any, timeout: float = 60.0) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(drv, timeout).until(condition)


def sign_in(drv: Any, site: Site, username: str) -> None:
    from selenium.webdriver.common.by import By
    drv.delete_all_cookies()
    drv.get(site.base + "/login")
    drv.find_element(By.NAME, "username").send_keys(username)
    drv.find_element(By.NAME, "password").send_keys(PASSWORD)
    drv.find_element(By.CSS_SELECTOR, "form[action='/login'] button[type=submit]").click()
    wait(drv, lambda d: "/login" not in d.current_url)


def sign_out(drv: Any) -> None:
    from selenium.webdriver.common.by import By
    drv.find_element(By.CSS_SELECTOR, "form.signout button").click()
    wait(drv, lambda d: "/login" in d.current_url)


def images_loaded(drv: Any, *ids: str) -> bool:
    return bool(drv.execute_script(
        "return arguments[0].every(id => { const i = document.getElementById(id);"
        " return i && i.complete && i.naturalWidth > 0; });", list(ids)))


# ---- the tests ------------------------------------------------------------------------------------------

def test_clinician_reviews_a_case_by_keyboard_and_the_ehr_report_becomes_final(site: Site, driver: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    drv = driver
    drv.get(site.base + "/login")
    axe(drv, "login")
    shot(drv, "login")
    sign_in(drv, site, "dr.browser")
    assert drv.current_url.endswith("/worklist")
    links = drv.find_elements(By.CSS_SELECTOR, "a.case-link")
    assert len(links) == N_IMAGES
    axe(drv, "worklist")
    shot(drv, "worklist")

    # j / Enter from the worklist opens the first (most urgent) case
    drv.find_element(By.TAG_NAME, "body").send_keys("j")
    first = links[0].get_attribute("href")
    drv.switch_to.active_element.send_keys(Keys.ENTER)
    wait(drv, lambda d: d.current_url == first)
    wait(drv, lambda d: images_loaded(d, "received-image", "heatmap-overlay"))
    axe(drv, "case")
    shot(drv, "case")
    overlay = drv.find_element(By.ID, "heatmap-overlay")
    drv.find_element(By.ID, "heatmap-toggle").click()
    assert not overlay.is_displayed()
    drv.find_element(By.TAG_NAME, "body").send_keys("h")
    assert overlay.is_displayed()
    slider = drv.find_element(By.ID, "heatmap-opacity")
    slider.send_keys(Keys.HOME)
    assert float(overlay.value_of_css_property("opacity")) == 0.0
    for _ in range(4):
        slider.send_keys(Keys.PAGE_UP)
    assert 0.0 < float(overlay.value_of_css_property("opacity")) <= 1.0
    assert drv.find_element(By.ID, "opacity-value").text.endswith("%")
    patient_id = drv.find_element(By.ID, "patient-id").text.split()[0]
    site.state["patient"] = patient_id

    drv.find_element(By.ID, "comment").send_keys("Agree with the AI result.")
    drv.find_element(By.TAG_NAME, "body").send_keys("c")               # confirm, by keyboard
    wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, "#reviews .decision"))
    assert drv.find_element(By.CSS_SELECTOR, "#reviews .decision").text == "Confirmed"
    assert "Dr. Bea Browser" in drv.find_element(By.ID, "reviews").text
    shot(drv, "case-reviewed")

    deadline = time.monotonic() + 600
    status = None
    while time.monotonic() < deadline:
        (pat,) = site.fhir.search("Patient", identifier=f"{PATIENT_SYSTEM}|{patient_id}")
        reports = site.fhir.search("DiagnosticReport", subject=f"Patient/{pat['id']}")
        status = reports[0]["status"] if reports else None
        if status == "final":
            break
        time.sleep(0.5)
    assert status == "final"
    report = reports[0]
    assert "Practitioner/prac-browser" in str(report) or "Dr. Bea Browser" in str(report)
    drv.refresh()
    assert any("sent" == e.text for e in drv.find_elements(By.CSS_SELECTOR, ".delivery"))
    sign_out(drv)


def test_clinician_signs_in_through_the_hospital_identity_provider(site: Site, driver: Any) -> None:
    from selenium.webdriver.common.by import By
    drv = driver
    drv.delete_all_cookies()
    drv.get(site.base + "/login")
    drv.find_element(By.CSS_SELECTOR, "a[href='/auth/oidc/login']").click()
    wait(drv, lambda d: "/interaction/" in d.current_url)
    shot(drv, "identity-provider")
    drv.find_element(By.NAME, "login").send_keys("dr.oidc")
    drv.find_element(By.NAME, "password").send_keys(IDP_PASSWORD)
    drv.find_element(By.ID, "idp-submit").click()
    wait(drv, lambda d: d.current_url == site.base + "/worklist")
    assert "Dr. Olivia Idp" in drv.find_element(By.CSS_SELECTOR, ".who").text
    assert len(drv.find_elements(By.CSS_SELECTOR, "a.case-link")) == N_IMAGES
    sign_out(drv)
    logins = [r.event for r in site.rt.audit.events() if r.event.event is EventType.LOGIN]
    assert any(e.actor == "dr.oidc" and e.detail["auth"] == "oidc" for e in logins)


def test_compliance_officer_finds_the_clinicians_view_in_the_audit_trail(site: Site, driver: Any) -> None:
    from selenium.webdriver.common.by import By
    drv = driver
    patient = site.state.get("patient")
    if patient is None:
        with site.rt.sessions() as s:
            patient = s.scalars(__import__("sqlalchemy").select(Instance.patient_id)).first()
    sign_in(drv, site, "pat.privacy")
    assert drv.current_url.endswith("/audit")
    axe(drv, "audit (empty)")
    drv.find_element(By.ID, "a-patient").send_keys(patient)
    drv.find_element(By.CSS_SELECTOR, "form[action='/audit'] button[type=submit]").click()
    wait(drv, lambda d: d.find_elements(By.ID, "audit-results"))
    assert patient not in drv.current_url                           # the search stays out of the URL
    rows = drv.find_elements(By.CSS_SELECTOR, "#audit-results tbody tr")
    texts = [r.text for r in rows]
    assert any("dr.browser" in t and "api.access" in t and "case" in t for t in texts), texts
    assert any("clinician.review" in t and "dr.browser" in t for t in texts)
    axe(drv, "audit results")
    shot(drv, "audit")
    # the demo contract's address works too
    drv.get(f"{site.base}/audit?patient={patient}")
    assert any("dr.browser" in r.text for r in drv.find_elements(By.CSS_SELECTOR, "#audit-results tbody tr"))
    drv.find_element(By.CSS_SELECTOR, "#audit-results tbody tr a").click()
    wait(drv, lambda d: "/audit/record/" in d.current_url)
    axe(drv, "audit record")
    drv.get(site.base + "/audit/verify")
    drv.find_element(By.CSS_SELECTOR, "form[action='/audit/verify'] button").click()
    wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, "#verify-status .ok"))
    axe(drv, "verification")
    shot(drv, "audit-verify")
    drv.get(site.base + "/audit/disclosures")
    drv.find_element(By.ID, "d-patient").send_keys(patient)
    drv.find_element(By.CSS_SELECTOR, "button[value=html]").click()
    wait(drv, lambda d: d.find_elements(By.ID, "disclosures"))
    assert "fhir.delivery" in drv.find_element(By.ID, "disclosures").text
    axe(drv, "disclosures")
    shot(drv, "disclosures")
    sign_out(drv)


def test_operator_sees_queues_readiness_and_the_model(site: Site, driver: Any) -> None:
    from selenium.webdriver.common.by import By
    drv = driver
    sign_in(drv, site, "it.ops")
    assert drv.current_url.endswith("/ops")
    assert "delivered" in drv.find_element(By.ID, "queue-depth").text
    assert "database" in drv.find_element(By.ID, "readiness").text
    assert "DEMO-SCOPE" in drv.find_element(By.ID, "associations").text
    axe(drv, "operations")
    shot(drv, "operations")
    drv.get(site.base + "/model-card")
    axe(drv, "model card")
    sign_out(drv)


def test_idle_session_is_logged_off_automatically(site: Site, driver: Any) -> None:
    from selenium.webdriver.common.by import By
    drv = driver
    console = site.rt.settings.console
    saved = console.idle_timeout_s
    console.idle_timeout_s = 6
    try:
        sign_in(drv, site, "it.ops")
        wait(drv, lambda d: "/login?reason=idle" in d.current_url, timeout=90)
        assert "without activity" in drv.find_element(By.CSS_SELECTOR, ".notice").text
        axe(drv, "login after idle logoff")
        shot(drv, "idle-logoff")
        drv.get(site.base + "/ops")
        assert "/login" in drv.current_url                      # the session is gone on the server too
    finally:
        console.idle_timeout_s = saved
    logouts = [r.event for r in site.rt.audit.events() if r.event.event is EventType.LOGOUT]
    assert any(e.actor == "it.ops" and e.detail["reason"] == "idle timeout" for e in logouts)
