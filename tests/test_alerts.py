"""deploy/prometheus/grifo-rules.yaml: Prometheus's own promtool checks the rules and runs their
unit tests, and every metric the rules read is one a running gateway exposes."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from grifo.telemetry.peers import merge
from tests.support.fabric import CHAT, Fabric

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "grifo-rules.yaml"
RULE_TESTS = ROOT / "tests" / "data" / "grifo-rules-test.yaml"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "the alert rules' tests need promtool, from Debian's prometheus (.ci/run)"
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)


def _alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_accepts_the_rules() -> None:
    checked = _promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in checked.stdout


def test_every_alert_fires_and_stays_quiet_as_its_unit_tests_say() -> None:
    tested = _promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    cases: dict[str, list[bool]] = {}
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in test["alert_rule_test"]:
            cases.setdefault(case["alertname"], []).append(bool(case["exp_alerts"]))
    for rule in _alerts():
        assert set(cases.get(rule["alert"], [])) == {True, False}, (
            f"{rule['alert']} needs a case where it fires and one where it does not"
        )


def test_every_alert_says_how_bad_and_what_happened() -> None:
    for rule in _alerts():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]


def test_the_rules_read_only_metrics_a_gateway_exposes(fabric: Fabric) -> None:
    """The names in the expressions, against a real gateway's /metrics as a scrape of
    `serve --workers` merges it (which adds grifo_scrape_workers)."""
    client = fabric.client("demo-global")
    client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}])
    with urllib.request.urlopen(f"{fabric.url}/metrics", timeout=10) as resp:
        exposition = merge([resp.read().decode()], workers=1, missing=0).decode()
    exposed: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_count", "_sum"),
        }.get(family.type, ("",))
        exposed.update(family.name + suffix for suffix in suffixes)
    read = {
        name
        for rule in _alerts()
        for name in re.findall(r"\b(?:grifo|gen_ai)_[a-z_]+\b", rule["expr"])
    }
    assert len(read) >= 10
    assert read - exposed == set()
