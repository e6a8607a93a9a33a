"""`/admin/...` with roles: admins see every tenant, tenant admins and auditors their own only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from grifo.security.keys import generate_key
from tests.support.fabric import CHAT, Fabric, topology_yaml

ROLES = {"root": "admin", "eu-admin": "tenant-admin", "eu-audit": "auditor"}
OWNERS = {"root": "demo-global", "eu-admin": "demo-eu", "eu-audit": "demo-eu"}


@pytest.fixture(scope="module")
def admin_fabric(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Fabric, dict[str, str]]]:
    secrets = {name: generate_key() for name in ROLES}
    os.environ.update(
        {f"GRIFO_TEST_{name.upper().replace('-', '_')}": k for name, k in secrets.items()}
    )
    keys = "\n".join(
        f"  - {{id: {name}, tenant: {OWNERS[name]}, role: {role}, "
        f"env: GRIFO_TEST_{name.upper().replace('-', '_')}}}"
        for name, role in ROLES.items()
    )
    text = topology_yaml().replace(
        "{name: demo-eu, allowed_jurisdictions: [EU]}",
        "{name: demo-eu, allowed_jurisdictions: [EU], budget: {usd: 5.0, period: month}}",
    )
    fab = Fabric.from_yaml(f"{text}keys:\n{keys}\n", tmp_path_factory.mktemp("admin"))
    served = []
    for tenant, n in (("demo-eu", 3), ("demo-global", 2)):
        client = fab.client(tenant)
        for _ in range(n):
            raw = client.chat.completions.with_raw_response.create(
                model=CHAT, messages=[{"role": "user", "content": "count me"}]
            )
            served.append(raw.headers["x-request-id"])
    fab.ledger(*served)  # written
    yield fab, secrets
    fab.close()


def get(fab: Fabric, path: str, key: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{fab.url}{path}", data=data, headers={"authorization": f"Bearer {key}"}, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_an_admin_sees_every_tenant(admin_fabric: tuple[Fabric, dict[str, str]]) -> None:
    fab, keys = admin_fabric
    status, body = get(fab, "/admin/usage?by=tenant&period=all", keys["root"])
    assert status == 200
    counts = {row["tenant"]: row["requests"] for row in body["data"]}
    assert counts == {"demo-eu": 3, "demo-global": 2}
    status, body = get(fab, "/admin/usage?by=point&tenant=demo-global", keys["root"])
    assert status == 200
    assert sum(row["requests"] for row in body["data"]) == 2
    assert all(row["cost_micros"] > 0 for row in body["data"])


@pytest.mark.parametrize("who", ["eu-admin", "eu-audit"])
def test_a_tenant_role_sees_its_own_tenant_only(
    admin_fabric: tuple[Fabric, dict[str, str]], who: str
) -> None:
    fab, keys = admin_fabric
    status, body = get(fab, "/admin/usage?period=all", keys[who])
    assert (status, [row["tenant"] for row in body["data"]]) == (200, ["demo-eu"])
    status, body = get(fab, "/admin/usage?tenant=demo-global", keys[who])
    assert (status, body["error"]["code"]) == (404, "not_found"), "another tenant does not exist"
    status, body = get(fab, "/admin/keys", keys[who])
    assert status == 200
    assert body["data"]
    assert {k["tenant"] for k in body["data"]} == {"demo-eu"}
    status, body = get(fab, "/admin/budgets", keys[who])
    assert status == 200
    [burn] = body["data"]
    assert (burn["tenant"], burn["limit_micros"]) == ("demo-eu", 5_000_000)
    assert burn["spent_micros"] > 0


def test_roles_keep_to_their_side(admin_fabric: tuple[Fabric, dict[str, str]]) -> None:
    fab, keys = admin_fabric
    status, body = get(fab, "/admin/usage", fab.keys["demo-eu"])
    assert (status, body["error"]["code"]) == (403, "permission_denied")
    auditor = openai.OpenAI(base_url=f"{fab.url}/v1", api_key=keys["eu-audit"], max_retries=0)
    with pytest.raises(openai.PermissionDeniedError, match="admin API"):
        auditor.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "may I?"}]
        )
    auditor.close()
    status, body = get(fab, "/admin/keys", "grf-00000000-not-a-key")
    assert status == 401


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/admin/usage?by=nope", "by"),
        ("/admin/usage?period=year", "period"),
        ("/admin/usage?tenant=a&tenant=b", None),
        ("/admin/keys?secret=1", "secret"),
    ],
)
def test_bad_queries_are_named(
    admin_fabric: tuple[Fabric, dict[str, str]], path: str, param: str | None
) -> None:
    fab, keys = admin_fabric
    status, body = get(fab, path, keys["root"])
    assert (status, body["error"]["param"]) == (400, param)


def test_reads_are_read_only(admin_fabric: tuple[Fabric, dict[str, str]]) -> None:
    fab, keys = admin_fabric
    for path in ("/admin/usage", "/admin/points", "/admin/budgets"):
        status, _ = get(fab, path, keys["root"], method="POST", body={})
        assert status == 405, path
    status, _ = get(fab, "/admin/keys/some-key", keys["root"])  # GET of a key: not a route
    assert status == 405


def _works(fab: Fabric, key: str, expected: int, timeout_s: float = 10) -> bool:
    """Whether inference with `key` answers `expected` within the key refresh's seconds."""
    deadline = time.monotonic() + timeout_s
    client = openai.OpenAI(base_url=f"{fab.url}/v1", api_key=key, max_retries=0)
    try:
        while time.monotonic() < deadline:
            try:
                client.chat.completions.create(
                    model=CHAT, messages=[{"role": "user", "content": "new key"}]
                )
                status = 200
            except openai.APIStatusError as exc:
                status = exc.status_code
            if status == expected:
                return True
            time.sleep(0.2)
        return False
    finally:
        client.close()


def test_keys_are_made_and_revoked_over_the_api_within_each_roles_standing(
    admin_fabric: tuple[Fabric, dict[str, str]],
) -> None:
    fab, keys = admin_fabric
    status, made = get(fab, "/admin/keys", keys["eu-admin"], "POST", {"models": [CHAT]})
    assert status == 201, made
    assert (made["tenant"], made["role"], made["models"]) == ("demo-eu", "user", [CHAT])
    assert made["key"].startswith("grf-")
    assert _works(fab, made["key"], 200), "a new key works on every process within seconds"
    status, listed = get(fab, "/admin/keys", keys["eu-admin"])
    assert made["id"] in {k["id"] for k in listed["data"]}
    assert made["key"] not in json.dumps(listed)  # shown once, never again
    refusals = [
        ("eu-admin", {"tenant": "demo-global"}, 404),  # another tenant does not exist for it
        ("eu-admin", {"role": "admin"}, 403),  # no role above its own
        ("eu-admin", {"role": "tenant-admin"}, 403),
        ("eu-audit", {}, 403),  # auditors read only
        ("root", {"tenant": "nobody"}, 404),
        ("root", {"role": "superuser"}, 400),
        ("root", {"scopes": ["*"]}, 400),  # no unknown fields, no wildcards
    ]
    for who, body, expected in refusals:
        status, answer = get(fab, "/admin/keys", keys[who], "POST", body)
        assert status == expected, (who, body, answer)
    status, other = get(fab, "/admin/keys", keys["root"], "POST", {"tenant": "demo-global"})
    assert status == 201
    assert get(fab, f"/admin/keys/{other['id']}", keys["eu-admin"], "DELETE")[0] == 404
    status, gone = get(fab, f"/admin/keys/{made['id']}", keys["eu-admin"], "DELETE")
    assert (status, gone) == (200, {"id": made["id"], "revoked": True})
    assert _works(fab, made["key"], 401), "a revoked key stops working within seconds"
    assert get(fab, f"/admin/keys/{made['id']}", keys["eu-admin"], "DELETE")[0] == 404


@pytest.mark.parametrize("who", ["root", "eu-audit"])
def test_every_admin_role_sees_the_points_and_their_state(
    admin_fabric: tuple[Fabric, dict[str, str]], who: str
) -> None:
    fab, keys = admin_fabric
    status, body = get(fab, "/admin/points", keys[who])
    assert status == 200
    points = {p["name"]: p for p in body["data"]}
    assert set(points) == {p.name for p in fab.running.gateway.points}
    for point in points.values():
        assert point["state"] == "up"
        assert point["ejected_for_s"] == 0
        assert point["concurrency_limit"] >= 1
    status, body = get(fab, "/admin/points", fab.keys["demo-eu"])
    assert status == 403


def test_grifo_points_and_tenants_from_the_command_line(
    admin_fabric: tuple[Fabric, dict[str, str]], tmp_path: Path
) -> None:
    fab, keys = admin_fabric
    run = [sys.executable, "-m", "grifo"]
    env = {**os.environ, "GRIFO_ADMIN_KEY": keys["root"]}
    out = subprocess.run(
        [*run, "points", "--url", fab.url, "--json"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert {p["name"] for p in json.loads(out.stdout)["data"]} == {
        p.name for p in fab.running.gateway.points
    }
    table = subprocess.run([*run, "points", "--url", fab.url], env=env, capture_output=True)
    assert b"lima-edge" in table.stdout
    env["GRIFO_ADMIN_KEY"] = fab.keys["demo-eu"]  # a user key
    refused = subprocess.run([*run, "points", "--url", fab.url], env=env, capture_output=True)
    assert refused.returncode == 1
    assert b"403" in refused.stderr
    config = tmp_path / "grifo.yaml"
    config.write_text(topology_yaml())
    rows = subprocess.run(
        [*run, "tenants", "--config", str(config), "--json"], capture_output=True, text=True
    )
    tenants = {json.loads(line)["tenant"]: json.loads(line) for line in rows.stdout.splitlines()}
    assert tenants["demo-latam"]["jurisdictions"] == "BR,PE"
    assert tenants["demo-global"]["jurisdictions"] == "any"
