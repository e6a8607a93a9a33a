"""Read a topology YAML file into a validated `GrifoConfig`; every error names the bad field."""

from __future__ import annotations

import datetime as dt
import os
import re
from collections import Counter
from collections.abc import Mapping
from decimal import Decimal
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import yaml

from grifo.config.model import GrifoConfig, PointConfig, TenantConfig
from grifo.jurisdictions import COUNTRIES, UnknownJurisdictionError, expand, merge_blocs


class ConfigError(ValueError):
    """The configuration is invalid; the message says where (`$.points[1].rtt_ms`) and why."""


def load_config(path: Path) -> GrifoConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return parse_config(text, str(path))


def default_config() -> GrifoConfig:
    """The embedded demo topology shipped with grifo."""
    text = resources.files("grifo.config").joinpath("default.yaml").read_text(encoding="utf-8")
    return parse_config(text, "embedded default")


def parse_config(text: str, source: str) -> GrifoConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    try:
        config = msgspec.convert(data, GrifoConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    problems = check(config)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return config


def check(config: GrifoConfig) -> list[str]:
    """Rules the schema cannot state, each reported with the path of the offending field."""
    problems: list[str] = []
    try:
        blocs = merge_blocs(config.blocs)
    except UnknownJurisdictionError as exc:
        return [f"$.blocs: {exc}"]
    problems += _duplicates("points", [p.name for p in config.points])
    problems += _duplicates("tenants", [t.name for t in config.tenants])
    problems += _duplicates("keys", [k.id for k in config.keys])
    for i, point in enumerate(config.points):
        problems += point_problems(f"$.points[{i}]", point)
    tenants = {t.name for t in config.tenants}
    for i, tenant in enumerate(config.tenants):
        problems += tenant_problems(f"$.tenants[{i}]", tenant, blocs)
    problems += [
        f"$.keys[{i}].budget: give `usd`, `tokens` or both"
        for i, k in enumerate(config.keys)
        if k.budget is not None and k.budget.usd is None and k.budget.tokens is None
    ]
    for i, key in enumerate(config.keys):
        where = f"$.keys[{i}]"
        if key.tenant not in tenants:
            problems.append(f"{where}.tenant: no tenant named {key.tenant!r}")
        if key.expires is not None:
            try:
                dt.datetime.fromisoformat(key.expires)
            except ValueError:
                problems.append(f"{where}.expires: not an ISO 8601 date or time")
        if (key.sha256 is None) == (key.env is None):
            problems.append(f"{where}: give exactly one of `sha256` or `env`")
        elif key.env is not None and not os.environ.get(key.env):
            problems.append(f"{where}.env: environment variable {key.env} is not set")
    if not config.points and config.gateway.registry is None:
        problems.append("$.points: at least one point is required (or a `gateway.registry`)")
    problems += _check_store(config)
    problems += _check_registry(config, blocs)
    return problems


def _check_registry(config: GrifoConfig, blocs: Mapping[str, frozenset[str]]) -> list[str]:
    registry = config.gateway.registry
    if registry is None:
        return []
    where = "$.gateway.registry"
    problems = _duplicates("gateway.registry.tokens", [t.id for t in registry.tokens])
    if registry.expire_after_s <= registry.heartbeat_s:
        problems.append(f"{where}.expire_after_s: must be longer than heartbeat_s")
    for i, token in enumerate(registry.tokens):
        at = f"{where}.tokens[{i}]"
        if (token.sha256 is None) == (token.env is None):
            problems.append(f"{at}: give exactly one of `sha256` or `env`")
        elif token.env is not None and not os.environ.get(token.env):
            problems.append(f"{at}.env: environment variable {token.env} is not set")
        try:
            expand(token.jurisdictions, blocs)
        except UnknownJurisdictionError as exc:
            problems.append(f"{at}.jurisdictions: {exc}")
        try:
            re.compile(token.name_pattern)
        except re.error as exc:
            problems.append(f"{at}.name_pattern: not a regular expression ({exc})")
    return problems


def _check_store(config: GrifoConfig) -> list[str]:
    store = config.gateway.store
    where = "$.gateway.store"
    problems: list[str] = []
    for name, url, env in (
        ("postgres", store.postgres_url, store.postgres_url_env),
        ("redis", store.redis_url, store.redis_url_env),
    ):
        if url is not None and env is not None:
            problems.append(f"{where}: give `{name}_url` or `{name}_url_env`, not both")
        elif env is not None and not os.environ.get(env):
            problems.append(f"{where}.{name}_url_env: environment variable {env} is not set")
        elif url is not None and not url.startswith(
            ("postgresql://", "postgres://") if name == "postgres" else ("redis://", "rediss://")
        ):
            problems.append(f"{where}.{name}_url: not a {name} URL")
    budgets = any(t.budget for t in config.tenants) or any(k.budget for k in config.keys)
    shared_db = store.postgres_url is not None or store.postgres_url_env is not None
    shared_reservations = store.redis_url is not None or store.redis_url_env is not None
    if budgets and shared_db and not shared_reservations:
        problems.append(
            f"{where}: budgets on a shared PostgreSQL need `redis_url` for their reservations"
        )
    return problems


def tenant_problems(
    where: str, tenant: TenantConfig, blocs: Mapping[str, frozenset[str]]
) -> list[str]:
    """What is wrong with a tenant (from the config, or the admin API), each naming its field."""
    problems: list[str] = []
    budget = tenant.budget
    if budget is not None and budget.usd is None and budget.tokens is None:
        problems.append(f"{where}.budget: give `usd`, `tokens` or both")
    lists = {"allowed_jurisdictions": tenant.allowed_jurisdictions}
    lists |= {f"data_classes.{name}": codes for name, codes in tenant.data_classes.items()}
    for field, codes in lists.items():
        try:
            expand(codes or [], blocs)
        except UnknownJurisdictionError as exc:
            problems.append(f"{where}.{field}: {exc}")
    for name, codes in tenant.redacted_to.items():
        if name not in tenant.data_classes:
            problems.append(f"{where}.redacted_to.{name}: not one of its data_classes")
        try:
            expand(codes, blocs)
        except UnknownJurisdictionError as exc:
            problems.append(f"{where}.redacted_to.{name}: {exc}")
    default = tenant.default_data_class
    if default is not None and default not in tenant.data_classes:
        problems.append(f"{where}.default_data_class: {default!r} is not one of its data_classes")
    return problems


def _duplicates(section: str, names: list[str]) -> list[str]:
    return [
        f"$.{section}: name {name!r} is used {n} times"
        for name, n in Counter(names).items()
        if n > 1
    ]


def point_problems(where: str, point: PointConfig) -> list[str]:
    """What is wrong with a point (from the config, or a registration), each naming its field."""
    problems: list[str] = []
    if point.jurisdiction not in COUNTRIES:
        problems.append(
            f"{where}.jurisdiction: {point.jurisdiction!r} is not an ISO 3166-1 alpha-2 "
            "country code (a point is in one country; blocs belong to tenants)"
        )
    if (point.url is None) == (point.engine is None):
        problems.append(f"{where}: give exactly one of `url` (a running point) or `engine`")
    if point.url is not None and parse_point_url(point.url) is None:
        problems.append(f"{where}.url: expected http(s)://host:port, got {point.url!r}")
    engine = point.engine
    upstream = engine.upstream_url if engine is not None else None
    plain = (upstream or "").startswith("http://")  # the proxy speaks plain HTTP upstream
    if (
        engine is not None
        and engine.kind == "proxy"
        and (not plain or not parse_point_url(upstream or ""))
    ):
        problems.append(f"{where}.engine.upstream_url: a proxy engine needs http://host:port")
    prices = [
        ("default", point.prices.default),
        *((f"models.{name}", price) for name, price in point.prices.models.items()),
    ]
    problems += [
        f"{where}.prices.{name}.{field}: more precise than 1 micro-USD"
        for name, price in prices
        for field in ("input_usd_per_1m", "output_usd_per_1m")
        if not _whole_micros(getattr(price, field))
    ]
    if not _whole_micros(point.prices.usd_per_hour):
        problems.append(f"{where}.prices.usd_per_hour: more precise than 1 micro-USD")
    return problems


def _whole_micros(usd: float) -> bool:
    micros = Decimal(str(usd)) * 1_000_000
    return micros == micros.to_integral_value()


def usd_to_micros(usd: float) -> int:
    """Exact conversion of a configured USD amount (validated by `check`) to micro-USD."""
    return int(Decimal(str(usd)) * 1_000_000)


def parse_point_url(url: str) -> tuple[str, int] | None:
    """(host, port) of an `http://host:port` or `https://host:port` URL, or None."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return None
    return parts.hostname, port
