"""`grifo plan`: traces, the simulator on the gateway's own ranking, costs, strategies, the
report, calibration against a real point and validation against a real gateway."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from grifo.cli import main
from grifo.config.load import default_config, parse_config
from grifo.config.model import EngineConfig, GrifoConfig, PointConfig
from grifo.jurisdictions import merge_blocs
from grifo.metering.pricing import cost_micros
from grifo.planner import strategies
from grifo.planner.calibrate import calibrate
from grifo.planner.metrics import percentile, summarise
from grifo.planner.plan import run_plan
from grifo.planner.report import PLOTS, write_report
from grifo.planner.service import (
    Calibration,
    ServiceModel,
    default_model,
    engine_key,
    load_calibration,
    save_calibration,
)
from grifo.planner.sim import point_states, simulate
from grifo.planner.tenants import principal, senders
from grifo.planner.trace import TraceError, TraceRequest, conversation_parents, load_trace
from grifo.security.keys import generate_key, hash_key
from grifo.security.provision import build_keyring
from grifo.store.records import StoredKey
from grifo.store.sqlite import StateDB
from grifo.topology import Price

# The first 400 lines of the public traces (licences beside them), so the tests need nothing
# outside the repository.
TRACES = Path(__file__).resolve().parent / "data" / "traces"
MOONCAKE = TRACES / "mooncake_conversation_trace.jsonl"
AZURE_CONV = TRACES / "azure_llm_inference_2023_conv.csv"
AZURE_CODE = TRACES / "azure_llm_inference_2023_code.csv"

FAKE = "{kind: fake, embeddings: fake, token_delay_ms: 10}"


def topology(
    tenants: str = "[{name: eu, allowed_jurisdictions: [EU]}, "
    "{name: latam, allowed_jurisdictions: [PE, BR]}, {name: global}]",
) -> GrifoConfig:
    return parse_config(
        f"""
gateway: {{health_interval_s: 0.5}}
points:
  - {{name: lima-edge, site: lima, region: sa-west, jurisdiction: PE, tier: edge, rtt_ms: 5,
     engine: {FAKE},
     prices: {{usd_per_hour: 0.04, default: {{input_usd_per_1m: 0.02, output_usd_per_1m: 0.04}}}}}}
  - {{name: frankfurt-regional, site: frankfurt, region: eu-central, jurisdiction: DE,
     tier: regional, rtt_ms: 110, engine: {FAKE},
     prices: {{usd_per_hour: 0.40, default: {{input_usd_per_1m: 0.05, output_usd_per_1m: 0.10}}}}}}
  - {{name: virginia-central, site: virginia, region: us-east, jurisdiction: US, tier: central,
     rtt_ms: 150, engine: {FAKE},
     prices: {{usd_per_hour: 2.50, default: {{input_usd_per_1m: 0.10, output_usd_per_1m: 0.20}}}}}}
tenants: {tenants}
""",
        "planner test topology",
    )


def uncalibrated(config: GrifoConfig) -> dict[str, ServiceModel]:
    return {p.name: Calibration.empty().model_for(p) for p in config.points}


def burst(n: int, gap_s: float, prompt: int = 20, completion: int = 10) -> list[TraceRequest]:
    return [TraceRequest(i, i * gap_s, prompt, completion, None, i) for i in range(n)]


# -- traces -----------------------------------------------------------------------------------
def test_mooncake_trace_parses_with_conversations_as_tasks() -> None:
    reqs = load_trace(MOONCAKE, limit=300)
    assert len(reqs) == 300
    assert reqs[0].arrival_s == 0
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(reqs))
    assert reqs[0].prompt_tokens == 6758
    assert reqs[0].completion_tokens == 500
    steps = [r for r in reqs if r.after is not None]
    assert steps, "the first 300 requests hold follow-up turns"
    for r in steps:
        parent = reqs[r.after or 0]
        assert parent.index < r.index
        assert parent.prompt_tokens < r.prompt_tokens
        assert r.task == parent.task
    fast = load_trace(MOONCAKE, limit=300, speed=10, token_scale=0.1)
    assert fast[-1].arrival_s == pytest.approx(reqs[-1].arrival_s / 10)
    assert fast[0].prompt_tokens == 676
    assert all(r.after is None for r in load_trace(MOONCAKE, limit=300, agent_steps=1))


@pytest.mark.parametrize("path", [AZURE_CONV, AZURE_CODE])
def test_azure_traces_parse(path: Path) -> None:
    reqs = load_trace(path, limit=50)
    assert len(reqs) == 50
    assert reqs[0].arrival_s == 0
    assert all(r.prompt_tokens >= 1 and r.completion_tokens >= 1 for r in reqs)
    assert all(r.after is None and r.task == r.index for r in reqs)
    first = path.read_text().splitlines()[1].split(",")
    assert (reqs[0].prompt_tokens, reqs[0].completion_tokens) == (int(first[1]), int(first[2]))
    assert 0 < reqs[-1].arrival_s < 3600
    steps = load_trace(path, limit=9, agent_steps=3)
    assert [r.after for r in steps] == [None, 0, 1, None, 3, 4, None, 6, 7]
    assert [r.task for r in steps] == [0, 0, 0, 3, 3, 3, 6, 6, 6]


def test_conversation_parents_follow_the_previous_turn() -> None:
    blocks = [(0, 1, 2), (0, 5, 6), (0, 1, 2, 3), (0, 1, 2, 3, 4), (0, 9)]
    prompts = [1200, 1100, 1700, 2100, 600]
    assert conversation_parents(blocks, prompts) == [None, None, 0, 2, None]


def test_bad_traces_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"timestamp": 0}\n')
    with pytest.raises(TraceError, match=r"t\.jsonl:1"):
        load_trace(bad)
    with pytest.raises(TraceError, match="unknown trace format"):
        load_trace(tmp_path / "t.txt")


# -- policy and placement ---------------------------------------------------------------------
def test_tenant_principals_match_the_gateways(tmp_path: Path) -> None:
    config = default_config()
    db = StateDB(tmp_path / "grifo.db")
    keys = {}
    for t in config.tenants:
        keys[t.name] = generate_key()
        db.add_key(StoredKey(f"k-{t.name}", t.name, hash_key(keys[t.name])))
    try:
        ring, _ = build_keyring(config, db, tmp_path, create_demo=False)
    finally:
        db.close()
    blocs = merge_blocs(config.blocs)
    for t in config.tenants:
        gateway = ring.authenticate(f"Bearer {keys[t.name]}".encode())
        ours = principal(t, blocs)
        assert dataclasses.replace(ours, key_id="") == dataclasses.replace(gateway, key_id="")
    eu = senders(config)["demo-eu"]
    assert eu.data_class == "personal"
    assert eu.allowed is not None
    assert "DE" in eu.allowed


def test_jurisdiction_is_never_crossed_but_by_the_naive_baseline() -> None:
    config = topology()
    reqs = load_trace(AZURE_CONV, limit=300, speed=4, token_scale=0.05)
    plan = run_plan(config, reqs, strategies.NAMES, Calibration.empty(), seed=1)
    by_name = {s.strategy: s for s in plan.summaries}
    for name in strategies.NAMES:
        if strategies.RESPECTS_POLICY[name]:
            assert by_name[name].violations == 0, name
    assert by_name["central-naive"].violations > 0
    grifo = next(r for r in plan.results if r.strategy == "grifo")
    jurisdiction = {p.name: p.jurisdiction for p in config.points}
    for o in grifo.outcomes:
        allowed = plan.senders[o.tenant].allowed
        assert o.point is not None
        assert allowed is None or jurisdiction[o.point] in allowed
        if o.tenant == "eu":
            assert o.point == "frankfurt-regional"
    # central-only cannot serve tenants kept out of the US: refused, not moved
    assert by_name["central-only"].refused == sum(plan.tenants[r.index] != "global" for r in reqs)


def test_the_simulator_ranks_with_the_gateways_index_and_polled_load() -> None:
    config = topology("[{name: global}]")
    reqs = burst(30, 0.01)
    tenants = dict.fromkeys(range(30), "global")
    models = uncalibrated(config)
    sends = senders(config)
    kw = {"model": "fake-chat"}
    grifo = simulate(config, reqs, tenants, sends, "grifo", models, **kw)
    edge = simulate(config, reqs, tenants, sends, "edge-first", models, **kw)
    # edge-first ignores load; grifo's queue term moves a burst to the next points
    assert {o.point for o in edge.outcomes} == {"lima-edge"}
    assert len({o.point for o in grifo.outcomes}) >= 2
    assert percentile([o.latency_ms for o in grifo.outcomes], 99) < percentile(
        [o.latency_ms for o in edge.outcomes], 99
    )


def test_central_only_is_slower_than_edge_first_where_the_edge_is_near() -> None:
    config = topology("[{name: global}]")
    reqs = burst(20, 1.0)  # light load: no queueing
    plan = run_plan(
        config, reqs, ["edge-first", "central-only", "cheapest", "round-robin"], Calibration.empty()
    )
    edge, central = plan.summary("edge-first"), plan.summary("central-only")
    # 10 tokens at 10 ms, rtt 5 ms vs 150 ms, 1 ms of gateway
    assert edge.p50_ms == pytest.approx(5 + 100 + 1, abs=2)
    assert central.p50_ms == pytest.approx(150 + 100 + 1, abs=2)
    assert plan.summary("cheapest").share["lima-edge"] == 1.0
    assert all(v > 0.25 for v in plan.summary("round-robin").share.values())
    assert central.monthly_usd > edge.monthly_usd


def test_cost_is_pricings_on_a_worked_example() -> None:
    config = topology("[{name: global}]")
    one = {p.name: ServiceModel(0.0, 1e9, 100.0, 0.0, 1) for p in config.points}
    reqs = [TraceRequest(0, 0.0, 1000, 100, None, 0), TraceRequest(1, 10.0, 1000, 100, None, 1)]
    tenants = {0: "global", 1: "global"}
    result = simulate(
        config,
        reqs,
        tenants,
        senders(config),
        "central-only",
        one,
        model="fake-chat",
        gateway_ms=0.0,
    )
    o = result.outcomes[0]
    # virginia: 0.10 / 0.20 USD per 1M tokens, 2.50 USD per hour; busy from dispatch to answer:
    # 150 ms of round trip plus 1000 tokens at 1e9/s plus 100 tokens at 100/s = 1.150001 s
    busy_ns = round((0.150 + 1000 / 1e9 + 1.0) * 1e9)
    assert o.token_micros == math.ceil((1000 * 100_000 + 100 * 200_000) / 1e6) == 120
    assert o.hardware_micros == math.ceil(2_500_000 * busy_ns / 3.6e12) == 799
    assert o.token_micros + o.hardware_micros == cost_micros(
        Price(100_000, 200_000), 2_500_000, 1000, 100, busy_ns
    )
    states = {s.name: s for s in point_states(config, "fake-chat")}
    summary = summarise(result, 2000.0, states)
    assert summary.token_micros + summary.hardware_micros == 2 * 919
    # a month of one such request every 10 s (the replayed span)
    assert summary.monthly_usd == pytest.approx(2 * 919e-6 * 30 * 86400 / 10)
    assert summary.capacity_usd_month == pytest.approx(2.5 * 24 * 30)


def test_agent_steps_wait_for_the_previous_answer() -> None:
    config = topology("[{name: global}]")
    reqs = load_trace(AZURE_CONV, limit=30, speed=2, token_scale=0.05, agent_steps=3)
    plan = run_plan(config, reqs, ["grifo"], Calibration.empty())
    outcomes = {o.index: o for o in plan.results[0].outcomes}
    for r in reqs:
        if r.after is not None:
            assert outcomes[r.index].arrival_s == pytest.approx(outcomes[r.after].done_s)
    summary = plan.summary("grifo")
    assert summary.tasks == 10
    first_task = [outcomes[i] for i in (0, 1, 2)]
    assert summary.task_p50_ms >= min(o.latency_ms for o in first_task) * 3 * 0.9
    total = (first_task[2].done_s - first_task[0].arrival_s) * 1000
    assert total == pytest.approx(sum(o.latency_ms for o in first_task))


# -- report, calibration, validation ----------------------------------------------------------
def test_report_files_are_written(tmp_path: Path) -> None:
    config = topology()
    plan = run_plan(config, burst(40, 0.05), strategies.NAMES, Calibration.empty())
    written = write_report(plan, tmp_path / "out", {"trace": "synthetic"})
    names = {p.name for p in written}
    assert names == {"report.md", "summary.json", *PLOTS}
    for name in PLOTS:
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| grifo |" in text
    assert "central-naive (ignores policy)" in text
    data = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["strategy"] for s in data["strategies"]] == list(strategies.NAMES)


def test_the_gateway_never_imports_matplotlib() -> None:
    code = "import sys, grifo.cli, grifo.lifecycle; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_gpu_point_has_a_calibration_and_a_default_model_of_its_own() -> None:
    cpu = EngineConfig(kind="llama_cpp", threads=4, parallel=8)
    gpu = EngineConfig(kind="llama_cpp", threads=4, parallel=8, gpu_layers="all")
    assert engine_key(cpu) == "llama_cpp/smollm2/threads=4/parallel=8/quantization=as-is"
    assert engine_key(gpu) == engine_key(cpu) + "/gpu_layers=all"
    point = {"name": "p", "site": "s", "region": "r", "jurisdiction": "PE", "tier": "edge"}
    on_cpu = default_model(PointConfig(**point, engine=cpu))
    on_gpu = default_model(PointConfig(**point, engine=gpu))
    assert on_gpu.decode_tokens_per_s > 4 * on_cpu.decode_tokens_per_s
    assert on_gpu.slots == on_cpu.slots == 8


def test_calibrate_measures_a_real_fake_point(tmp_path: Path) -> None:
    yaml = tmp_path / "one.yaml"
    yaml.write_text(
        "points:\n  - {name: solo, site: s, region: r, jurisdiction: PE, tier: edge,\n"
        "     engine: {kind: fake, embeddings: fake, token_delay_ms: 5}}\n"
    )
    config = parse_config(yaml.read_text(), "one")
    calibration = calibrate(config, yaml, Calibration.empty(), repeats=2)
    key = engine_key(config.points[0].engine)  # type: ignore[arg-type]
    model = calibration.engines[key]
    assert 100 < model.decode_tokens_per_s <= 205  # 5 ms a token, plus the engine's own time
    assert model.slots == 1
    assert 0 <= model.batch_alpha <= 0.3
    assert model.overhead_ms < 50
    save_calibration(calibration, tmp_path / "cal.json")
    loaded = load_calibration(tmp_path / "cal.json")
    assert loaded.model_for(config.points[0]) == model
    assert loaded.points == {"solo": key}


def test_plan_command_and_validation_against_a_real_gateway(tmp_path: Path) -> None:
    yaml = tmp_path / "two.yaml"
    yaml.write_text(
        """
gateway: {health_interval_s: 0.2}
points:
  - {name: lima-edge, site: lima, region: sa-west, jurisdiction: PE, tier: edge, rtt_ms: 1,
     engine: {kind: fake, embeddings: fake, token_delay_ms: 10},
     prices: {usd_per_hour: 0.04, default: {input_usd_per_1m: 0.02, output_usd_per_1m: 0.04}}}
  - {name: virginia-central, site: virginia, region: us-east, jurisdiction: US, tier: central,
     rtt_ms: 3, engine: {kind: fake, embeddings: fake, token_delay_ms: 10},
     prices: {usd_per_hour: 0.40, default: {input_usd_per_1m: 0.10, output_usd_per_1m: 0.20}}}
tenants:
  - {name: latam, allowed_jurisdictions: [PE]}
  - {name: global}
"""
    )
    trace = ["--topology", str(yaml), "--trace", str(AZURE_CONV), "--token-scale", "0.05"]
    out = tmp_path / "validation"
    # 80 requests in about 5 s: both points used, queues of up to a few requests. Ten runs
    # here gave p50 errors from 0.5% to 5.5%; at a third more load (--speed 8) the error was
    # 22-23%: the health poller's phase decides a few placements, and queues amplify them.
    args = ["--limit", "80", "--speed", "6", "--out", str(out), "--no-plots", "--repeats", "2"]
    assert main(["plan", "validate", *trace, *args]) == 0
    assert load_calibration(out / "calibration.json").engines
    text = (out / "report.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("p50 error:"))
    error = float(line.split()[2].rstrip("%")) / 100
    assert math.isfinite(error)
    assert error <= 0.20, text
    assert "real requests failed: 0." in text

    report = tmp_path / "plan"
    assert main(["plan", *trace, "--limit", "100", "--out", str(report), "--no-plots"]) == 0
    assert "| central-naive (ignores policy) |" in (report / "report.md").read_text()
    assert main(["plan", *trace, "--strategy", "fastest", "--out", str(report)]) == 1
