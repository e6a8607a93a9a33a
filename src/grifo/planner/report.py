"""The report directory: report.md (tables), summary.json, and PNG plots drawn with matplotlib
(imported here only, with the Agg backend; the `plan` extra installs it)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from grifo.planner.metrics import Summary
from grifo.planner.plan import Plan

PLOTS = ("latency_cdf.png", "cost_per_month.png", "utilisation.png")


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:,.0f}"


def _usd(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:,.2f}"


def results_table(summaries: Sequence[Summary]) -> list[str]:
    slo = summaries[0].slo_ms if summaries else 0.0
    lines = [
        f"| strategy | served | refused | p50 ms | p99 ms | TTFT p50 ms | TTFT p99 ms "
        f"| SLO ≤ {slo:g} ms | OpEx USD/month | violations | task p50 ms | task p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        name = s.strategy if s.respects_policy else f"{s.strategy} (ignores policy)"
        lines.append(
            f"| {name} | {s.served} | {s.refused} | {_ms(s.p50_ms)} | {_ms(s.p99_ms)} "
            f"| {_ms(s.ttft_p50_ms)} | {_ms(s.ttft_p99_ms)} | {s.slo_attainment:.1%} "
            f"| {_usd(s.monthly_usd)} | {s.violations} "
            f"| {_ms(s.task_p50_ms)} | {_ms(s.task_p99_ms)} |"
        )
    return lines


def _cost_table(summaries: Sequence[Summary]) -> list[str]:
    lines = [
        "| strategy | OpEx USD/month | tokens | hardware (busy share) "
        "| always-on hardware of the points used |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {s.strategy} | {_usd(s.monthly_usd)} | {_usd(s.monthly_token_usd)} "
        f"| {_usd(s.monthly_hardware_usd)} | {_usd(s.capacity_usd_month)} |"
        for s in summaries
    ]
    return lines


def _warnings(plan: Plan) -> list[str]:
    lines = []
    for s in plan.summaries:
        if s.over_context:
            lines.append(
                f"- {s.strategy}: {s.over_context} requests longer than their point's context "
                "length (a real point refuses them; scale tokens down with --token-scale)"
            )
        if s.tasks_refused:
            lines.append(f"- {s.strategy}: {s.tasks_refused} multi-step tasks refused")
    return [*lines, ""] if lines else []


def _points_table(plan: Plan) -> list[str]:
    head = "| point | tier | jurisdiction | rtt ms | slots | overhead ms | prefill tok/s "
    head += "| decode tok/s | batch α | model from |"
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for p in plan.config.points:
        m = plan.models[p.name]
        source = "default (uncalibrated)" if m.source == "default" else f"`{m.source}`"
        lines.append(
            f"| {p.name} | {p.tier} | {p.jurisdiction} | {p.rtt_ms:g} | {m.slots} "
            f"| {m.overhead_ms:g} | {m.prefill_tokens_per_s:,.0f} | {m.decode_tokens_per_s:,.1f} "
            f"| {m.batch_alpha:g} | {source} |"
        )
    return lines


def _usage_table(plan: Plan) -> list[str]:
    names = [s.strategy for s in plan.summaries]
    lines = [
        "| point | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for p in plan.config.points:
        cells = [
            f"{s.utilisation.get(p.name, 0):.0%} busy, {s.share.get(p.name, 0):.0%} of requests"
            for s in plan.summaries
        ]
        lines.append(f"| {p.name} | " + " | ".join(cells) + " |")
    return lines


def _tenants_table(plan: Plan) -> list[str]:
    counts: dict[str, int] = {}
    for tenant in plan.tenants.values():
        counts[tenant] = counts.get(tenant, 0) + 1
    lines = ["| tenant | requests | may run in | tier |", "|---|---:|---|---|"]
    for name, sender in plan.senders.items():
        where = "anywhere" if sender.allowed is None else ", ".join(sorted(sender.allowed))
        if len(where) > 60:
            where = f"{len(sender.allowed or ())} countries"
        lines.append(f"| {name} | {counts.get(name, 0)} | {where} | {sender.tier or 'any'} |")
    return lines


def write_report(
    plan: Plan,
    out: Path,
    header: dict[str, str],
    validation: list[str] | None = None,
    *,
    plots: bool = True,
) -> list[Path]:
    """Write report.md, summary.json and (with `plots`) the PNGs into `out`; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    steps = sum(r.after is not None for r in plan.requests)
    lines = ["# grifo plan", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += [
        f"- requests: {len(plan.requests)} ({steps} of them dependent steps of multi-step tasks)",
        f"- model: `{plan.model}`; gateway overhead {plan.gateway_ms:g} ms per request; "
        f"tenants drawn per task with seed {plan.seed}",
        "",
        "## Results",
        "",
        *results_table(plan.summaries),
        "",
        "Latency: arrival at the gateway to the whole answer; OpEx: pricing.py's cost of each "
        "request (tokens plus its share of its point's busy hour) for a 30-day month at the "
        "replayed request rate; violations: requests placed outside their tenant's allowed "
        "jurisdictions; task: first arrival to last answer of a multi-step task.",
        "",
        *_warnings(plan),
        "## Cost",
        "",
        *_cost_table(plan.summaries),
        "",
        "## Points",
        "",
        *_points_table(plan),
        "",
        *_usage_table(plan),
        "",
        "## Tenants",
        "",
        *_tenants_table(plan),
        "",
    ]
    if validation:
        lines += ["## Validation against a real gateway", "", *validation, ""]
    written = [out / "report.md", out / "summary.json"]
    if plots:
        written += draw(plan, out)
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in written[2:]] + [""]
    written[0].write_text("\n".join(lines), encoding="utf-8")
    summary = {"header": header, "strategies": [_no_nan(asdict(s)) for s in plan.summaries]}
    written[1].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return written


def draw(plan: Plan, out: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError(
            "plots need matplotlib: pip install 'grifo[plan]' (or run with --no-plots)"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [out / name for name in PLOTS]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, result in enumerate(plan.results):
        values = sorted(o.latency_ms for o in result.outcomes if o.point is not None)
        label = result.strategy
        if len(values) < len(result.outcomes):
            label += f" ({len(values)} of {len(result.outcomes)} served)"
        if values:
            ys = [(n + 1) / len(values) for n in range(len(values))]
            style = ("-", "--", "-.", ":")[i % 4]
            ax.step(values, ys, where="post", label=label, linestyle=style)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("share of the requests served")
    ax.axvline(plan.slo_ms, color="grey", linestyle=":", label=f"SLO {plan.slo_ms:g} ms")
    ax.set_title("Latency CDF per strategy")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [s.strategy for s in plan.summaries]
    tokens = [_zero(s.monthly_token_usd) for s in plan.summaries]
    hardware = [_zero(s.monthly_hardware_usd) for s in plan.summaries]
    ax.bar(names, tokens, label="tokens")
    ax.bar(names, hardware, bottom=tokens, label="hardware (busy share)")
    ax.set_ylabel("USD per month")
    ax.set_title("OpEx per month per strategy")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    points = [p.name for p in plan.config.points]
    width = 0.8 / max(len(plan.summaries), 1)
    for i, s in enumerate(plan.summaries):
        xs = [j + i * width for j in range(len(points))]
        ax.bar(xs, [s.utilisation.get(p, 0.0) * 100 for p in points], width, label=s.strategy)
    ax.set_xticks([j + width * (len(plan.summaries) - 1) / 2 for j in range(len(points))])
    ax.set_xticklabels(points, fontsize=8)
    ax.set_ylabel("busy %")
    ax.set_ylim(0, 105)
    ax.set_title("Utilisation per point")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths


def _no_nan(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: an undefined figure (no tasks, nothing served) is null."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def _zero(x: float) -> float:
    return 0.0 if math.isnan(x) else x
