"""ops/alerts: the Prometheus alert rules are valid, read only exported metrics, carry a severity,
a summary, a description and a runbook hint, and each one fires in its promtool unit tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.metricnames import exported, referenced

pytestmark = pytest.mark.integration

ALERTS = Path(__file__).resolve().parents[2] / "ops" / "alerts"
RULES = ALERTS / "protege.rules.yaml"
TESTS = ALERTS / "protege.rules.test.yaml"
SEVERITIES = {"critical", "warning", "info"}


def _rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _alerts() -> list[dict]:
    return [rule for rule in _rules() if "alert" in rule]


def _promtool(*args: str) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make prometheus` "
                    "(or `sudo apt-get install prometheus`)")
    return subprocess.run([promtool, *args], check=False, capture_output=True, text=True,
                          timeout=300, cwd=ALERTS)


def test_promtool_check_rules():
    done = _promtool("check", "rules", RULES.name)
    assert done.returncode == 0, f"promtool check rules failed:\n{done.stdout}{done.stderr}"


def test_promtool_unit_tests_pass():
    done = _promtool("test", "rules", TESTS.name)
    assert done.returncode == 0, f"promtool test rules failed:\n{done.stdout}{done.stderr}"


def test_rules_read_only_exported_metrics():
    names = exported()
    unknown = {rule["alert"]: sorted(referenced(rule["expr"]) - names) for rule in _alerts()}
    unknown = {alert: names for alert, names in unknown.items() if names}
    assert not unknown, f"alert expressions read metrics protege does not export: {unknown}"
    assert all(referenced(rule["expr"]) for rule in _alerts())


def test_every_alert_has_severity_summary_description_and_runbook():
    alerts = _alerts()
    assert alerts
    names = [rule["alert"] for rule in alerts]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in alerts:
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity"
        notes = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert notes.get(key, "").strip(), f"{name}: no {key} annotation"


def test_every_alert_fires_in_some_promtool_test():
    suite = yaml.safe_load(TESTS.read_text())
    assert suite["rule_files"] == [RULES.name]
    annotations = {rule["alert"]: (rule["annotations"].get("summary", ""),
                                   rule["annotations"].get("description", ""))
                   for rule in _alerts()}
    fired: set[str] = set()
    checked: set[str] = set()
    for case in suite["tests"]:
        for check in case.get("alert_rule_test", []):
            checked.add(check["alertname"])
            for alert in check.get("exp_alerts") or []:
                fired.add(check["alertname"])
                assert alert.get("exp_annotations"), (
                    f"{check['alertname']}: check the annotations where it fires")
                if set(alert.get("exp_labels", {})) - {"severity"}:
                    text = " ".join(annotations.get(check["alertname"], ()))
                    assert "$labels" in text, (
                        f"{check['alertname']}: fires per label set, name it with $labels")
    names = {rule["alert"] for rule in _alerts()}
    assert names - fired == set(), f"alerts no promtool test sees firing: {sorted(names - fired)}"
    assert checked - names == set(), f"tests of alerts that do not exist: {sorted(checked - names)}"
    silent = {c["alertname"] for case in suite["tests"] for c in case.get("alert_rule_test", [])
              if not c.get("exp_alerts")}
    assert names - silent == set(), (
        f"alerts with no case where they must not fire: {sorted(names - silent)}")

