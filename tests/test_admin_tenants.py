"""Tenants managed over the admin API: made, served at their points, budgeted, seen only by
who may, and deleted (their keys stop working), against a real fabric; and the store."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from grifo.admission.ratelimit import RateLimits
from grifo.config.model import LimitsConfig
from grifo.errors import RateLimitedError
from grifo.security.keys import Principal, generate_key
from grifo.store.postgres import PostgresDB
from tests.support.fabric import CHAT, Fabric, topology_yaml
from tests.support.stores import POSTGRES_URL
from tests.test_admin import get

ROLES = {"root": "admin", "eu-admin": "tenant-admin"}
OWNERS = {"root": "demo-global", "eu-admin": "demo-eu"}
API_PE = {
    "allowed_jurisdictions": ["PE"],
    "budget": {"tokens": 100, "period": "month", "mode": "strict"},
    "weight": 3,
}


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fabric, dict[str, str]]]:
    secrets = {name: generate_key() for name in ROLES}
    env = {name: f"GRIFO_TEST_TENANTS_{name.upper().replace('-', '_')}" for name in ROLES}
    os.environ.update({env[name]: key for name, key in secrets.items()})
    keys = "\n".join(
        f"  - {{id: {name}, tenant: {OWNERS[name]}, role: {role}, env: {env[name]}}}"
        for name, role in ROLES.items()
    )
    # No budget and no limits in the config: those of API tenants must work all the same.
    fab = Fabric.from_yaml(f"{topology_yaml()}keys:\n{keys}\n", tmp_path_factory.mktemp("tn"))
    yield fab, secrets
    fab.close()


def _until(check: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    """Poll `check` until it returns something truthy (the key refresh is every 2 s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _chat(fab: Fabric, key: str) -> tuple[int, Any]:
    client = openai.OpenAI(base_url=f"{fab.url}/v1", api_key=key, max_retries=0)
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
        return raw.status_code, raw.headers
    except openai.APIStatusError as exc:
        return exc.status_code, exc.body
    finally:
        client.close()


def test_an_api_tenant_is_served_budgeted_and_deleted(
    fabric: tuple[Fabric, dict[str, str]],
) -> None:
    fab, keys = fabric
    status, before = _chat(fab, fab.keys["demo-latam"])
    assert status == 200
    before_policy = fab.audit_record(before["x-request-id"]).policy
    status, made = get(fab, "/admin/tenants/api-pe", keys["root"], "PUT", API_PE)
    assert status == 201, made
    assert (made["name"], made["source"], made["allowed_jurisdictions"]) == (
        "api-pe",
        "api",
        ["PE"],
    )
    status, _ = get(fab, "/admin/tenants/api-pe", keys["root"], "PUT", API_PE)
    assert status == 200  # replaced, not made again
    status, key = get(fab, "/admin/keys", keys["root"], "POST", {"tenant": "api-pe"})
    assert status == 201, key
    assert key["tenant"] == "api-pe"

    status, headers = _until(lambda: (r := _chat(fab, key["key"]))[0] != 401 and r)
    assert status == 200, headers
    assert headers["x-grifo-jurisdiction"] == "PE"
    assert headers["x-grifo-point"] == "lima-edge"
    # Its audit record names the policy it was decided under: the config and the API tenants.
    record = fab.audit_record(headers["x-request-id"])
    assert record.policy not in ("", before_policy)

    # The strict token budget: a request reserves ~82 tokens (prompt bound and max_tokens) and
    # spends a few (the fake engine's), so after a handful the next one no longer fits.
    answers = [_chat(fab, key["key"]) for _ in range(12)]
    statuses = [status for status, _ in answers]
    assert 429 in statuses, statuses
    refused = statuses.index(429)
    assert refused >= 2
    assert set(statuses[:refused]) == {200}
    assert answers[refused][1]["code"] == "insufficient_quota"

    status, listed = get(fab, "/admin/tenants", keys["root"])
    assert status == 200
    sources = {row["name"]: row["source"] for row in listed["data"]}
    assert sources == {
        "demo-eu": "config",
        "demo-latam": "config",
        "demo-global": "config",
        "api-pe": "api",
    }
    assert next(r for r in listed["data"] if r["name"] == "api-pe")["weight"] == 3

    status, gone = get(fab, "/admin/tenants/api-pe", keys["root"], "DELETE")
    assert (status, gone) == (200, {"name": "api-pe", "deleted": True})
    _until(lambda: _chat(fab, key["key"])[0] == 401)
    status, answer = get(fab, "/admin/tenants/api-pe", keys["root"], "DELETE")
    assert (status, answer["error"]["code"]) == (404, "not_found")
    status, listed = get(fab, "/admin/tenants", keys["root"])
    assert "api-pe" not in {row["name"] for row in listed["data"]}
    status, answer = get(fab, "/admin/keys", keys["root"], "POST", {"tenant": "api-pe"})
    assert status == 404, answer


def test_only_an_admin_changes_tenants_and_others_see_their_own(
    fabric: tuple[Fabric, dict[str, str]],
) -> None:
    fab, keys = fabric
    status, _ = get(fab, "/admin/tenants/api-other", keys["root"], "PUT", {"tier": "edge"})
    assert status == 201
    try:
        status, answer = get(fab, "/admin/tenants/api-x", keys["eu-admin"], "PUT", {})
        assert (status, answer["error"]["type"]) == (403, "permission_error")
        status, answer = get(fab, "/admin/tenants/api-other", keys["eu-admin"], "DELETE")
        assert status == 403
        status, listed = get(fab, "/admin/tenants", keys["eu-admin"])
        assert status == 200
        assert [row["name"] for row in listed["data"]] == ["demo-eu"]
        status, answer = get(fab, "/admin/tenants", fab.keys["demo-eu"])  # a user key
        assert status == 403
        status, answer = get(fab, "/admin/tenants", keys["root"], "POST", {})
        assert status == 405
        status, answer = get(fab, "/admin/tenants/api-other", keys["root"], "GET")
        assert status == 405
    finally:
        assert get(fab, "/admin/tenants/api-other", keys["root"], "DELETE")[0] == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"allowed_jurisdictions": ["XX"]}, "allowed_jurisdictions"),
        ({"wieght": 2}, "wieght"),
        ({"weight": 0}, "weight"),
        ({"budget": {"period": "month"}}, "budget"),
        ({"budget": {"usd": 1, "foo": 1}}, "budget.foo"),
        ({"data_classes": {"pii": ["PE"]}, "default_data_class": "x"}, "default_data_class"),
        ({"name": "other"}, "name"),
        ([1], None),
    ],
)
def test_a_bad_tenant_is_a_400_naming_the_field(
    fabric: tuple[Fabric, dict[str, str]], body: Any, param: str | None
) -> None:
    fab, keys = fabric
    status, answer = get(fab, "/admin/tenants/api-bad", keys["root"], "PUT", body)
    assert status == 400, answer
    assert answer["error"]["param"] == param
    status, listed = get(fab, "/admin/tenants", keys["root"])
    assert "api-bad" not in {row["name"] for row in listed["data"]}


def test_config_tenants_are_not_changed_over_the_api(
    fabric: tuple[Fabric, dict[str, str]],
) -> None:
    fab, keys = fabric
    for method, body in (("PUT", {"tier": "edge"}), ("DELETE", None)):
        status, answer = get(fab, "/admin/tenants/demo-eu", keys["root"], method, body)
        assert (status, answer["error"]["code"]) == (409, "tenant_in_config")
    assert _chat(fab, fab.keys["demo-eu"])[0] == 200  # still served, its keys untouched


def test_postgres_stores_tenants(pg_schema: str) -> None:
    a, b = PostgresDB(POSTGRES_URL, pg_schema), PostgresDB(POSTGRES_URL, pg_schema)
    try:
        assert a.stored_tenants() == []
        assert a.put_tenant("t2", '{"name":"t2"}') is True
        assert a.put_tenant("t1", '{"name":"t1"}') is True
        assert b.put_tenant("t1", '{"name":"t1","weight":2}') is False
        assert a.stored_tenants() == [("t1", '{"name":"t1","weight":2}'), ("t2", '{"name":"t2"}')]
        assert b.delete_tenant("t2") is True
        assert a.delete_tenant("t2") is False
        assert b.stored_tenants() == [("t1", '{"name":"t1","weight":2}')]
    finally:
        a.close()
        b.close()


def test_replaced_limits_keep_the_state_of_unchanged_tenants() -> None:
    limits = RateLimits({}, {}, clock=lambda: 0.0)
    caller = Principal("a", "k", None)
    assert not limits.applies(caller)
    limits.set_tenants({"a": LimitsConfig(requests_per_min=1)})
    limits.admit(caller, 1)
    limits.set_tenants({"a": LimitsConfig(requests_per_min=1)})  # the refresh, unchanged
    with pytest.raises(RateLimitedError):
        limits.admit(caller, 1)
    limits.set_tenants({"a": LimitsConfig(requests_per_min=2)})  # changed: a new allowance
    limits.admit(caller, 1)
    limits.set_tenants({})
    assert not limits.applies(caller)


def test_the_cli_sets_and_deletes_tenants_through_the_api(
    fabric: tuple[Fabric, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    from grifo.cli import main

    fab, keys = fabric
    admin = ["--url", fab.url, "--key", keys["root"]]
    body = '{"allowed_jurisdictions": ["PE"], "priority": "low"}'
    assert main(["tenants", "set", "cli-pe", "--body", body, *admin]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "api"
    status, listed = get(fab, "/admin/tenants", keys["root"])
    assert status == 200
    assert "cli-pe" in {row["name"] for row in listed["data"]}
    assert main(["tenants", "set", "cli-pe", "--body", "[1", *admin]) == 2
    assert main(["tenants", "set", "demo-eu", "--body", "{}", *admin]) == 1  # a config tenant
    assert "409" in capsys.readouterr().err
    assert main(["tenants", "delete", "cli-pe", "--url", fab.url, "--key", ""]) == 2
    assert main(["tenants", "delete", "cli-pe", *admin]) == 0
    status, listed = get(fab, "/admin/tenants", keys["root"])
    assert status == 200
    assert "cli-pe" not in {row["name"] for row in listed["data"]}
