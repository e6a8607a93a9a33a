"""Data classes: a tenant's jurisdictions per kind of data, chosen per request, audited."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import openai
import pytest

from grifo.config.load import ConfigError, parse_config
from grifo.placement.explain import explain
from tests.support.fabric import CHAT, Fabric, topology_yaml

CLASSES = (
    "{name: demo-eu, allowed_jurisdictions: [EU], default_data_class: personal, "
    "data_classes: {personal: [EU], health: [DE], public: null}}"
)


def config_text() -> str:
    return topology_yaml().replace("{name: demo-eu, allowed_jurisdictions: [EU]}", CLASSES)


@pytest.fixture(scope="module")
def classes_fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    fab = Fabric.from_yaml(config_text(), tmp_path_factory.mktemp("classes"))
    yield fab
    fab.close()


def ask(fab: Fabric, headers: dict[str, str]) -> tuple[str, str]:
    raw = fab.client("demo-eu").chat.completions.with_raw_response.create(
        model=CHAT, messages=[{"role": "user", "content": "where?"}], extra_headers=headers
    )
    return raw.headers["x-grifo-jurisdiction"], raw.headers["x-request-id"]


@pytest.mark.parametrize(
    ("headers", "where", "data_class"),
    [
        ({}, "DE", "personal"),
        ({"x-grifo-data-class": "health"}, "DE", "health"),
        ({"x-grifo-data-class": "public"}, "PE", "public"),  # anywhere: the cheapest, nearest
        ({"x-grifo-data-class": "public", "x-grifo-allowed-jurisdictions": "US"}, "US", "public"),
    ],
)
def test_the_data_class_decides_where_a_request_may_run(
    classes_fabric: Fabric, headers: dict[str, str], where: str, data_class: str
) -> None:
    jurisdiction, request_id = ask(classes_fabric, headers)
    assert jurisdiction == where
    record = audit_record(classes_fabric, request_id)
    assert (record["data_class"], record["jurisdiction"]) == (data_class, where)


def audit_record(fab: Fabric, request_id: str) -> dict[str, object]:
    """The request's audit record, once the writer has committed it."""
    deadline = time.monotonic() + 5
    while True:
        tables = fab.running.db.open_audit()
        try:
            rows = [r for log in tables.logs() for r in tables.records_from(log, 0)]
        finally:
            tables.close()
        found = [json.loads(r.record) for r in rows if r.request_id == request_id]
        if found or time.monotonic() > deadline:
            assert found, f"no audit record for {request_id}"
            record: dict[str, object] = found[0]
            return record
        time.sleep(0.02)


def test_an_unknown_class_is_refused_not_widened(classes_fabric: Fabric) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        ask(classes_fabric, {"x-grifo-data-class": "helth"})
    assert "helth" in str(refused.value)
    assert refused.value.param == "x-grifo-data-class"
    with pytest.raises(openai.PermissionDeniedError):
        ask(classes_fabric, {"x-grifo-data-class": "health", "x-grifo-allowed-jurisdictions": "FR"})


def test_policy_explain_names_the_rule_and_the_points() -> None:
    config = parse_config(config_text(), "test")
    lines = explain(config, "demo-eu", "health")
    assert lines[1] == "allowed: DE"
    assert "data_classes.health" in lines[2]
    assert any(line.strip().startswith("yes frankfurt-regional") for line in lines)
    assert any(line.strip().startswith("no  lima-edge") for line in lines)
    assert "default_data_class" in explain(config, "demo-eu")[2]
    with pytest.raises(ConfigError, match="no data class"):
        explain(config, "demo-eu", "secret")


@pytest.mark.parametrize(
    ("tenant", "problem"),
    [
        ("{name: t, data_classes: {a: [XX]}}", "$.tenants[3].data_classes.a"),
        ("{name: t, default_data_class: b, data_classes: {a: [PE]}}", "default_data_class"),
    ],
)
def test_data_class_config_errors_name_the_field(tenant: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem.replace("[", r"\[").replace("$", r"\$")):
        parse_config(topology_yaml() + f"  - {tenant}\n", "test")
