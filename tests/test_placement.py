"""Jurisdictions, the allowed set of a request, ranking of points, pricing and usage metering."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grifo.config.load import default_config
from grifo.config.model import ModelPrice, PlacementConfig, PointConfig, Prices
from grifo.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    NoCompliantPointError,
    PermissionDeniedError,
)
from grifo.jurisdictions import (
    BLOCS,
    COUNTRIES,
    UnknownJurisdictionError,
    expand,
    merge_blocs,
)
from grifo.metering.pricing import cost_micros, hardware_cost_micros, token_cost_micros
from grifo.metering.usage import SseSplitter, Usage, usage_of
from grifo.placement.jurisdiction import HEADER, allowed_set
from grifo.placement.scoring import NOMINAL_PROMPT_TOKENS, Candidate, PlacementIndex, rank
from grifo.topology import ModelCard, PointState, Price, build_point_state

EU = BLOCS["EU"]
MODEL = "smollm2"
CARD = ModelCard(MODEL, "chat", 2048)
PLACEMENT = PlacementConfig()


# -- jurisdictions -------------------------------------------------------------------------------
def test_bloc_members_are_countries() -> None:
    for name, members in BLOCS.items():
        assert members <= COUNTRIES, name
    assert len(EU) == 27
    assert {"DE", "FR", "IE"} <= EU
    assert "GB" not in EU
    assert "CH" not in EU
    assert BLOCS["EEA"] == EU | {"IS", "LI", "NO"}


def test_expand_mixes_countries_and_blocs_case_insensitively() -> None:
    assert expand(["de", " fr ", "DE"]) == {"DE", "FR"}
    assert expand(["eu", "US"]) == EU | {"US"}
    assert expand(["ANDEAN", "MERCOSUR"]) == {"BO", "CO", "EC", "PE", "AR", "BR", "PY", "UY"}
    assert expand([]) == frozenset()


@pytest.mark.parametrize("code", ["XX", "ZZ", "EUR", "", "D E", "UK", "latam"])
def test_expand_rejects_unknown_codes(code: str) -> None:
    with pytest.raises(UnknownJurisdictionError):
        expand(["DE", code])


def test_expand_with_custom_blocs_only_knows_those() -> None:
    with pytest.raises(UnknownJurisdictionError):
        expand(["EU"], {})
    assert expand(["EU"], {"EU": frozenset({"DE"})}) == {"DE"}


def test_merge_blocs() -> None:
    merged = merge_blocs({"dach": ["de", "AT", "CH"]})
    assert merged["DACH"] == {"DE", "AT", "CH"}
    assert merged["EU"] == EU
    assert "DACH" not in BLOCS  # the built-in table is not modified
    with pytest.raises(UnknownJurisdictionError):
        merge_blocs({"nested": ["EU"]})  # configured blocs are made of countries only


# -- the allowed set of a request ---------------------------------------------------------------
def test_no_header_keeps_the_tenant_set() -> None:
    assert allowed_set(EU, None, BLOCS) == EU
    assert allowed_set(None, None, BLOCS) is None
    assert allowed_set(frozenset(), None, BLOCS) == frozenset()


def test_header_narrows_the_tenant_set() -> None:
    assert allowed_set(EU, b"DE,FR", BLOCS) == {"DE", "FR"}
    assert allowed_set(EU, b" de , fr ", BLOCS) == {"DE", "FR"}


def test_header_never_widens_the_tenant_set() -> None:
    assert allowed_set(EU, b"DE,US", BLOCS) == {"DE"}
    assert allowed_set(frozenset({"DE"}), b"EU", BLOCS) == {"DE"}
    assert allowed_set(frozenset({"PE", "BR"}), b"ANDEAN,MERCOSUR,US", BLOCS) == {"PE", "BR"}


@pytest.mark.parametrize(
    ("tenant", "header"),
    [(EU, b"US"), (EU, b"US,PE,MERCOSUR"), (frozenset({"PE"}), b"EU"), (frozenset(), b"DE")],
)
def test_header_naming_only_outside_countries_is_403(tenant: frozenset[str], header: bytes) -> None:
    with pytest.raises(PermissionDeniedError) as info:
        allowed_set(tenant, header, BLOCS)
    assert info.value.code == "jurisdiction_not_allowed"
    assert info.value.status == 403


@pytest.mark.parametrize("header", [b"XX", b"DE,XX", b"EU;DE", b"DE,\xff", b"", b",", b" , "])
def test_bad_header_is_400(header: bytes) -> None:
    with pytest.raises(InvalidRequestError) as info:
        allowed_set(EU, header, BLOCS)
    assert info.value.param == HEADER.decode()
    assert info.value.status == 400


def test_unrestricted_tenant_takes_the_header_set() -> None:
    assert allowed_set(None, b"PE,BR", BLOCS) == {"PE", "BR"}
    assert allowed_set(None, b"EU", BLOCS) == EU
    with pytest.raises(InvalidRequestError):
        allowed_set(None, b"XX", BLOCS)


def test_configured_blocs_are_usable_in_the_header() -> None:
    blocs = merge_blocs({"dach": ["DE", "AT", "CH"]})
    assert allowed_set(None, b"dach", blocs) == {"DE", "AT", "CH"}
    assert allowed_set(EU, b"DACH", blocs) == {"DE", "AT"}


SOME = sorted(["DE", "FR", "AT", "US", "PE", "BR", "JP", "EU", "MERCOSUR", "ANDEAN"])


@given(
    tenant=st.none() | st.frozensets(st.sampled_from(SOME)),
    header=st.lists(st.sampled_from(SOME), min_size=1, max_size=5),
)
def test_allowed_set_property(tenant: frozenset[str] | None, header: list[str]) -> None:
    tenant_set = None if tenant is None else expand(tenant)
    wanted = expand(header)
    try:
        result = allowed_set(tenant_set, ",".join(header).encode(), BLOCS)
    except PermissionDeniedError:
        assert tenant_set is not None
        assert not wanted & tenant_set
        return
    assert result is not None
    assert result == (wanted if tenant_set is None else wanted & tenant_set)
    assert result
    if tenant_set is not None:
        assert result <= tenant_set


# -- ranking -------------------------------------------------------------------------------------
def make_point(
    name: str,
    jurisdiction: str,
    *,
    rtt_ms: float = 10.0,
    healthy: bool = True,
    models: tuple[str, ...] = (MODEL,),
    queued: int = 0,
    input_usd: float = 0.0,
    output_usd: float = 0.0,
    usd_per_hour: float = 0.0,
) -> PointState:
    config = PointConfig(
        name=name,
        site=name,
        region="r",
        jurisdiction=jurisdiction,
        tier="edge",
        rtt_ms=rtt_ms,
        url="http://127.0.0.1:1",
        prices=Prices(
            usd_per_hour=usd_per_hour,
            default=ModelPrice(input_usd_per_1m=input_usd, output_usd_per_1m=output_usd),
        ),
    )
    state = build_point_state(config, "http://127.0.0.1:1")
    state.healthy = healthy
    state.models = {m: ModelCard(m, "chat", 2048) for m in models}
    state.point_queued = queued
    return state


def names(candidates: list[Candidate]) -> list[str]:
    return [c.point.name for c in candidates]


def test_build_point_state_converts_prices_to_micros() -> None:
    state = make_point("p", "DE", input_usd=0.02, output_usd=0.04, usd_per_hour=2.5)
    assert state.default_price == Price(20_000, 40_000)
    assert state.usd_per_hour_micros == 2_500_000
    assert (state.host, state.port) == ("127.0.0.1", 1)
    assert state.price("anything") == state.default_price


def test_the_cheapest_fastest_point_is_never_used_outside_the_allowed_set() -> None:
    free_and_near = make_point("us-near", "US", rtt_ms=0)
    pricey_and_far = make_point("de-far", "DE", rtt_ms=5000, output_usd=100, usd_per_hour=1000)
    ranked = rank([free_and_near, pricey_and_far], MODEL, frozenset({"DE"}), 100, PLACEMENT)
    assert names(ranked) == ["de-far"]
    assert names(rank([free_and_near, pricey_and_far], MODEL, EU, 100, PLACEMENT)) == ["de-far"]


def test_unhealthy_points_are_excluded() -> None:
    points = [
        make_point("a", "DE", rtt_ms=1, healthy=False),
        make_point("b", "FR", rtt_ms=50),
        make_point("c", "AT", rtt_ms=20),
    ]
    assert names(rank(points, MODEL, EU, 10, PLACEMENT)) == ["c", "b"]


def test_no_compliant_point_up_is_503_even_if_others_are() -> None:
    points = [make_point("de", "DE", healthy=False), make_point("us", "US")]
    with pytest.raises(NoCompliantPointError) as info:
        rank(points, MODEL, EU, 10, PLACEMENT)
    assert info.value.status == 503


def test_model_served_only_outside_the_allowed_set_is_no_compliant_point() -> None:
    points = [make_point("de", "DE", models=("other",)), make_point("us", "US")]
    with pytest.raises(NoCompliantPointError):
        rank(points, MODEL, EU, 10, PLACEMENT)
    with pytest.raises(NoCompliantPointError):
        rank(points, MODEL, frozenset(), 10, PLACEMENT)


def test_model_served_nowhere_is_model_not_found() -> None:
    points = [make_point("de", "DE"), make_point("us", "US", healthy=False)]
    with pytest.raises(ModelNotFoundError) as info:
        rank(points, "gpt-17", None, 10, PLACEMENT)
    assert info.value.param == "model"
    assert info.value.status == 404
    with pytest.raises(ModelNotFoundError):
        rank([], MODEL, None, 10, PLACEMENT)


def test_lower_rtt_wins_at_equal_price() -> None:
    points = [make_point("far", "DE", rtt_ms=80), make_point("near", "FR", rtt_ms=20)]
    ranked = rank(points, MODEL, None, 10, PLACEMENT)
    assert names(ranked) == ["near", "far"]
    assert ranked[0].score_ms == 20
    assert ranked[1].score_ms == 80


def test_price_moves_traffic() -> None:
    # 2.5 USD/h is 694.4 micro-USD per second of the point: 694.4 ms at 1 ms per micro-USD.
    points = [
        make_point("near-gpu", "DE", rtt_ms=10, usd_per_hour=2.5),
        make_point("far-cpu", "FR", rtt_ms=100, usd_per_hour=0.04),
    ]
    ranked = rank(points, MODEL, None, 10, PLACEMENT)
    assert names(ranked) == ["far-cpu", "near-gpu"]
    assert ranked[1].score_ms == pytest.approx(10 + 2_500_000 / 3600)
    free = PlacementConfig(ms_per_micro_usd=0)
    assert names(rank(points, MODEL, None, 10, free)) == ["near-gpu", "far-cpu"]


def test_token_prices_use_the_nominal_prompt_and_the_requested_completion() -> None:
    point = make_point("p", "DE", rtt_ms=0, input_usd=2, output_usd=10)
    [candidate] = rank([point], MODEL, None, 1000, PLACEMENT)
    expected = (NOMINAL_PROMPT_TOKENS * 2_000_000 + 1000 * 10_000_000) / 1_000_000
    assert candidate.score_ms == pytest.approx(expected)


def test_a_long_queue_moves_traffic_away() -> None:
    near = make_point("near", "DE", rtt_ms=10, queued=3)
    far = make_point("far", "FR", rtt_ms=200)
    ranked = rank([near, far], MODEL, None, 10, PLACEMENT)
    assert names(ranked) == ["far", "near"]
    assert ranked[1].score_ms == 10 + 3 * PLACEMENT.queue_ms_per_request
    near.point_queued = 0
    assert names(rank([near, far], MODEL, None, 10, PLACEMENT)) == ["near", "far"]


def test_in_flight_requests_count_as_queue() -> None:
    near = make_point("near", "DE", rtt_ms=10)
    far = make_point("far", "FR", rtt_ms=300)
    near.gateway_in_flight = 1
    ranked = rank([near, far], MODEL, None, 10, PLACEMENT)
    assert names(ranked) == ["near", "far"]
    assert ranked[0].score_ms == 10 + 250
    near.point_in_flight = 2  # the point's own count includes ours: the larger one is used
    ranked = rank([near, far], MODEL, None, 10, PLACEMENT)
    assert names(ranked) == ["far", "near"]
    assert ranked[1].score_ms == 10 + 2 * 250


def test_requests_that_ended_since_the_points_report_no_longer_count() -> None:
    """A point's /load count is up to a poll interval old: requests this gateway saw end there
    since come off it, so a point that just finished its work is not scored as busy."""
    near = make_point("near", "DE", rtt_ms=10)
    far = make_point("far", "FR", rtt_ms=300)
    near.reported(0, 2)  # two of our requests running there, as the last poll said
    assert names(rank([near, far], MODEL, None, 10, PLACEMENT)) == ["far", "near"]
    near.gateway_in_flight = 2
    near.left()
    near.left()  # both answered since the poll
    assert near.running == 0
    assert names(rank([near, far], MODEL, None, 10, PLACEMENT)) == ["near", "far"]
    near.reported(0, 1)  # the next report starts the count again
    assert near.running == 1


def test_ties_break_by_name_whatever_the_input_order() -> None:
    points = [make_point(n, "DE", rtt_ms=10) for n in ("b", "c", "a")]
    assert names(rank(points, MODEL, None, 10, PLACEMENT)) == ["a", "b", "c"]
    assert names(rank(points[::-1], MODEL, None, 10, PLACEMENT)) == ["a", "b", "c"]


def test_default_topology_placement() -> None:
    config = default_config()
    points = [
        build_point_state(p, f"http://127.0.0.1:{9001 + i}") for i, p in enumerate(config.points)
    ]
    for p in points:
        p.healthy = True
        p.models = {MODEL: CARD}
    placement = config.gateway.placement
    assert names(rank(points, MODEL, None, 100, placement))[0] == "lima-edge"
    assert names(rank(points, MODEL, EU, 100, placement)) == ["frankfurt-regional"]
    assert names(rank(points, MODEL, expand(["US"]), 100, placement)) == ["virginia-central"]
    with pytest.raises(NoCompliantPointError):
        rank(points, MODEL, expand(["JP"]), 100, placement)


CODES = ["DE", "FR", "US", "PE", "BR"]
point_specs = st.lists(
    st.tuples(
        st.sampled_from(CODES),  # jurisdiction
        st.booleans(),  # healthy
        st.integers(0, 60_000),  # rtt_ms
        st.integers(0, 10_000_000),  # input micro-USD per 1M
        st.integers(0, 10_000_000),  # output micro-USD per 1M
        st.integers(0, 10_000_000),  # micro-USD per hour
        st.integers(0, 50),  # queued
        st.frozensets(st.sampled_from(["m1", "m2"])),  # models
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(
    specs=point_specs,
    allowed=st.none() | st.frozensets(st.sampled_from([*CODES, "JP"])),
    model=st.sampled_from(["m1", "m2"]),
    completion_tokens=st.integers(0, 100_000),
    ms_per_micro_usd=st.sampled_from([0.0, 0.001, 1.0, 10.0]),
)
def test_rank_property(
    specs: list[tuple[str, bool, int, int, int, int, int, frozenset[str]]],
    allowed: frozenset[str] | None,
    model: str,
    completion_tokens: int,
    ms_per_micro_usd: float,
) -> None:
    points = []
    for i, (code, healthy, rtt, inp, out, hour, queued, models) in enumerate(specs):
        point = make_point(
            f"p{i}",
            code,
            rtt_ms=rtt,
            healthy=healthy,
            models=tuple(sorted(models)),
            queued=queued,
            input_usd=inp / 1_000_000,
            output_usd=out / 1_000_000,
            usd_per_hour=hour / 1_000_000,
        )
        assert point.default_price == Price(inp, out)
        assert point.usd_per_hour_micros == hour
        points.append(point)
    config = PlacementConfig(ms_per_micro_usd=ms_per_micro_usd)

    def compliant(p: PointState) -> bool:
        return allowed is None or p.jurisdiction in allowed

    eligible = {p.name for p in points if p.healthy and model in p.models and compliant(p)}
    try:
        ranked = rank(points, model, allowed, completion_tokens, config)
    except ModelNotFoundError:
        assert not any(model in p.models for p in points)
        return
    except NoCompliantPointError:
        assert any(model in p.models for p in points)
        assert not eligible
        return
    assert {c.point.name for c in ranked} == eligible
    assert len(ranked) == len(eligible)
    for c in ranked:
        assert c.point.healthy
        assert model in c.point.models
        assert compliant(c.point)
        price = c.point.default_price
        cost = (
            NOMINAL_PROMPT_TOKENS * price.input_micros_per_1m
            + completion_tokens * price.output_micros_per_1m
        ) / 1_000_000 + c.point.usd_per_hour_micros / 3600
        expected = c.point.config.rtt_ms + 250 * c.point.queued + ms_per_micro_usd * cost
        assert math.isclose(c.score_ms, expected, rel_tol=1e-9, abs_tol=1e-9)
    keys = [(c.score_ms, c.point.name) for c in ranked]
    assert keys == sorted(keys)


@settings(max_examples=300, deadline=None)
@given(
    specs=point_specs,
    allowed=st.none() | st.frozensets(st.sampled_from([*CODES, "JP"])),
    completion_tokens=st.integers(0, 100_000),
    k=st.integers(1, 4),
    in_flight=st.lists(st.integers(0, 5), min_size=8, max_size=8),
)
def test_bounded_scan_gives_the_top_k_of_the_full_ranking(
    specs: list[tuple[str, bool, int, int, int, int, int, frozenset[str]]],
    allowed: frozenset[str] | None,
    completion_tokens: int,
    k: int,
    in_flight: list[int],
) -> None:
    """The gateway's index stops scanning early; it must still return exactly the best k."""
    points = []
    for i, (code, healthy, rtt, inp, out, hour, queued, _) in enumerate(specs):
        point = make_point(
            f"p{i}",
            code,
            rtt_ms=rtt,
            healthy=healthy,
            models=("m1",),
            queued=queued,
            input_usd=inp / 1_000_000,
            output_usd=out / 1_000_000,
            usd_per_hour=hour / 1_000_000,
        )
        point.gateway_in_flight = in_flight[i]
        points.append(point)
    index = PlacementIndex(points, PLACEMENT)
    try:
        full = rank(points, "m1", allowed, completion_tokens, PLACEMENT)
    except (ModelNotFoundError, NoCompliantPointError) as exc:
        with pytest.raises(type(exc)):
            index.rank("m1", allowed, completion_tokens, k)
        return
    top = index.rank("m1", allowed, completion_tokens, k)
    assert [(c.point.name, c.score_ms) for c in top] == [
        (c.point.name, c.score_ms) for c in full[:k]
    ]


def test_index_follows_model_changes() -> None:
    point = make_point("a", "DE", models=("m1",))
    index = PlacementIndex([point], PLACEMENT)
    assert names(index.rank("m1", None, 10, 3)) == ["a"]
    point.set_models({"m2": ModelCard("m2", "chat", 2048)})
    assert names(index.rank("m2", None, 10, 3)) == ["a"]
    with pytest.raises(ModelNotFoundError):
        index.rank("m1", None, 10, 3)


# -- pricing ---------------------------------------------------------------------------------
def test_one_million_tokens_cost_the_per_million_price() -> None:
    assert token_cost_micros(Price(20_000, 40_000), 1_000_000, 0) == 20_000
    assert token_cost_micros(Price(20_000, 40_000), 0, 1_000_000) == 40_000
    assert token_cost_micros(Price(20_000, 40_000), 1_000_000, 1_000_000) == 60_000


def test_cached_prompt_tokens_cost_their_own_price() -> None:
    """Worked example: 1M prompt tokens of which 600k came from the engine's prefix cache,
    at 20,000 micro-USD per 1M fresh and 5,000 per 1M cached, plus 100k completion tokens at
    40,000: 400k x 0.02 + 600k x 0.005 + 100k x 0.04 = 8,000 + 3,000 + 4,000 micro-USD."""
    price = Price(20_000, 40_000, 5_000)
    assert token_cost_micros(price, 1_000_000, 100_000, 600_000) == 15_000
    assert token_cost_micros(price, 1_000_000, 100_000, 0) == 24_000
    assert token_cost_micros(Price(20_000, 40_000), 1_000_000, 100_000, 600_000) == 24_000
    assert token_cost_micros(price, 10, 0, 50) == 1  # never more cached than the prompt
    config = PointConfig(
        name="p", site="s", region="r", jurisdiction="PE", tier="edge",
        prices=Prices(default=ModelPrice(input_usd_per_1m=0.02, cached_input_usd_per_1m=0.005)),
    )  # fmt: skip
    assert build_point_state(config, "http://127.0.0.1:1").default_price == Price(20_000, 0, 5_000)


def test_token_cost_rounds_up_to_a_whole_micro() -> None:
    assert token_cost_micros(Price(20_000, 0), 1, 0) == 1
    assert token_cost_micros(Price(20_000, 0), 50, 0) == 1  # exactly 1.0
    assert token_cost_micros(Price(20_000, 0), 51, 0) == 2  # 1.02
    # Rounding applies to the sum, not to each side.
    assert token_cost_micros(Price(500_000, 500_000), 1, 1) == 1


def test_worked_request() -> None:
    # 500 prompt at 0.02 USD/1M + 100 completion at 0.04 USD/1M = 10,000,000 + 4,000,000 / 1M.
    assert token_cost_micros(Price(20_000, 40_000), 500, 100) == 14


def test_hardware_cost() -> None:
    # 2.50 USD/h for 1.44 s: 2,500,000 × 1.44 / 3600 = 1,000 micro-USD exactly.
    assert hardware_cost_micros(2_500_000, 1_440_000_000) == 1_000
    assert hardware_cost_micros(2_500_000, 1_440_000_001) == 1_001
    assert hardware_cost_micros(2_500_000, 1) == 1
    assert hardware_cost_micros(2_500_000, 3_600_000_000_000) == 2_500_000
    assert hardware_cost_micros(2_500_000, -5) == 0
    assert hardware_cost_micros(0, 10**15) == 0


def test_zero_usage_is_free() -> None:
    assert token_cost_micros(Price(20_000, 40_000), 0, 0) == 0
    assert hardware_cost_micros(2_500_000, 0) == 0
    assert cost_micros(Price(20_000, 40_000), 2_500_000, 0, 0, 0) == 0


def test_cost_is_the_sum_of_both_rounded_parts() -> None:
    assert cost_micros(Price(20_000, 40_000), 2_500_000, 500, 100, 1_440_000_000) == 1_014
    assert cost_micros(Price(20_000, 0), 2_500_000, 1, 0, 1) == 2


def test_large_numbers_stay_exact() -> None:
    price = Price(10**12, 10**12)
    assert token_cost_micros(price, 10**9, 10**9 + 1) == 2 * 10**15 + 10**6
    assert isinstance(token_cost_micros(price, 10**9, 1), int)


@given(
    input_price=st.integers(0, 10**12),
    output_price=st.integers(0, 10**12),
    prompt=st.integers(0, 10**9),
    completion=st.integers(0, 10**9),
    per_hour=st.integers(0, 10**12),
    busy_ns=st.integers(0, 10**15),
)
def test_pricing_matches_exact_fractions(
    input_price: int, output_price: int, prompt: int, completion: int, per_hour: int, busy_ns: int
) -> None:
    price = Price(input_price, output_price)
    tokens = Fraction(prompt * input_price + completion * output_price, 10**6)
    hardware = Fraction(per_hour * busy_ns, 3_600_000_000_000)
    assert token_cost_micros(price, prompt, completion) == math.ceil(tokens)
    assert hardware_cost_micros(per_hour, busy_ns) == math.ceil(hardware)
    total = cost_micros(price, per_hour, prompt, completion, busy_ns)
    assert total == math.ceil(tokens) + math.ceil(hardware)
    if tokens > 0 or hardware > 0:
        assert total >= 1  # a request that used the point is never free


# -- usage ---------------------------------------------------------------------------------------
def test_usage_of_a_completion_body() -> None:
    body = {
        "id": "x",
        "choices": [],
        "usage": {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46},
    }
    assert usage_of(json.dumps(body).encode()) == Usage(12, 34)
    assert usage_of(b'{"usage":{"prompt_tokens":5}}') == Usage(5, 0)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"usage":{"prompt_tokens":-5,"completion_tokens":7}}', Usage(0, 7)),
        (b'{"usage":{"prompt_tokens":10000000000,"completion_tokens":1}}', Usage(10**9, 1)),
        (b'{"usage":{"prompt_tokens":18446744073709551616}}', Usage(10**9, 0)),
        (b'{"usage":{"prompt_tokens":-9223372036854775809}}', Usage(0, 0)),
    ],
)
def test_usage_of_clamps(raw: bytes, expected: Usage) -> None:
    assert usage_of(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"garbage",
        b"{",
        b"[1, 2]",
        b"{}",
        b'{"usage": null}',
        b'{"usage": 7}',
        b'{"usage": {"prompt_tokens": "3"}}',
        b'{"usage": {"prompt_tokens": 1.5}}',
        b'{"usage": {"prompt_tokens": true}}',
        b"\xff\xfe",
    ],
)
def test_usage_of_garbage_is_none(raw: bytes) -> None:
    assert usage_of(raw) is None


EVENTS = [
    b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n',
    b'data: {"choices":[{"delta":{"content":"lo\\n"}}]}\n\n',
    b": keep-alive comment\n\n",
    b"event: x\ndata: two lines\ndata: of data\n\n",
    b'data: {"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n',
    b"data: [DONE]\n\n",
]
STREAM = b"".join(EVENTS)


def test_sse_splitter_whole_stream() -> None:
    splitter = SseSplitter()
    assert splitter.feed(STREAM) == EVENTS
    assert splitter.rest() == b""


def test_sse_splitter_keeps_an_incomplete_tail() -> None:
    splitter = SseSplitter()
    assert splitter.feed(b"data: a\n\ndata: b\n") == [b"data: a\n\n"]
    assert splitter.rest() == b"data: b\n"
    assert splitter.rest() == b""
    assert splitter.feed(b"\n") == []


def test_sse_splitter_byte_by_byte() -> None:
    splitter = SseSplitter()
    events = [event for i in range(len(STREAM)) for event in splitter.feed(STREAM[i : i + 1])]
    assert events == EVENTS


def test_sse_splitter_limits_an_event() -> None:
    splitter = SseSplitter(max_event_bytes=64)
    assert splitter.feed(b"data: " + b"x" * 50 + b"\n\n") == [b"data: " + b"x" * 50 + b"\n\n"]
    assert splitter.feed(b"data: " + b"y" * 20) == []
    assert splitter.feed(b"y" * 26) == []  # 52 bytes buffered: still under the limit
    with pytest.raises(ValueError, match="size limit"):
        splitter.feed(b"y" * 26)


def test_sse_splitter_accepts_crlf_framing() -> None:
    """SSE lines may end in CRLF (WHATWG HTML §9.2.5), and sse-starlette, used by
    llama-cpp-python's OpenAI server, writes `\\r\\n` by default. A proxy point passes those
    bytes through, so the gateway's splitter must find these events too."""
    splitter = SseSplitter()
    events = splitter.feed(b'data: {"a":1}\r\n\r\ndata: {"usage":{"prompt_tokens":1}}\r\n\r\n')
    assert len(events) == 2
    assert events[0].startswith(b'data: {"a":1}')


@settings(max_examples=300)
@given(cuts=st.lists(st.integers(0, len(STREAM)), max_size=40))
def test_sse_splitter_any_split_gives_the_same_events(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    splitter = SseSplitter()
    events: list[bytes] = []
    for start, end in itertools.pairwise(bounds):
        events += splitter.feed(STREAM[start:end])
    assert events == EVENTS
    assert splitter.rest() == b""


@given(
    payloads=st.lists(
        # CR is a line terminator in SSE (it is normalised), never content.
        st.binary(max_size=30).filter(
            lambda b: b"\n\n" not in b and not b.endswith(b"\n") and b"\r" not in b
        ),
        max_size=10,
    ),
    data=st.data(),
)
def test_sse_splitter_random_events_random_splits(
    payloads: list[bytes], data: st.DataObject
) -> None:
    events = [b"data: " + p + b"\n\n" for p in payloads]
    stream = b"".join(events)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    bounds = [0, *sorted(cuts), len(stream)]
    splitter = SseSplitter()
    got: list[bytes] = []
    for start, end in itertools.pairwise(bounds):
        got += splitter.feed(stream[start:end])
    assert got == events


def test_requested_tier() -> None:
    from grifo.placement.jurisdiction import requested_tier

    assert requested_tier(None, None) is None
    assert requested_tier("edge", None) == "edge"
    assert requested_tier("edge", b"any") is None
    assert requested_tier(None, b" Central ") == "central"
    with pytest.raises(InvalidRequestError) as bad:
        requested_tier(None, b"orbital")
    assert bad.value.param == "x-grifo-tier"


def test_tier_filters_candidates() -> None:
    edge = make_point("edge-pe", "PE", rtt_ms=1)
    central = make_point("central-us", "US", rtt_ms=50)
    central.config = msgspec.structs.replace(central.config, tier="central")
    index = PlacementIndex([edge, central], PLACEMENT)
    assert names(index.rank(MODEL, None, 10, 3, "central")) == ["central-us"]
    assert names(index.rank(MODEL, None, 10, 3, None)) == ["edge-pe", "central-us"]
    with pytest.raises(NoCompliantPointError, match="regional point"):
        index.rank(MODEL, None, 10, 3, "regional")


# -- hardware sharing ------------------------------------------------------------------------------
def test_busy_clock_worked_examples() -> None:
    from grifo.metering.sharing import BusyClock

    s = 1_000_000_000
    alone = BusyClock()
    mark = alone.enter(0)
    assert alone.leave(mark, 2 * s) == 2 * s
    together = BusyClock()
    a, b = together.enter(0), together.enter(0)
    assert (together.leave(a, 2 * s), together.leave(b, 2 * s)) == (s, s)
    nested = BusyClock()  # A runs 0-3 s, B 1-2 s
    a = nested.enter(0)
    b = nested.enter(1 * s)
    share_b = nested.leave(b, 2 * s)
    share_a = nested.leave(a, 3 * s)
    assert (share_a, share_b) == (2.5 * s, 0.5 * s)
    assert share_a + share_b == 3 * s
    idle = BusyClock()  # gaps between requests are billed to nobody
    first = idle.enter(0)
    idle.leave(first, s)
    second = idle.enter(10 * s)
    assert idle.leave(second, 11 * s) == s
    assert idle.in_flight == 0


@given(
    spans=st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(1, 10_000)), min_size=1, max_size=20
    )
)
def test_shares_add_up_to_the_busy_time(spans: list[tuple[int, int]]) -> None:
    """Whatever the overlap, the shares sum to the time at least one request was in flight."""
    from grifo.metering.sharing import BusyClock

    clock = BusyClock()
    events = sorted(
        [(start, 1, i) for i, (start, _) in enumerate(spans)]
        + [(start + length, 0, i) for i, (start, length) in enumerate(spans)]
    )
    marks: dict[int, float] = {}
    shares = []
    for t, kind, i in events:
        if kind == 1:
            marks[i] = clock.enter(t)
        else:
            shares.append(clock.leave(marks[i], t))
    covered = set()
    for start, length in spans:
        covered.update(range(start, start + length))
    assert abs(sum(shares) - len(covered)) <= len(spans)  # each share rounds to a whole ns


def test_batched_request_pays_its_share_of_the_hour() -> None:
    price = Price(0, 0)
    hour = 3_600_000_000  # 3,600 USD per hour: one micro-USD per microsecond
    assert cost_micros(price, hour, 0, 0, 2_000_000_000) == 2_000_000
    assert cost_micros(price, hour, 0, 0, 2_000_000_000 // 8) == 250_000  # 1 of 8 in a batch


def test_ejection_grows_with_each_ejection_and_is_capped() -> None:
    from grifo.config.model import EjectionConfig

    ejection = EjectionConfig(consecutive_failures=2, base_s=30, max_s=70)
    point = make_point("p", "PE")
    point.failed(0.0, ejection)
    assert point.healthy
    point.succeeded()  # a success in between resets the count
    point.failed(1.0, ejection)
    assert point.healthy
    point.failed(2.0, ejection)
    assert not point.healthy
    assert (point.ejected(31.9), point.ejected(32.0)) == (True, False)
    point.failed(40.0, ejection)
    point.failed(40.0, ejection)
    assert point.ejected_until == 100.0  # 60 s the second time
    point.failed(200.0, ejection)
    point.failed(200.0, ejection)
    assert point.ejected_until == 270.0  # capped at 70 s


def test_a_queue_the_point_reported_drains_as_its_requests_end_here() -> None:
    """Between polls a point's reported queue is corrected like its running count: requests
    that ended here beyond those it was running had been waiting (a sequential engine reports a
    request queued until its thread picks it up)."""
    point = make_point("p", "DE")
    point.gateway_in_flight = 3
    point.reported(queued=1, in_flight=0)  # polled before the engine took the request
    assert point.queued == 1
    point.left()
    assert point.queued == 0
    point.reported(queued=2, in_flight=1)
    point.left()  # the running one ended
    assert (point.queued, point.running) == (2, 1)  # our two remaining requests
    point.left()
    assert point.queued == 1
    point.reported(queued=1, in_flight=1)
    assert point.queued == 1  # a fresh report stands as it is
