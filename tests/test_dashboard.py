"""The dashboard in a real browser (Debian's chromium, headless, through chromedriver): it
loads, shows the fabric, and its numbers move when traffic flows. Its data API is tested too."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from grifo.security.keys import generate_key
from tests.support.fabric import CHAT, Fabric, topology_yaml

SCREENSHOTS = Path(os.environ.get("GRIFO_TEST_OUTPUT", "test-output"))
KEYS = {"root": ("demo-global", "admin"), "eu-audit": ("demo-eu", "auditor")}


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fabric, dict[str, str]]]:
    secrets = {name: generate_key() for name in KEYS}
    for name, secret in secrets.items():
        os.environ[f"GRIFO_UI_{name.upper().replace('-', '_')}"] = secret
    keys = "\n".join(
        f"  - {{id: {name}, tenant: {tenant}, role: {role}, "
        f"env: GRIFO_UI_{name.upper().replace('-', '_')}}}"
        for name, (tenant, role) in KEYS.items()
    )
    text = topology_yaml().replace(
        "{name: demo-eu, allowed_jurisdictions: [EU]}",
        "{name: demo-eu, allowed_jurisdictions: [EU], budget: {usd: 5.0, period: month}}",
    )
    fab = Fabric.from_yaml(f"{text}keys:\n{keys}\n", tmp_path_factory.mktemp("dashboard"))
    yield fab, secrets
    fab.close()


def _get(fab: Fabric, path: str, key: str | None = None) -> tuple[int, Any]:
    headers = {} if key is None else {"authorization": f"Bearer {key}"}
    request = urllib.request.Request(f"{fab.url}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            body = resp.read()
            kind = resp.headers.get("content-type", "")
            return resp.status, json.loads(body) if "json" in kind else body.decode()
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _traffic(fab: Fabric, tenant: str, n: int) -> None:
    client = fab.client(tenant)
    for i in range(n):
        client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": f"dashboard {i}"}]
        )


def test_the_page_needs_no_key_but_its_data_does(board: tuple[Fabric, dict[str, str]]) -> None:
    fab, _ = board
    status, page = _get(fab, "/ui")
    assert status == 200
    assert '<script src="/ui/app.js">' in page
    assert "http://" not in page  # nothing from a CDN
    assert "https://" not in page
    assert _get(fab, "/admin/dashboard")[0] == 401
    assert _get(fab, "/admin/dashboard", fab.keys["demo-eu"])[0] == 403  # a user key


def test_each_role_sees_its_own_tenants_in_the_data(board: tuple[Fabric, dict[str, str]]) -> None:
    fab, keys = board
    _traffic(fab, "demo-eu", 2)
    _traffic(fab, "demo-global", 2)
    status, admin = _get(fab, "/admin/dashboard", keys["root"])
    assert status == 200
    assert {p["name"] for p in admin["points"]} == {p.name for p in fab.running.gateway.points}
    assert {d["tenant"] for d in admin["placements"]} >= {"demo-eu", "demo-global"}
    assert {r["tenant"] for r in admin["audit"]} >= {"demo-eu", "demo-global"}
    status, auditor = _get(fab, "/admin/dashboard", keys["eu-audit"])
    assert status == 200
    assert {d["tenant"] for d in auditor["placements"]} == {"demo-eu"}
    assert {r["tenant"] for r in auditor["audit"]} == {"demo-eu"}
    assert [b["tenant"] for b in auditor["budgets"]] == ["demo-eu"]
    first = auditor["placements"][0]
    assert first["reason"].startswith(("best score", "the only compliant"))
    assert first["point"] in {p["name"] for p in auditor["points"]}


def test_the_dashboard_shows_live_numbers_in_a_real_browser(
    board: tuple[Fabric, dict[str, str]],
) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    fab, keys = board
    driver_path = shutil.which("chromedriver")
    assert driver_path, "the UI test needs Debian's chromium and chromium-driver (apt-get install)"
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(f"{fab.url}/ui#key={keys['root']}")
        wait = WebDriverWait(driver, 20)
        wait.until(lambda d: d.find_element(By.ID, "status").text == "live")
        assert "key=" not in driver.current_url  # the key left the address bar

        def served(d: Any) -> int:
            cell = d.find_element(By.CSS_SELECTOR, 'tr[data-point="lima-edge"] td.served')
            return int(cell.text)

        before = served(driver)
        _traffic(fab, "demo-global", 5)  # demo-global prefers lima-edge
        wait.until(lambda d: served(d) >= before + 5)
        rates = [
            e.text
            for e in driver.find_elements(By.CSS_SELECTOR, 'tr[data-point="lima-edge"] .rate')
        ]
        assert rates
        assert driver.find_elements(By.CSS_SELECTOR, ".node.up")
        assert driver.find_elements(By.CSS_SELECTOR, "#placements tbody tr")
        assert driver.find_elements(By.CSS_SELECTOR, "#audit tbody tr")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shot = SCREENSHOTS / "dashboard.png"
        assert driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()
