"""`grifo plan`: the command's arguments and what each action does."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from grifo.config.load import default_config, load_config
from grifo.config.model import GrifoConfig

_DESCRIPTION = """\
Replay a request trace over a topology in a discrete-event simulation that places requests with
the gateway's own ranking and jurisdiction rules, and compare placement strategies (grifo,
edge-first, central-only, cheapest, round-robin, central-naive) on latency, SLO attainment,
monthly cost, jurisdiction violations, utilisation and multi-step task latency.

  grifo plan --topology grifo.yaml --trace trace.jsonl --limit 500 --speed 10 --token-scale 0.05
  grifo plan calibrate --topology grifo.yaml --calibration calibration.json
  grifo plan validate --topology two-points.yaml --trace trace.csv --limit 40

Traces: Mooncake JSON lines (*.jsonl) or Azure LLM inference CSV (*.csv). Tenants are drawn
from the topology per task with --seed. See README, Planner.
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    plan = sub.add_parser(
        "plan",
        help="simulate placement strategies over a request trace",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument(
        "action",
        nargs="?",
        choices=["simulate", "calibrate", "validate"],
        default="simulate",
        help="simulate (default), calibrate points, or validate the simulator on a real gateway",
    )
    plan.add_argument("--topology", "--config", dest="topology", type=Path, help="topology YAML")
    plan.add_argument("--trace", type=Path, help="Mooncake .jsonl or Azure .csv trace")
    plan.add_argument("--strategy", default=None, help="comma-separated, or all (default)")
    plan.add_argument("--limit", type=int, help="replay only the first N requests")
    plan.add_argument("--speed", type=float, default=1.0, help="arrivals N times faster")
    plan.add_argument(
        "--token-scale", type=float, default=1.0, help="multiply token counts (small models)"
    )
    plan.add_argument(
        "--agent-steps",
        type=int,
        help="tasks of N dependent steps (default: Mooncake conversations; 1: independent)",
    )
    plan.add_argument("--seed", type=int, default=0, help="tenant assignment seed (default 0)")
    plan.add_argument("--slo-ms", type=float, default=2000.0, help="latency SLO (default 2000)")
    plan.add_argument(
        "--calibration",
        type=Path,
        help="calibration JSON to read (simulate, validate) or update (calibrate; default "
        "calibration.json)",
    )
    plan.add_argument("--out", type=Path, default=Path("plan-report"), help="report directory")
    plan.add_argument("--gateway-ms", type=float, default=1.0, help="gateway time per request")
    plan.add_argument("--model", help="model of the trace's requests (default: most points')")
    plan.add_argument("--no-plots", action="store_true", help="tables only, no matplotlib")
    plan.add_argument(
        "--engine", choices=["fake", "llama_cpp"], help="calibrate: run this engine instead"
    )
    plan.add_argument(
        "--token-delay-ms", type=float, default=10.0, help="calibrate --engine fake: per token"
    )
    plan.add_argument("--point", action="append", default=[], help="calibrate only this point")
    plan.add_argument("--repeats", type=int, default=3, help="calibrate: samples per probe")


def run(args: argparse.Namespace) -> int:
    from grifo.planner.calibrate import CalibrationError
    from grifo.planner.trace import TraceError
    from grifo.planner.validate import ValidationError

    try:
        if args.action == "calibrate":
            return _calibrate(args)
        return _simulate(args, validate=args.action == "validate")
    except (TraceError, CalibrationError, ValidationError, ValueError, RuntimeError) as exc:
        print(f"grifo plan: {exc}", file=sys.stderr)
        return 1


def _topology(args: argparse.Namespace) -> tuple[GrifoConfig, str]:
    if args.topology is None:
        return default_config(), "embedded demo topology"
    return load_config(args.topology), str(args.topology)


def _calibrate(args: argparse.Namespace) -> int:
    from grifo.planner.calibrate import calibrate
    from grifo.planner.service import load_calibration, save_calibration

    config, _ = _topology(args)
    path = args.calibration or Path("calibration.json")
    calibration = calibrate(
        config,
        args.topology,
        load_calibration(path),
        names=args.point,
        engine=args.engine,
        token_delay_ms=args.token_delay_ms,
        repeats=args.repeats,
        log=lambda line: print(line, file=sys.stderr),
    )
    save_calibration(calibration, path)
    print(f"calibration written to {path}")
    return 0


def _simulate(args: argparse.Namespace, *, validate: bool) -> int:
    from grifo.planner import strategies
    from grifo.planner import validate as validation
    from grifo.planner.calibrate import calibrate
    from grifo.planner.plan import run_plan
    from grifo.planner.report import results_table, write_report
    from grifo.planner.service import load_calibration, save_calibration
    from grifo.planner.trace import load_trace

    if args.trace is None:
        raise ValueError("--trace is required")
    config, source = _topology(args)
    names = strategies.parse_names(args.strategy or ("grifo" if validate else "all"))
    requests = load_trace(
        args.trace,
        limit=args.limit,
        speed=args.speed,
        token_scale=args.token_scale,
        agent_steps=args.agent_steps,
    )
    if args.calibration is not None and not args.calibration.exists() and not validate:
        raise ValueError(f"{args.calibration}: no such file (grifo plan calibrate writes one)")
    calibration = load_calibration(args.calibration)
    if validate:
        requests = validation.fit_for_fake(requests)
        if not calibration.engines:  # calibrated first, against the topology's own points
            calibration = calibrate(config, args.topology, calibration, repeats=args.repeats)
            save_calibration(calibration, args.calibration or args.out / "calibration.json")
    plan = run_plan(
        config,
        requests,
        names,
        calibration,
        slo_ms=args.slo_ms,
        seed=args.seed,
        gateway_ms=args.gateway_ms,
        model=args.model,
    )
    lines = None
    if validate:
        comparison = validation.compare(plan, validation.run_real(plan), names[0])
        lines = comparison.lines()
    header = {
        "command": f"`{command(args)}`",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "topology": source,
        "trace": f"{args.trace.name} (first {len(requests)} requests, arrivals at "
        f"{args.speed:g}× the trace's pace, token counts ×{args.token_scale:g})",
    }
    written = write_report(plan, args.out, header, lines, plots=not args.no_plots)
    print("\n".join(results_table(plan.summaries)))
    if lines:
        print("\n".join(lines))
    print(f"report: {written[0]}")
    return 0


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (defaults left out)."""
    parts = ["grifo plan"] + ([args.action] if args.action != "simulate" else [])
    flags = [
        ("--topology", args.topology, None),
        ("--trace", args.trace, None),
        ("--strategy", args.strategy, None),
        ("--limit", args.limit, None),
        ("--speed", args.speed, 1.0),
        ("--token-scale", args.token_scale, 1.0),
        ("--agent-steps", args.agent_steps, None),
        ("--seed", args.seed, 0),
        ("--slo-ms", args.slo_ms, 2000.0),
        ("--calibration", args.calibration, None),
        ("--gateway-ms", args.gateway_ms, 1.0),
        ("--model", args.model, None),
    ]
    parts += [
        f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"
        for flag, value, default in flags
        if value != default
    ]
    parts.append(f"--out {args.out}")
    return " ".join(parts)
