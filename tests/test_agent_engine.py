"""A whole agent run on the real packaged model (SmolLM2-135M on llama.cpp): every step is a
grammar-constrained JSON call of a real HTTP tool on loopback, deterministic at temperature 0,
metered to the ledger; a token budget ends a run cleanly."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from grifo.http.message import Request, Response
from tests.support.fabric import Fabric
from tests.support.threaded import ThreadedServer
from tests.test_agent_runs import events_of, post

pytestmark = pytest.mark.engine
MODEL = "smollm2-135m-instruct"


class WeatherApi:
    def __init__(self) -> None:
        self.asked: list[dict[str, Any]] = []

    async def __call__(self, request: Request) -> Response:
        query = json.loads(request.body)
        self.asked.append(query)
        city = str(query.get("city", "?"))
        return Response(200, json.dumps({"city": city, "celsius": 18, "sky": "cloudy"}).encode())


@pytest.fixture(scope="module")
def weather() -> Iterator[tuple[WeatherApi, ThreadedServer]]:
    api = WeatherApi()
    server = ThreadedServer(api)
    yield api, server
    server.close()


@pytest.fixture(scope="module")
def fabric(
    weather: tuple[WeatherApi, ThreadedServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fabric]:
    url = weather[1].url + "/weather"
    yaml = f"""
gateway: {{demo_keys: true, health_interval_s: 0.2}}
points:
  - name: lima-edge
    site: lima
    region: sa-west
    jurisdiction: PE
    tier: edge
    engine: {{kind: llama_cpp, model: smollm2, threads: 1, parallel: 2, embeddings: none}}
    prices: {{usd_per_hour: 0.04, default: {{input_usd_per_1m: 20, output_usd_per_1m: 40,
                                           cached_input_usd_per_1m: 0}}}}
    tools:
      http:
        - name: get_weather
          description: Current weather of a city.
          url: "{url}"
          parameters:
            type: object
            properties: {{city: {{type: string, maxLength: 40}}}}
            required: [city]
            additionalProperties: false
          private: true
tenants:
  - {{name: demo-latam, allowed_jurisdictions: [PE]}}
"""
    fab = Fabric.from_yaml(yaml, Path(tmp_path_factory.mktemp("agent-engine")))
    yield fab
    fab.close()


def _run(fabric: Fabric, **limits: int) -> tuple[Any, list[dict[str, Any]]]:
    body = {
        "model": MODEL,
        "instructions": "You are a helpful assistant.",
        "input": "What is the weather in Lima?",
        "tools": ["get_weather"],
        "tool_choice": "required",
        "limits": {"max_steps": 2, "max_step_tokens": 64, **limits},
    }
    response = post(fabric, "demo-latam", body)
    assert response.status_code == 200, response.text
    return response, events_of(response)


def test_the_model_calls_the_real_tool_then_answers_and_the_run_is_metered(
    fabric: Fabric, weather: tuple[WeatherApi, ThreadedServer]
) -> None:
    api = weather[0]
    before = len(api.asked)
    response, events = _run(fabric)
    kinds = [e["type"] for e in events]
    assert kinds == [
        "run.started", "model.step", "tool.call", "tool.result", "model.step", "run.completed"
    ], events  # fmt: skip
    call = json.loads(events[1]["output"])  # the model's own output is the JSON call
    assert call["tool"] == "get_weather"
    assert events[2]["arguments"] == call["arguments"]
    assert isinstance(call["arguments"]["city"], str)
    assert api.asked[before:] == [call["arguments"]]  # the tool really ran, once
    assert '"celsius": 18' in events[3]["output"]
    final = events[-1]
    assert final["status"] == "completed"
    assert isinstance(final["output"], str)
    entry = fabric.ledger(response.headers["x-request-id"])[response.headers["x-request-id"]]
    assert entry.prompt_tokens == final["usage"]["prompt_tokens"] > 0
    assert entry.completion_tokens == final["usage"]["completion_tokens"] > 0
    assert entry.cost_micros == final["usage"]["cost_micros"] > 0


def test_runs_are_deterministic_and_reuse_the_engines_prefix_cache(fabric: Fabric) -> None:
    runs = [_run(fabric) for _ in range(2)]
    outputs = [[e.get("output") for e in events[1:]] for _, events in runs]
    assert outputs[0] == outputs[1]
    # Step 2 extends step 1's conversation, and run 2 opens like run 1: both reuse the
    # engine's cache, and cached tokens are billed at the point's cached price (free here).
    response, events = runs[1]
    steps = [e for e in events if e["type"] == "model.step"]
    assert all(s["step_usage"]["prompt_tokens_details"]["cached_tokens"] > 0 for s in steps)
    usage = events[-1]["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert cached == sum(s["step_usage"]["prompt_tokens_details"]["cached_tokens"] for s in steps)
    entry = fabric.ledger(response.headers["x-request-id"])[response.headers["x-request-id"]]
    token_part = (usage["prompt_tokens"] - cached) * 20 + usage["completion_tokens"] * 40
    assert entry.cost_micros >= token_part
    assert entry.cost_micros < token_part + cached * 20  # cached tokens were not billed in full


def test_a_token_budget_ends_the_run_cleanly_and_is_never_exceeded(fabric: Fabric) -> None:
    response, events = _run(fabric, max_tokens=150)  # one step's prompt is about 100 tokens
    final = events[-1]
    assert final["status"] == "incomplete"
    assert final["reason"] == "max_tokens"
    assert final["usage"]["total_tokens"] <= 150
    entry = fabric.ledger(response.headers["x-request-id"])[response.headers["x-request-id"]]
    assert entry.prompt_tokens + entry.completion_tokens == final["usage"]["total_tokens"]
