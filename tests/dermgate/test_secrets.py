"""Issue 12: `dermgate config` printed the database password, and the configuration-change audit
event stored it. Credentials are now cut out everywhere settings are shown or recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy.engine import make_url

from audit.api import EventType
from audit.phi import REDACTED, redact_secrets
from dermgate.app import Runtime
from dermgate.service import Service
from dermgate.settings import Settings

PASSWORD = "S3cr3t-Pw-4711"


def test_dermgate_config_prints_no_database_password(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DERMGATE_")}
    env["DERMGATE_DATABASE_URL"] = f"postgresql+psycopg2://dermgate:{PASSWORD}@db.example:5432/dermgate"
    run = subprocess.run([sys.executable, "-m", "dermgate.cli", "config", "--workdir", str(tmp_path)], env=env,
                         text=True, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    assert PASSWORD not in run.stdout
    assert shown["database_url"] == f"postgresql+psycopg2://dermgate:{REDACTED}@db.example:5432/dermgate"


def test_the_configuration_change_audit_event_and_the_logs_hold_no_password(tmp_path: Path,
                                                                            postgres_database: str) -> None:
    from dermgate import logs
    url = make_url(postgres_database).set(password=PASSWORD).render_as_string(hide_password=False)
    settings = Settings(workdir=tmp_path / "work", database_url=url)
    logs.configure("DEBUG", settings.log_dir / "dermgate.log")
    rt = Runtime(settings)
    service = Service(rt, roles=set())
    service.start()
    service.stop()
    [change] = [r.event for r in rt.audit.events() if r.event.event is EventType.CONFIG_CHANGE]
    rt.close()
    recorded = json.dumps(change.detail)
    assert PASSWORD not in recorded and REDACTED in change.detail["settings"]["database_url"]
    assert PASSWORD not in (settings.log_dir / "dermgate.log").read_text()


def test_secret_looking_fields_are_blanked_and_paths_kept() -> None:
    shown = redact_secrets({"fhir": {"client_secret": "abc", "private_key_file": "/etc/k.pem", "api_token": "t"},
                            "url": "https://u:pw@ehr.example/fhir", "dsn": "host=db password=pw2 user=u"})
    assert shown["fhir"] == {"client_secret": REDACTED, "private_key_file": "/etc/k.pem", "api_token": REDACTED}
    assert shown["url"] == f"https://u:{REDACTED}@ehr.example/fhir" and "pw2" not in shown["dsn"]
