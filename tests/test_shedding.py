"""Load shedding through the gateway: a saturated point queues requests by priority, a full
queue sheds the lowest priority with 503 + retry-after, and nothing shed is billed."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.request
from pathlib import Path

from tests.support.fabric import CHAT, Fabric

TOPOLOGY = """
gateway:
  demo_keys: true
  admission: {initial_limit: 1, min_limit: 1, max_limit: 1, max_queue: 2, max_wait_ms: 5000}
points:
  - {name: lima-edge, site: lima, region: sa-west, jurisdiction: PE, tier: edge,
     engine: {kind: fake, embeddings: fake, token_delay_ms: 100}}
tenants:
  - {name: gold, priority: high}
  - {name: bulk, priority: low}
"""


def test_a_full_queue_sheds_low_priority_first_and_bills_nothing_shed(tmp_path: Path) -> None:
    fab = Fabric.from_yaml(TOPOLOGY, tmp_path)
    results: dict[str, tuple[int, dict[str, str], float]] = {}

    def ask(name: str, tenant: str, **headers: str) -> None:
        body = {"model": CHAT, "messages": [{"role": "user", "content": "one two three four"}]}
        conn = http.client.HTTPConnection("127.0.0.1", fab.running.port, timeout=30)
        headers |= {"authorization": f"Bearer {fab.keys[tenant]}"}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        response = conn.getresponse()
        response.read()
        results[name] = (response.status, dict(response.getheaders()), time.monotonic())
        conn.close()

    arrivals = [
        ("bulk-0", "bulk", {}),  # takes the point's only slot for ~0.4 s
        ("bulk-1", "bulk", {}),  # waits
        ("bulk-2", "bulk", {}),  # waits: the queue (2) is full
        ("bulk-3", "bulk", {"x-grifo-priority": "high"}),  # may not raise itself: shed
        ("gold-0", "gold", {}),  # high priority: takes bulk-2's place
    ]
    threads = []
    try:
        for name, tenant, headers in arrivals:
            threads.append(threading.Thread(target=ask, args=(name, tenant), kwargs=headers))
            threads[-1].start()
            time.sleep(0.06)
        for t in threads:
            t.join(30)
        status = {name: r[0] for name, r in results.items()}
        assert status == {"bulk-0": 200, "bulk-1": 200, "bulk-2": 503, "bulk-3": 503, "gold-0": 200}
        for shed in ("bulk-2", "bulk-3"):
            assert int(results[shed][1]["retry-after"]) >= 1
        assert results["gold-0"][2] < results["bulk-1"][2], "gold was not served first"
        ids = {name: r[1]["x-request-id"] for name, r in results.items()}
        served = {ids[n] for n, s in status.items() if s == 200}
        assert fab.ledger(*served).keys() == served
        ledger = {e.request_id for e in fab.running.db.ledger()}
        assert not {ids["bulk-2"], ids["bulk-3"]} & ledger
        with urllib.request.urlopen(f"{fab.url}/metrics", timeout=5) as scrape:
            metrics = scrape.read().decode()
        assert 'grifo_admission_shed_total{reason="queue_full"} 2.0' in metrics
    finally:
        fab.close()
