"""Idempotency keys through the gateway: replay, 409 while running, 422 for another body."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator

import openai
import pytest

from tests.support.fabric import CHAT, Fabric, topology_yaml

ASK = [{"role": "user", "content": "charge me once"}]


def test_same_key_same_body_replays_without_a_second_charge(fabric: Fabric) -> None:
    client = fabric.client("demo-global")
    key = {"idempotency-key": "order-1001"}
    first = client.chat.completions.with_raw_response.create(
        model=CHAT, messages=ASK, extra_headers=key
    )
    second = client.chat.completions.with_raw_response.create(
        model=CHAT, messages=ASK, extra_headers=key
    )
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert second.headers["x-request-id"] == first.headers["x-request-id"]
    assert second.headers["x-grifo-point"] == first.headers["x-grifo-point"]
    assert second.headers["x-grifo-cost-micros"] == first.headers["x-grifo-cost-micros"]
    assert second.parse().model_dump() == first.parse().model_dump()
    rid = first.headers["x-request-id"]
    fabric.ledger(rid)
    assert [e.request_id for e in fabric.running.db.ledger()].count(rid) == 1
    other_tenant = fabric.client("demo-latam").chat.completions.with_raw_response.create(
        model=CHAT, messages=ASK, extra_headers=key
    )
    assert "idempotent-replayed" not in other_tenant.headers  # keys are per tenant


def test_same_key_other_body_is_422(fabric: Fabric) -> None:
    client = fabric.client("demo-eu")
    key = {"idempotency-key": "order-2002"}
    client.chat.completions.create(model=CHAT, messages=ASK, extra_headers=key)
    with pytest.raises(openai.UnprocessableEntityError) as failure:
        client.chat.completions.create(
            model=CHAT,
            messages=[{"role": "user", "content": "something else"}],
            extra_headers=key,
        )
    assert failure.value.code == "idempotency_key_reused"


def test_streams_replay_their_events(fabric: Fabric) -> None:
    client = fabric.client("demo-global")
    key = {"idempotency-key": "stream-3003"}

    def run() -> tuple[str, str]:
        with client.chat.completions.with_streaming_response.create(
            model=CHAT,
            messages=ASK,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=key,
        ) as response:
            text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
            return text, response.headers["x-request-id"]

    first, second = run(), run()
    assert first == second
    assert first[0] == "charge me once"


def test_failed_requests_release_the_key(fabric: Fabric) -> None:
    client = fabric.client("demo-eu")
    key = {"idempotency-key": "order-4004"}
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(
            model=CHAT, messages=ASK, extra_headers={**key, "x-grifo-tier": "edge"}
        )  # 503: no EU edge point; nothing was answered, so the key stays free
    ok = client.chat.completions.with_raw_response.create(
        model=CHAT, messages=ASK, extra_headers=key
    )
    assert "idempotent-replayed" not in ok.headers


def _claimed(fab: Fabric, key: str) -> bool:
    with sqlite3.connect(fab.running.db.path) as conn:
        row = conn.execute("SELECT 1 FROM idempotency WHERE key = ?", (key,)).fetchone()
    conn.close()
    return row is not None


@pytest.fixture(scope="module")
def slow_fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    engine = "{kind: fake, embeddings: fake, token_delay_ms: 100}"
    fab = Fabric.from_yaml(topology_yaml(engine), tmp_path_factory.mktemp("slow-idem"))
    yield fab
    fab.close()


def test_same_key_while_running_is_409(slow_fabric: Fabric) -> None:
    client = slow_fabric.client("demo-global")
    key = {"idempotency-key": "order-5005"}
    words = [{"role": "user", "content": "one two three four five six seven eight"}]
    done = threading.Event()

    def first() -> None:
        client.chat.completions.create(model=CHAT, messages=words, extra_headers=key)
        done.set()

    thread = threading.Thread(target=first)
    thread.start()
    deadline = time.monotonic() + 10
    while not _claimed(slow_fabric, "order-5005") and time.monotonic() < deadline:
        time.sleep(0.01)  # wait until the first request holds the key (it then runs ~0.8 s)
    with pytest.raises(openai.ConflictError) as conflict:
        client.chat.completions.create(model=CHAT, messages=words, extra_headers=key)
    assert conflict.value.code == "idempotency_in_progress"
    thread.join(10)
    assert done.is_set()
    replay = client.chat.completions.with_raw_response.create(
        model=CHAT, messages=words, extra_headers=key
    )
    assert replay.headers["idempotent-replayed"] == "true"
