"""`grifo serve --workers 2`: two gateway processes share the port, the state, the points and
one consistent `/metrics`."""

from __future__ import annotations

import json
import re
import signal
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.fabric import CHAT, topology_yaml
from tests.support.processes import serve

REQUESTS = 101  # odd: the two workers cannot have served the same number


def _counts(port: int) -> tuple[float, float, float]:
    """Chat requests answered, audit records and attestations, as one scrape reports them."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()

    def total(series: str) -> float:
        return sum(float(m.group(1)) for m in re.finditer(rf"^{series} (\S+)$", text, re.M))

    return (
        total(r'grifo_requests_total\{endpoint="/v1/chat/completions".*\}'),
        total("grifo_audit_records_total"),
        total("grifo_attestations_total"),
    )


def test_two_workers_share_the_port_and_the_ledger(tmp_path: Path) -> None:
    config = tmp_path / "grifo.yaml"
    config.write_text(topology_yaml())
    proc, port = serve(config, tmp_path / "state", workers=2)
    try:
        key = json.loads((tmp_path / "state" / "demo-keys.json").read_text())["demo-global"]
        body = json.dumps({"model": CHAT, "messages": [{"role": "user", "content": "hi"}]})
        for _ in range(REQUESTS):  # a new connection each time: the kernel picks a worker
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                data=body.encode(),
                headers={"authorization": f"Bearer {key}", "connection": "close"},
            )
            with urllib.request.urlopen(request, timeout=10) as resp:
                assert resp.status == 200
        # Whichever worker the kernel hands a scrape to, it reports both workers' counts.
        seen = {_counts(port) for _ in range(20)}
        assert seen == {(REQUESTS, REQUESTS, REQUESTS)}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        if proc.stdout is not None:
            proc.stdout.close()
    from grifo.store.sqlite import StateDB

    db = StateDB(tmp_path / "state" / "grifo.db")
    tables = db.open_audit()
    try:
        assert len([e for e in db.ledger() if e.status == "ok"]) == REQUESTS
        # Each worker keeps its own audit log: both served some of the requests.
        served = [len(list(tables.records_from(log, 0))) for log in tables.logs()]
        assert len(served) == 2, f"one process served everything: {served}"
        assert min(served) > 0
        assert sum(served) == REQUESTS
    finally:
        tables.close()
        db.close()


def test_two_workers_share_a_strict_budget_through_the_state_database(tmp_path: Path) -> None:
    """Two processes reserve in the SQLite state database: together they never overspend."""
    import concurrent.futures

    from tests.support.fabric import check_ledger_invariants

    config = tmp_path / "grifo.yaml"
    budget = "allowed_jurisdictions: [PE], budget: {usd: 0.0001, period: day, mode: strict}"
    config.write_text(
        topology_yaml()
        .replace(
            "{name: demo-latam, allowed_jurisdictions: [PE, BR]}", f"{{name: demo-latam, {budget}}}"
        )
        .replace("health_interval_s: 0.2", "health_interval_s: 0.2, request_timeout_s: 1")
    )
    proc, port = serve(config, tmp_path / "state", workers=2)
    try:
        key = json.loads((tmp_path / "state" / "demo-keys.json").read_text())["demo-latam"]
        body = json.dumps(
            {"model": CHAT, "max_tokens": 4, "messages": [{"role": "user", "content": "spend"}]}
        ).encode()

        def one(_: int) -> int:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                data=body,
                headers={"authorization": f"Bearer {key}", "connection": "close"},
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as resp:
                    return resp.status
            except urllib.error.HTTPError as err:
                return err.code

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(one, range(120)))
        assert set(statuses) == {200, 429}, statuses
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        if proc.stdout is not None:
            proc.stdout.close()
    from grifo.store.sqlite import StateDB

    db = StateDB(tmp_path / "state" / "grifo.db")
    try:
        spent = sum(e.cost_micros for e in db.ledger() if e.tenant == "demo-latam")
    finally:
        db.close()
    assert 0 < spent <= 100  # micro-USD: 0.0001 USD
    check_ledger_invariants(tmp_path / "state")
