"""Prometheus alert rules (deploy/prometheus, deploy/k8s/prometheusrule.yaml), checked offline with promtool."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dermgate import metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "dermgate-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "dermgate-rules.test.yml"
OPERATOR = ROOT / "deploy" / "k8s" / "prometheusrule.yaml"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing: apt-get install prometheus (scripts/test.sh does)")
        pytest.skip("promtool is missing: apt-get install prometheus")
    return found


def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    tool = promtool()
    check = subprocess.run([tool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run([tool, "test", "rules", RULE_TESTS.name], capture_output=True, text=True, timeout=60,
                         cwd=RULE_TESTS.parent)
    assert run.returncode == 0, run.stdout + run.stderr


def test_operator_rule_holds_the_same_groups_and_passes_promtool(tmp_path: Path) -> None:
    (doc,) = [d for d in yaml.safe_load_all(OPERATOR.read_text()) if d]
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    extracted = tmp_path / "operator-rules.yml"
    extracted.write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
    check = subprocess.run([promtool(), "check", "rules", str(extracted)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_metric_the_rules_use_is_exported() -> None:
    import re
    exported = {m._name for m in vars(metrics).values() if hasattr(m, "_name")}  # noqa: SLF001
    used = set(re.findall(r"\b(dermgate_[a-z0-9_]+)", RULES.read_text()))
    assert used and used <= exported, used - exported
