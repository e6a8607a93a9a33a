"""Run a whole fabric (gateway in a background event loop, points as real processes) for tests."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import openai
from prometheus_client.parser import text_string_to_metric_families

from grifo.audit.record import AuditRecord, decode
from grifo.config.load import parse_config
from grifo.config.model import GrifoConfig
from grifo.serve import Running, start
from grifo.store.records import LedgerEntry
from grifo.store.sqlite import StateDB

T = TypeVar("T")

CHAT = "fake-chat"
EMBED = "fake-embed"


def topology_yaml(engine: str = "{kind: fake, embeddings: fake}", extra_points: str = "") -> str:
    """The demo's three sites and tenants, with the given engine at every point."""
    return f"""
gateway: {{demo_keys: true, health_interval_s: 0.2}}
points:
  - {{name: lima-edge, site: lima, region: sa-west, jurisdiction: PE, tier: edge, rtt_ms: 4,
     engine: {engine},
     prices: {{usd_per_hour: 0.04, default: {{input_usd_per_1m: 0.02, output_usd_per_1m: 0.04}}}}}}
  - {{name: frankfurt-regional, site: frankfurt, region: eu-central, jurisdiction: DE,
     tier: regional, rtt_ms: 110, engine: {engine},
     prices: {{usd_per_hour: 0.40, default: {{input_usd_per_1m: 0.05, output_usd_per_1m: 0.10}}}}}}
  - {{name: virginia-central, site: virginia, region: us-east, jurisdiction: US, tier: central,
     rtt_ms: 70, engine: {engine},
     prices: {{usd_per_hour: 2.50, default: {{input_usd_per_1m: 0.10, output_usd_per_1m: 0.20}}}}}}
{extra_points}
tenants:
  - {{name: demo-eu, allowed_jurisdictions: [EU]}}
  - {{name: demo-latam, allowed_jurisdictions: [PE, BR]}}
  - {{name: demo-global}}
"""


class Fabric:
    """A started gateway plus its local points; use `client(tenant)` for an OpenAI SDK client."""

    def __init__(self, config: GrifoConfig, state_dir: Path) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.state_dir = state_dir
        self._clients: list[openai.OpenAI] = []
        self.running: Running = self.call(start(config, state_dir, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.running.port}"
        self.keys: dict[str, str] = json.loads((state_dir / "demo-keys.json").read_text())

    @classmethod
    def from_yaml(cls, text: str, state_dir: Path) -> Fabric:
        return cls(parse_config(text, "test topology"), state_dir)

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def client(self, tenant: str, **kwargs: Any) -> openai.OpenAI:
        client = openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self.keys[tenant], max_retries=0, **kwargs
        )
        self._clients.append(client)
        return client

    def point_url(self, name: str) -> str:
        for lp in self.running.local_points:
            if lp.config.name == name:
                return lp.url
        raise KeyError(name)

    def completed(self, name: str) -> int:
        """Requests a point has processed, from the point's own load endpoint."""
        with urllib.request.urlopen(f"{self.point_url(name)}/load", timeout=5) as resp:
            return int(json.loads(resp.read())["completed"])

    def metrics(self) -> dict[str, float]:
        """The gateway's `/metrics` as `{'name{label="value",...}': value}`, labels sorted."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def quiet(self, timeout_s: float = 15.0) -> None:
        """Wait until no point is running or queueing a request, as this gateway last saw it
        (work left by an earlier test of the module weighs on placement scores)."""
        deadline = time.monotonic() + timeout_s
        while any(p.running or p.queued for p in self.running.gateway.points):
            assert time.monotonic() < deadline, "the points stayed busy"
            time.sleep(0.05)

    def stop_point(self, name: str) -> None:
        from grifo.supervisor import stop_process

        for lp in self.running.local_points:
            if lp.config.name == name:
                self.call(stop_process(lp.process))
                return
        raise KeyError(name)

    def ledger(self, *request_ids: str, timeout_s: float = 5.0) -> dict[str, LedgerEntry]:
        """Ledger rows of these requests, once all are written (the writer batches)."""
        deadline = time.monotonic() + timeout_s
        while True:
            rows = {e.request_id: e for e in self.running.db.ledger()}
            if all(r in rows for r in request_ids) or time.monotonic() > deadline:
                return {r: rows[r] for r in request_ids if r in rows}
            time.sleep(0.02)

    def audit_record(self, request_id: str, timeout_s: float = 5.0) -> AuditRecord:
        """A request's audit record, once the writer has stored it."""
        return self.audit_records(request_id, 1, timeout_s)[0]

    def audit_records(
        self, request_id: str, count: int, timeout_s: float = 5.0
    ) -> list[AuditRecord]:
        """The first `count` audit records of a request (an agent run has one per step and
        one for the run), in log order, once the writer has stored them."""
        deadline = time.monotonic() + timeout_s
        while True:
            found: list[AuditRecord] = []
            tables = self.running.db.open_audit()
            try:
                for log in tables.logs():
                    for row in tables.records_from(log, 0):
                        if row.request_id == request_id:
                            found.append(decode(row.record))
            finally:
                tables.close()
            if len(found) >= count:
                return found[:count]
            assert time.monotonic() < deadline, f"{len(found)} audit records of {request_id}"
            time.sleep(0.02)

    def close(self) -> None:
        for client in self._clients:
            client.close()
        try:
            self.call(self.running.stop(grace_s=2.0))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()
        check_ledger_invariants(self.state_dir)


async def post_chat(port: int, key: str, body: dict[str, Any]) -> bytes:
    """A chat completion on a connection of its own (`connection: close`), written by hand:
    the raw response, head and (chunked) body as they came."""
    data = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n"
            b"authorization: Bearer " + key.encode() + b"\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(data)).encode() + b"\r\n\r\n" + data
        )
        return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


def check_ledger_invariants(state_dir: Path) -> None:
    """After every run on a SQLite state: no reservation left open, every budget's spending
    equal to its ledger entries, no request billed twice (the ledger's key) or left unaudited."""
    path = state_dir / "grifo.db"
    if not path.exists():
        return
    db = StateDB(path)
    try:
        conn = db._conn
        open_reservations = conn.execute(
            "SELECT scope, reserved_micros, reserved_tokens FROM budget_usage "
            "WHERE reserved_micros != 0 OR reserved_tokens != 0"
        ).fetchall()
        assert open_reservations == [], f"reservations left open: {open_reservations}"
        for scope, since, spent in conn.execute(
            "SELECT scope, period_start_ms, spent_micros FROM budget_usage"
        ).fetchall():
            kind, name = scope.split(":", 1)
            column = "tenant" if kind == "tenant" else "key_id"
            (ledger,) = conn.execute(
                f"SELECT COALESCE(SUM(cost_micros), 0) FROM ledger WHERE {column} = ? "
                "AND ts_ms >= ?",
                (name, since),
            ).fetchone()
            assert spent == ledger, f"{scope} spent {spent}, its ledger entries say {ledger}"
        billed = {r[0] for r in conn.execute("SELECT request_id FROM ledger").fetchall()}
        audited = {r[0] for r in conn.execute("SELECT request_id FROM audit_records").fetchall()}
        if audited:  # the audit log is on: every billed request has its record
            assert billed <= audited, f"billed but not audited: {sorted(billed - audited)[:5]}"
    finally:
        db.close()
