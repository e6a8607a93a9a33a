"""Rate limits: requests and tokens per minute and requests at once, per tenant and per key."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest

from grifo.admission.ratelimit import RateLimits
from grifo.config.model import LimitsConfig
from grifo.errors import RateLimitedError
from grifo.security.keys import Principal
from tests.support.clock import Clock
from tests.support.fabric import CHAT, Fabric, topology_yaml

ACME = Principal("acme", "k1", None)


def test_requests_per_minute_refill_continuously() -> None:
    clock = Clock()
    limits = RateLimits({"acme": LimitsConfig(requests_per_min=3)}, {}, clock)
    for _ in range(3):
        limits.admit(ACME, 0)
    with pytest.raises(RateLimitedError) as refused:
        limits.admit(ACME, 0)
    assert refused.value.retry_after_s == pytest.approx(20.0)
    clock.now += 19.9
    with pytest.raises(RateLimitedError):
        limits.admit(ACME, 0)
    clock.now += 0.2
    limits.admit(ACME, 0)


def test_tokens_are_reserved_up_front_and_corrected_at_the_end() -> None:
    clock = Clock()
    limits = RateLimits({"acme": LimitsConfig(tokens_per_min=100)}, {}, clock)
    first = limits.admit(ACME, 60)
    with pytest.raises(RateLimitedError) as refused:
        limits.admit(ACME, 60)
    assert refused.value.retry_after_s == pytest.approx(12.0)  # 20 missing at 100/60 per second
    limits.done(first, 10)  # used 10 of the 60 reserved: 50 come back
    second = limits.admit(ACME, 60)
    limits.done(second, 90)  # used more than reserved: the bucket owes the difference
    clock.now += 30
    with pytest.raises(RateLimitedError):
        limits.admit(ACME, 60)
    with pytest.raises(RateLimitedError, match="lower max_tokens"):
        limits.admit(ACME, 101)


def test_concurrency_is_held_until_the_request_ends() -> None:
    limits = RateLimits({}, {"k1": LimitsConfig(concurrent=2)}, Clock())
    a, _ = limits.admit(ACME, 0), limits.admit(ACME, 0)
    with pytest.raises(RateLimitedError, match="requests running"):
        limits.admit(ACME, 0)
    limits.done(a, 0)
    limits.done(a, 0)  # twice is once
    limits.admit(ACME, 0)
    with pytest.raises(RateLimitedError):
        limits.admit(ACME, 0)


def test_a_refusal_by_one_scope_takes_nothing_from_the_other() -> None:
    clock = Clock()
    limits = RateLimits(
        {"acme": LimitsConfig(requests_per_min=10)}, {"k1": LimitsConfig(requests_per_min=1)}, clock
    )
    limits.admit(ACME, 0)
    for _ in range(5):
        with pytest.raises(RateLimitedError, match="key k1"):
            limits.admit(ACME, 0)
    other_key = Principal("acme", "k2", None)
    for _ in range(9):
        limits.admit(other_key, 0)  # the tenant's 10 minus the one k1 used
    with pytest.raises(RateLimitedError, match="tenant acme"):
        limits.admit(other_key, 0)


def test_the_gateway_answers_429_with_retry_after(tmp_path: Path) -> None:
    text = topology_yaml().replace(
        "{name: demo-global}", "{name: demo-global, limits: {requests_per_min: 2}}"
    )
    fab = Fabric.from_yaml(text, tmp_path)
    try:
        port = int(fab.url.rsplit(":", 1)[1])
        body = json.dumps({"model": CHAT, "messages": [{"role": "user", "content": "hi"}]})
        statuses = []
        for _ in range(3):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request(
                "POST",
                "/v1/chat/completions",
                body,
                {"authorization": f"Bearer {fab.keys['demo-global']}"},
            )
            response = conn.getresponse()
            payload = json.loads(response.read())
            statuses.append(response.status)
            conn.close()
        assert statuses == [200, 200, 429]
        assert payload["error"]["type"] == "rate_limit_error"
        assert payload["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(response.headers["retry-after"]) <= 30
        served = fab.client("demo-eu").chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "other tenants are not limited"}]
        )
        assert served.choices
    finally:
        fab.close()
