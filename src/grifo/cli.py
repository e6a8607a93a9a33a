"""The `grifo` command: serve a fabric, run one point, check a config."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec

from grifo import __version__
from grifo.agent.tools import vectors as index_cli
from grifo.api import cli as fabric_cli
from grifo.audit.cli import add_parser as add_audit_parser
from grifo.audit.cli import run as run_audit
from grifo.config.load import ConfigError, default_config, load_config
from grifo.config.model import EngineConfig, GrifoConfig, PointConfig
from grifo.cpus import available_cpus
from grifo.errors import StoreUnavailableError
from grifo.metering.cli import (
    add_budgets_parser,
    add_usage_parser,
    open_state,
    run_budgets,
    run_usage,
)
from grifo.planner import cli as plan_cli
from grifo.registry import cli as registry_cli
from grifo.security.certs import add_parser as add_certs_parser
from grifo.security.certs import run as run_certs
from grifo.security.keys_cli import add_parser as add_keys_parser
from grifo.security.keys_cli import run as run_keys
from grifo.store.select import resolve_state_dir
from grifo.telemetry import logs

_DESCRIPTION = """\
grifo: an OpenAI-compatible inference fabric. It decides for every request where it may run
(jurisdiction), where it runs fastest and cheapest, meters it and says where it ran.

  grifo serve                       gateway + three local demo points (Lima, Frankfurt, Virginia)
  grifo serve --config grifo.yaml   any topology described in YAML
  grifo point --config grifo.yaml --name lima-edge --port 9001
                                    one inference point on its own (e.g. on another machine)
  grifo check-config grifo.yaml     validate a topology file and exit
"""


def _count_or(word: str, least: int) -> Callable[[str], int | str]:
    """An argparse type: a count of at least `least`, or `word` (`--threads auto`)."""

    def parse(value: str) -> int | str:
        if value == word:
            return value
        try:
            count = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number or {word}, got {value!r}"
            ) from None
        if count < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {count}")
        return count

    return parse


_threads = _count_or("auto", 1)
_workers = _count_or("auto", 1)
_gpu_layers = _count_or("all", 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grifo", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"grifo {__version__}")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("GRIFO_LOG_FORMAT", "text"),
        help="text, or one JSON object per line (default text; GRIFO_LOG_FORMAT)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the gateway and the local points of a topology",
        description="Run the gateway. Points with an `engine` section are started as local "
        "processes; points with a `url` are reached over HTTP. Without --config, runs the "
        "embedded demo topology and prints one API key per demo tenant.",
    )
    serve.add_argument("--config", type=Path, help="topology YAML (default: embedded demo)")
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="listen port (default 8080)")
    serve.add_argument(
        "--workers",
        type=_workers,
        default=1,
        help="gateway processes sharing the port (SO_REUSEPORT): a number, or auto for one per "
        "CPU this process may use (affinity and container CPU quota); default 1",
    )
    serve.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--config-json", help=argparse.SUPPRESS)
    serve.add_argument("--point-urls", help=argparse.SUPPRESS)
    serve.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    serve.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="SQLite ledger, keys and logs (default $GRIFO_STATE_DIR or ./.grifo)",
    )

    point = sub.add_parser(
        "point",
        help="run one inference point",
        description="Run one inference point: an OpenAI-compatible server over a real engine, "
        "with /health, /load and /metrics. Take its settings from a topology file (--config "
        "and --name) or from flags.",
    )
    point.add_argument("--config", type=Path, help="topology YAML holding this point")
    point.add_argument("--name", help="the point's name (in --config, or for a new point)")
    point.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    point.add_argument("--port", type=int, default=9000, help="listen port (0: any free port)")
    point.add_argument("--jurisdiction", help="ISO 3166-1 country code of the site (flags mode)")
    point.add_argument("--site", default="local")
    point.add_argument("--region", default="local")
    point.add_argument("--tier", choices=["edge", "regional", "central"], default="edge")
    point.add_argument(
        "--engine",
        choices=["llama_cpp", "fake", "proxy"],
        default="llama_cpp",
        help="llama_cpp (embedded), fake (tests) or proxy (an existing OpenAI-compatible server)",
    )
    point.add_argument("--model", default="smollm2", help="packaged model name or .gguf path")
    point.add_argument(
        "--threads", type=_threads, default="auto", help="engine threads, or auto (default)"
    )
    point.add_argument(
        "--embeddings",
        choices=["minilm", "fake", "none"],
        help="the embedding model (default: minilm beside llama_cpp, none for a proxy)",
    )
    point.add_argument(
        "--parallel", type=int, default=4, help="sequences the engine decodes together"
    )
    point.add_argument(
        "--gpu-layers",
        type=_gpu_layers,
        default=0,
        help="model layers on the GPU, or all (needs a GPU build of llama-cpp-python)",
    )
    point.add_argument("--upstream-url", help="for --engine proxy: http://host:port")
    point.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run the engine on Ray Serve (grifo[ray]): local (default), auto, ray://head:10001",
    )
    point.add_argument("--ray-replicas", metavar="MIN:MAX", help="replicas Serve scales between")
    point.add_argument(
        "--key-file",
        type=Path,
        help="Ed25519 key the point signs receipts with (created once; default "
        "$GRIFO_STATE_DIR/points/<name>.pem, .grifo when unset)",
    )
    point.add_argument(
        "--register",
        action="append",
        metavar="GATEWAY_URL",
        help="join this gateway (repeat for several): register, heartbeat, deregister on drain",
    )
    point.add_argument(
        "--join-token-env",
        default="GRIFO_JOIN_TOKEN",
        help="the variable holding the join token (default GRIFO_JOIN_TOKEN)",
    )
    point.add_argument("--advertise-url", help="where gateways reach this point (default: --host)")
    point.add_argument("--register-ca-file", help="CA to verify https:// gateways with")
    point.add_argument("--point-json", help=argparse.SUPPRESS)
    point.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)

    check = sub.add_parser("check-config", help="validate a topology file")
    check.add_argument("config", type=Path)

    add_usage_parser(sub)
    add_keys_parser(sub)

    add_budgets_parser(sub)
    add_audit_parser(sub)
    add_certs_parser(sub)
    index_cli.add_parser(sub)
    fabric_cli.add_parsers(sub)
    plan_cli.add_parser(sub)
    registry_cli.add_parser(sub)

    policy = sub.add_parser(
        "policy",
        help="where a tenant's requests may run, and why",
        description="explain: the jurisdictions a tenant's requests of a data class may use, "
        "the config field that says so, and which points are in and out.",
    )
    policy.add_argument("action", choices=["explain"])
    policy.add_argument("tenant")
    policy.add_argument("data_class", nargs="?", help="default: the tenant's default class")
    policy.add_argument("--config", type=Path, help="topology YAML (default: embedded demo)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "serve": _serve,
        "point": _point,
        "usage": run_usage,
        "budgets": run_budgets,
        "keys": lambda a: run_keys(a, open_state(a)),
        "audit": run_audit,
        "certs": run_certs,
        "index": index_cli.run,
        "points": fabric_cli.run_points,
        "tenants": fabric_cli.run_tenants,
        "plan": plan_cli.run,
        "join-token": registry_cli.run,
        "policy": _policy,
        "check-config": _check_config,
    }
    try:
        return commands[args.command](args)
    except ConfigError as exc:
        print(f"grifo: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailableError as exc:
        print(f"grifo: {exc.message}", file=sys.stderr)
        return 1


def _policy(args: argparse.Namespace) -> int:
    from grifo.placement.explain import explain

    config = load_config(args.config) if args.config else default_config()
    print("\n".join(explain(config, args.tenant, args.data_class)))
    return 0


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"{args.config}: ok ({len(config.points)} points, {len(config.tenants)} tenants)")
    return 0


def _run(coro: object) -> None:
    import uvloop

    uvloop.run(coro)  # type: ignore[arg-type]


def _serve(args: argparse.Namespace) -> int:
    from grifo.lifecycle import WorkerStartError, serve, serve_worker
    from grifo.store.owner import StateDirInUseError
    from grifo.supervisor import PointStartError

    if args.config_json:
        config = msgspec.json.decode(args.config_json, type=GrifoConfig)
    else:
        config = load_config(args.config) if args.config else default_config()
    port = args.port if args.port is not None else config.gateway.port
    state_dir = resolve_state_dir(args.state_dir)
    try:
        if args.worker is not None:
            urls = msgspec.json.decode(args.point_urls or "{}", type=dict[str, str])
            _run(
                serve_worker(config, state_dir, args.host, port, urls, args.parent_pid, args.worker)
            )
        else:
            workers = available_cpus() if args.workers == "auto" else args.workers
            _run(serve(config, state_dir, args.host, port, workers))
    except KeyboardInterrupt:
        pass
    except (OSError, PointStartError, StateDirInUseError, WorkerStartError) as exc:
        print(f"grifo: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _point_config(args: argparse.Namespace) -> PointConfig:
    if args.point_json:
        return msgspec.json.decode(args.point_json, type=PointConfig)
    if args.config:
        config = load_config(args.config)
        for point in config.points:
            if point.name == args.name:
                return point
        raise ConfigError(f"{args.config}: no point named {args.name!r}")
    if not args.name or not args.jurisdiction:
        raise ConfigError("give --config and --name, or --name and --jurisdiction")
    engine = EngineConfig(
        kind=args.engine,
        model=args.model,
        threads=args.threads,
        gpu_layers=args.gpu_layers,
        parallel=args.parallel,
        upstream_url=args.upstream_url,
        embeddings=args.embeddings
        or ("none" if args.engine == "proxy" else "fake" if args.engine == "fake" else "minilm"),
    )
    from grifo.config.load import parse_config

    raw = {
        "points": [
            {
                "name": args.name,
                "site": args.site,
                "region": args.region,
                "jurisdiction": args.jurisdiction.upper(),
                "tier": args.tier,
                "engine": msgspec.to_builtins(engine),
            }
        ]
    }
    return parse_config(msgspec.json.encode(raw).decode(), "flags").points[0]


def _point(args: argparse.Namespace) -> int:
    from grifo.point.server import serve_point

    point = _point_config(args)
    if args.ray is not None or args.ray_replicas:
        from grifo.point.ray_serve import with_ray

        point = with_ray(point, args.ray, args.ray_replicas)
    state_dir = resolve_state_dir()
    key_file = args.key_file or state_dir / "points" / f"{point.name}.pem"
    join = None
    if args.register:
        from grifo.point.join import settings_from_args

        join = settings_from_args(args)
    from grifo.point.engines.base import EngineUnavailableError

    try:
        _run(serve_point(point, args.host, args.port, args.parent_pid, key_file, join))
    except KeyboardInterrupt:
        pass
    except EngineUnavailableError as exc:
        print(f"grifo: point {point.name} cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
