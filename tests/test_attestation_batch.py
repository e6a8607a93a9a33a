"""Attestations of answers completed in one event-loop turn share one signature."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
from collections.abc import Callable, Coroutine
from typing import Any

import openai
import pytest
from nacl.signing import SigningKey

from grifo.audit import merkle
from grifo.audit.batch import BatchAttester
from grifo.audit.signing import (
    CheckpointError,
    Claims,
    Signer,
    b64url,
    batch_statement,
    verify_attestation,
)
from tests.support.fabric import CHAT, Fabric

Run = Callable[[Coroutine[Any, Any, None]], None]


def _claims(n: int) -> Claims:
    return Claims(
        request_id=f"req-{n}", point="lima-edge", jurisdiction="PE", model="m", log="gw/0",
        seq=n, ts_ms=n,
    )  # fmt: skip


def test_a_turns_answers_share_a_signature_and_each_proves_only_its_own_claims(run: Run) -> None:
    key = Signer("gw", SigningKey.generate())
    attester = BatchAttester(key)

    tokens: list[str] = []

    async def main() -> None:
        tokens.extend(await asyncio.gather(*(attester.attest(_claims(n)) for n in range(7))))
        tokens.append(await attester.attest(_claims(99)))

    run(main())
    together, alone = tokens[:7], tokens[7]
    assert (attester.batches, attester.signed) == (2, 8)
    assert len({token.split(".")[1] for token in together}) == 1  # one signature for seven
    for n, token in enumerate(together):
        assert token.count(".") == 2
        assert verify_attestation(token, key.public_key) == _claims(n)
    assert alone.count(".") == 1  # a lone answer's token is the plain one
    assert verify_attestation(alone, key.public_key) == _claims(99)

    payload, signature, proof = together[3].split(".")
    other = SigningKey.generate().verify_key
    swapped = together[4].split(".")[0]  # another answer's claims with this one's proof
    raw = bytearray(base64.urlsafe_b64decode(proof + "=="))
    raw[-1] ^= 1
    for forged in (
        f"{swapped}.{signature}.{proof}",
        f"{payload}.{signature}.{b64url(bytes(raw))}",
        f"{payload}.{signature}.{b64url(bytes(raw[:-32]))}",  # a path cut short
        f"{payload}.{signature}.{b64url(b'x' * 9)}",
        f"{payload}.{signature}",  # the batch signature is not over the claims
    ):
        with pytest.raises(CheckpointError):
            verify_attestation(forged, key.public_key)
    with pytest.raises(CheckpointError):
        verify_attestation(together[3], other)


def test_a_batch_statement_cannot_pass_for_claims() -> None:
    """What a batch signature covers is not JSON: no token made from it decodes as claims."""
    key = Signer("gw", SigningKey.generate())
    statement = batch_statement(2, merkle.leaf_hash(b"x"))
    token = f"{b64url(statement)}.{b64url(key.sign(statement))}"
    with pytest.raises(Exception):  # noqa: B017, PT011 - msgspec's decode error, any kind
        verify_attestation(token, key.public_key)


def test_concurrent_answers_through_the_gateway_all_verify(fabric: Fabric) -> None:
    client = fabric.client("demo-eu")

    def ask(i: int) -> dict[str, str]:
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT, messages=[{"role": "user", "content": f"batch {i}"}]
        )
        return dict(raw.headers)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(48)))
    audit = fabric.running.gateway.audit
    assert audit is not None
    public = audit.signer.public_key
    for headers in answers:
        claims = verify_attestation(headers["x-grifo-attestation"], public)
        assert claims.request_id == headers["x-request-id"]
        assert claims.point == headers["x-grifo-point"]


def test_a_lone_answer_is_signed_at_once_and_verifies() -> None:
    key = Signer("gw", SigningKey.generate())
    attester = BatchAttester(key)
    token = attester.attest_alone(_claims(5))
    assert (attester.batches, attester.signed) == (1, 1)
    assert token.count(".") == 1
    assert verify_attestation(token, key.public_key) == _claims(5)


def test_one_request_at_a_time_is_signed_alone_and_leaves_nothing_counted(fabric: Fabric) -> None:
    client = fabric.client("demo-eu")
    gateway = fabric.running.gateway
    assert gateway.audit is not None
    assert gateway.answers.attester is not None
    before = gateway.answers.attester.batches
    for i in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT, messages=[{"role": "user", "content": f"alone {i}"}]
        )
        token = raw.headers["x-grifo-attestation"]
        assert token.count(".") == 1  # nothing to share a signature with
        assert (
            verify_attestation(token, gateway.audit.signer.public_key).request_id
            == (raw.headers["x-request-id"])
        )
    with pytest.raises(openai.NotFoundError):  # a refused request is counted out as well
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    assert gateway.answers.attester.batches - before == 3
    assert gateway.answers.serving == 0


def test_metrics_count_records_attestations_and_the_signatures_they_share(
    fabric: Fabric,
) -> None:
    """`/metrics` says how many answers were attested and with how many signatures: as many as
    the distinct signatures in the tokens the clients received."""
    client = fabric.client("demo-eu")

    def ask(i: int) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT, messages=[{"role": "user", "content": f"counted {i}"}]
        )
        return raw.headers["x-grifo-attestation"]

    before = fabric.metrics()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        tokens = list(pool.map(ask, range(48)))
    tokens += [ask(48), ask(49)]  # alone: a signature each
    with pytest.raises(openai.NotFoundError):  # refused: a record, no attestation
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    after = fabric.metrics()

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert grew("grifo_attestations_total") == 50
    assert grew("grifo_attestation_signatures_total") == len({t.split(".")[1] for t in tokens})
    assert grew("grifo_audit_records_total") == 51
    assert after['grifo_store_up{store="audit"}'] == 1
    assert after["grifo_audit_spool_backlog_segments"] == 0
