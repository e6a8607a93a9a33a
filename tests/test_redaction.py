"""Personal data is redacted before a request crosses into a jurisdiction that may only see it
redacted; the rules are checked against valid and invalid identifiers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from grifo.config.load import ConfigError, parse_config
from grifo.guardrails.pii import cpf_valid, iban_valid, luhn, redact
from tests.support.fabric import CHAT, Fabric, topology_yaml


@pytest.mark.parametrize(
    ("text", "expected", "kinds"),
    [
        ("mail ana.silva@example.com.br now", "mail [EMAIL] now", {"EMAIL": 1}),
        ("call +55 11 98765-4321", "call [PHONE]", {"PHONE": 1}),
        ("or (11) 98765-4321 or 987 654 321", "or [PHONE] or [PHONE]", {"PHONE": 2}),
        ("card 4111 1111 1111 1111.", "card [CARD].", {"CARD": 1}),
        ("CPF 529.982.247-25", "CPF [CPF]", {"CPF": 1}),
        ("cpf 52998224725", "cpf [CPF]", {"CPF": 1}),
        ("DNI: 45678912", "DNI: [DNI]", {"DNI": 1}),
        ("IBAN DE89 3704 0044 0532 0130 00", "IBAN [IBAN]", {"IBAN": 1}),
    ],
)
def test_personal_data_is_found_and_replaced(
    text: str, expected: str, kinds: dict[str, int]
) -> None:
    redacted, found = redact(text)
    assert (redacted, dict(found)) == (expected, kinds)


@pytest.mark.parametrize(
    "text",
    [
        "invoice 2026112612345 of 2026-11-26 for 1 500 000 units at 1500 USD",
        "CPF 123.456.789-00 is not a valid CPF",
        "the year 20261126 and port 8080",
    ],
)
def test_numbers_that_fail_their_checks_are_left_alone(text: str) -> None:
    assert redact(text) == (text, {})


def test_check_digit_rules() -> None:
    assert luhn("4111111111111111")
    assert not luhn("4111111111111112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32")
    assert not iban_valid("GB82 WEST 1234 5698 7654 33")
    assert cpf_valid("529.982.247-25")
    assert not cpf_valid("111.111.111-11")


REDACTED = (
    "{name: demo-eu, allowed_jurisdictions: [EU], default_data_class: personal, "
    "data_classes: {personal: [DE]}, redacted_to: {personal: [US]}}"
)


@pytest.fixture(scope="module")
def redacting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    text = topology_yaml().replace("{name: demo-eu, allowed_jurisdictions: [EU]}", REDACTED)
    fab = Fabric.from_yaml(text, tmp_path_factory.mktemp("redact"))
    yield fab
    fab.close()


def ask(fab: Fabric, content: str, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
    raw = fab.client("demo-eu").chat.completions.with_raw_response.create(
        model=CHAT, messages=[{"role": "user", "content": content}], extra_headers=headers
    )
    return raw.parse().choices[0].message.content or "", dict(raw.headers)


def test_text_is_redacted_before_it_leaves_for_a_redacted_only_jurisdiction(
    redacting: Fabric,
) -> None:
    secret = "mail ana@example.com phone +51 987654321"
    answer, headers = ask(redacting, secret, {"x-grifo-allowed-jurisdictions": "US"})
    assert headers["x-grifo-jurisdiction"] == "US"
    assert "ana@example.com" not in answer, "the US point saw the address"
    assert "[EMAIL]" in answer  # the fake engine echoes what it received
    assert headers["x-grifo-redacted"] == "EMAIL:1,PHONE:1"
    deadline = time.monotonic() + 5
    while True:
        tables = redacting.running.db.open_audit()
        try:
            rows = {r.request_id: r for log in tables.logs() for r in tables.records_from(log, 0)}
        finally:
            tables.close()
        if headers["x-request-id"] in rows or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    record = json.loads(rows[headers["x-request-id"]].record)
    assert (record["redacted"], record["jurisdiction"]) == ("EMAIL:1,PHONE:1", "US")


def test_text_that_stays_in_its_own_jurisdiction_is_not_redacted(redacting: Fabric) -> None:
    answer, headers = ask(
        redacting, "mail ana@example.com", {"x-grifo-allowed-jurisdictions": "DE"}
    )
    assert headers["x-grifo-jurisdiction"] == "DE"
    assert "ana@example.com" in answer
    assert "x-grifo-redacted" not in headers


def test_redacted_to_must_name_a_data_class() -> None:
    bad = REDACTED.replace("redacted_to: {personal", "redacted_to: {medical")
    with pytest.raises(ConfigError, match=r"redacted_to.medical: not one of its data_classes"):
        parse_config(
            topology_yaml().replace("{name: demo-eu, allowed_jurisdictions: [EU]}", bad), "t"
        )
