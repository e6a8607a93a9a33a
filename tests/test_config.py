"""Topology YAML: the embedded default, errors that name the bad field, and `grifo check-config`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from grifo.config.load import (
    ConfigError,
    default_config,
    load_config,
    parse_config,
    parse_point_url,
    usd_to_micros,
)
from grifo.jurisdictions import BLOCS


def point(
    name: str = "a",
    jurisdiction: str = "DE",
    *,
    url: str | None = "http://127.0.0.1:9001",
    extra: str = "",
) -> str:
    lines = [
        f"  - name: {name}",
        "    site: s",
        "    region: r",
        f"    jurisdiction: {jurisdiction}",
        "    tier: edge",
    ]
    if url is not None:
        lines.append(f"    url: {url}")
    return "\n".join(lines) + "\n" + extra


GOOD = (
    "gateway:\n  port: 0\n"
    "points:\n"
    + point("a", "DE")
    + point(
        "b",
        "PE",
        url=None,
        extra="    engine: {kind: fake}\n"
        "    rtt_ms: 12.5\n"
        "    prices:\n"
        "      usd_per_hour: 2.5\n"
        "      default: {input_usd_per_1m: 0.02, output_usd_per_1m: 0.000001}\n"
        "      models:\n"
        "        smollm2: {input_usd_per_1m: 1.5}\n",
    )
    + "blocs:\n  dach: [DE, AT, CH]\n"
    + "tenants:\n"
    "  - name: eu\n    allowed_jurisdictions: [EU, dach]\n"
    "  - name: nobody\n    allowed_jurisdictions: []\n"
    "  - name: anyone\n"
    "keys:\n"
    "  - tenant: eu\n    id: k1\n    sha256: '" + "ab" * 32 + "'\n"
)


# -- the embedded default ------------------------------------------------------------------------
def test_default_config_has_the_three_demo_points() -> None:
    config = default_config()
    points = {p.name: (p.jurisdiction, p.tier) for p in config.points}
    assert points == {
        "lima-edge": ("PE", "edge"),
        "frankfurt-regional": ("DE", "regional"),
        "virginia-central": ("US", "central"),
    }
    for p in config.points:
        assert p.engine is not None
        assert p.url is None


def test_default_config_prices_are_whole_micros() -> None:
    prices = {p.name: p.prices for p in default_config().points}
    assert usd_to_micros(prices["virginia-central"].usd_per_hour) == 2_500_000
    assert usd_to_micros(prices["lima-edge"].default.input_usd_per_1m) == 20_000
    assert usd_to_micros(prices["frankfurt-regional"].default.output_usd_per_1m) == 100_000


def test_default_config_tenants() -> None:
    tenants = {t.name: t.allowed_jurisdictions for t in default_config().tenants}
    assert tenants == {"demo-eu": ["EU"], "demo-latam": ["PE", "BR"], "demo-global": None}


def test_good_config_parses() -> None:
    config = parse_config(GOOD, "good.yaml")
    assert [p.name for p in config.points] == ["a", "b"]
    b = config.points[1]
    assert b.engine is not None
    assert b.engine.kind == "fake"
    assert b.rtt_ms == 12.5
    assert usd_to_micros(b.prices.models["smollm2"].input_usd_per_1m) == 1_500_000
    assert usd_to_micros(b.prices.default.output_usd_per_1m) == 1
    assert config.tenants[2].allowed_jurisdictions is None
    assert config.tenants[1].allowed_jurisdictions == []
    assert config.blocs == {"dach": ["DE", "AT", "CH"]}


# -- errors name the bad field -------------------------------------------------------------------
def _key(tenant: str) -> str:
    return f"keys:\n  - tenant: {tenant}\n    id: k1\n    sha256: '{'0' * 64}'\n"


BAD: list[tuple[str, str, list[str]]] = [
    ("string rtt", "points:\n" + point(extra="    rtt_ms: fast\n"), ["$.points[0].rtt_ms"]),
    ("negative rtt", "points:\n" + point(extra="    rtt_ms: -1\n"), ["$.points[0].rtt_ms"]),
    (
        "unknown point field",
        "points:\n" + point() + point("b", extra="    colour: red\n"),
        ["colour", "$.points[1]"],
    ),
    ("unknown top-level field", "points:\n" + point() + "gatewy: {}\n", ["gatewy"]),
    (
        "point in a bloc",
        "points:\n" + point(jurisdiction="EU"),
        ["$.points[0].jurisdiction", "'EU'"],
    ),
    ("point in XX", "points:\n" + point(jurisdiction="XX"), ["$.points[0].jurisdiction", "'XX'"]),
    (
        "tenant in ZZ",
        "points:\n" + point() + "tenants:\n  - name: t\n    allowed_jurisdictions: [DE, ZZ]\n",
        ["$.tenants[0].allowed_jurisdictions", "ZZ"],
    ),
    ("duplicate point", "points:\n" + point("a") + point("a"), ["$.points", "'a'"]),
    (
        "url and engine",
        "points:\n" + point(extra="    engine: {kind: fake}\n"),
        ["$.points[0]", "url", "engine"],
    ),
    ("neither url nor engine", "points:\n" + point(url=None), ["$.points[0]", "url", "engine"]),
    ("bad url", "points:\n" + point(url="ftp://x:1"), ["$.points[0].url"]),
    (
        "proxy without upstream",
        "points:\n" + point(url=None, extra="    engine: {kind: proxy}\n"),
        ["$.points[0].engine.upstream_url"],
    ),
    ("key of a missing tenant", "points:\n" + point() + _key("ghost"), ["$.keys[0].tenant"]),
    (
        "negative GPU layers",
        "points:\n" + point(url=None, extra="    engine: {gpu_layers: -1}\n"),
        ["$.points[0].engine.gpu_layers"],
    ),
    (
        "GPU layers neither a count nor all",
        "points:\n" + point(url=None, extra="    engine: {gpu_layers: most}\n"),
        ["$.points[0].engine.gpu_layers"],
    ),
    (
        "sub-micro input price",
        "points:\n" + point(extra="    prices:\n      default: {input_usd_per_1m: 0.0000001}\n"),
        ["$.points[0].prices.default.input_usd_per_1m"],
    ),
    (
        "sub-micro model price",
        "points:\n"
        + point(extra="    prices:\n      models:\n        m: {output_usd_per_1m: 1.0000005}\n"),
        ["$.points[0].prices.models.m.output_usd_per_1m"],
    ),
    (
        "sub-micro hourly price",
        "points:\n" + point(extra="    prices:\n      usd_per_hour: 0.0000001\n"),
        ["$.points[0].prices.usd_per_hour"],
    ),
    ("no points", "points: []\n", ["$.points"]),
    ("invalid YAML", "points: [\n  - name: a", ["not valid YAML"]),
    ("not a mapping", "- just\n- a list\n", ["Expected `object`"]),
    ("bad name", "points:\n" + point("Has Spaces"), ["$.points[0].name"]),
    ("bad bloc member", "points:\n" + point() + "blocs:\n  x: [EU]\n", ["$.blocs"]),
]


@pytest.mark.parametrize(("text", "needles"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_names_the_field(text: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "bad.yaml")
    message = str(info.value)
    assert message.startswith("bad.yaml: ")
    for needle in needles:
        assert needle in message


@pytest.mark.parametrize(("value", "parsed"), [("all", "all"), ("12", 12), ("0", 0)])
def test_gpu_layers_is_a_count_or_all(value: str, parsed: object) -> None:
    text = "points:\n" + point(url=None, extra=f"    engine: {{gpu_layers: {value}}}\n")
    engine = parse_config(text, "gpu.yaml").points[0].engine
    assert engine is not None
    assert engine.gpu_layers == parsed


@pytest.mark.parametrize(
    ("flag", "value", "error"),
    [
        ("--gpu-layers", "-1", "must be at least 0, got -1"),
        ("--gpu-layers", "most", "expected a number or all, got 'most'"),
    ],
)
def test_gpu_layers_flag_refuses_what_is_not_a_count_or_all(
    flag: str, value: str, error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from grifo.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["point", "--name", "p", "--jurisdiction", "DE", flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {error}" in capsys.readouterr().err


def test_every_problem_is_reported_at_once() -> None:
    text = "points:\n" + point("a", "XX") + point("a", url=None) + _key("ghost")
    with pytest.raises(ConfigError) as info:
        parse_config(text, "bad.yaml")
    message = str(info.value)
    for needle in ("$.points: name 'a'", "$.points[0].jurisdiction", "$.points[1]", "$.keys[0]"):
        assert needle in message


def test_key_env_must_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "points:\n" + point() + "tenants:\n  - name: t\nkeys:\n  - {tenant: t, id: k, env: K9}\n"
    monkeypatch.delenv("K9", raising=False)
    with pytest.raises(ConfigError, match=r"\$\.keys\[0\]\.env"):
        parse_config(text, "x")
    monkeypatch.setenv("K9", "secret")
    assert parse_config(text, "x").keys[0].env == "K9"


def test_configured_bloc_does_not_change_builtin_ones() -> None:
    parse_config(GOOD, "good.yaml")
    assert "DACH" not in BLOCS


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:9001", ("127.0.0.1", 9001)),
        ("http://point.example:80/", ("point.example", 80)),
        ("http://host", None),
        ("https://host:1", ("host", 1)),
        ("ftp://host:1", None),
        ("http://host:1/v1", None),
        ("http://user@host:1", None),
        ("http://host:99999", None),
        ("host:1", None),
    ],
)
def test_parse_point_url(url: str, expected: tuple[str, int] | None) -> None:
    assert parse_point_url(url) == expected


def test_load_config_reports_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


# -- the CLI --------------------------------------------------------------------------------------
def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "grifo", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_cli_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    result = _check_config(path)
    assert result.returncode == 0, result.stderr
    assert "ok (2 points, 3 tenants)" in result.stdout
    assert result.stderr == ""


def test_check_config_cli_rejects_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("points:\n" + point(extra="    rtt_ms: fast\n"))
    result = _check_config(path)
    assert result.returncode == 2
    assert "invalid configuration" in result.stderr
    assert "$.points[0].rtt_ms" in result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_a_budget_needs_money_or_tokens() -> None:
    text = """
points:
  - {name: p, site: s, region: r, jurisdiction: PE, tier: edge, url: "http://127.0.0.1:1"}
tenants:
  - {name: t, budget: {period: day}}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "t")
    assert "$.tenants[0].budget: give `usd`, `tokens` or both" in str(info.value)
