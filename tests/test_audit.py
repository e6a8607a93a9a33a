"""The audit log: Merkle proofs, signed checkpoints, attestations, and an offline verifier that
names every kind of tampering."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.client
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
from nacl.signing import SigningKey, VerifyKey

from grifo.audit import merkle
from grifo.audit.record import GENESIS, AuditRecord, canonical, decode, entry_hash, tenant_key
from grifo.audit.setup import gateway_name, signer
from grifo.audit.signing import (
    CheckpointError,
    Claims,
    Signer,
    load_or_create,
    load_public,
    public_pem,
    verify_attestation,
    verify_checkpoint,
)
from grifo.audit.verify import export, verify
from grifo.config.load import parse_config
from grifo.store.audit_sql import iter_logs
from grifo.store.sqlite import StateDB
from tests.support.fabric import CHAT, Fabric, post_chat, topology_yaml


def leaves(n: int) -> list[bytes]:
    return [merkle.leaf_hash(f"record {i}".encode()) for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 33])
def test_compact_range_and_inclusion_proofs_agree_with_rfc6962(n: int) -> None:
    tree = merkle.CompactRange()
    for leaf in leaves(n):
        tree.append(leaf)
    root = merkle.root(leaves(n))
    assert tree.root() == root
    restarted = merkle.CompactRange(tree.size, tree.peaks)
    restarted.append(merkle.leaf_hash(b"next"))
    assert restarted.root() == merkle.root([*leaves(n), merkle.leaf_hash(b"next")])
    for i in range(n):
        proof = merkle.inclusion_proof(leaves(n), i)
        assert merkle.verify_inclusion(leaves(n)[i], i, n, proof, root)
        assert not merkle.verify_inclusion(merkle.leaf_hash(b"forged"), i, n, proof, root)
        if n > 1:
            assert not merkle.verify_inclusion(leaves(n)[i], (i + 1) % n, n, proof, root)


def test_rfc6962_empty_and_two_leaf_roots() -> None:
    assert merkle.root([]) == hashlib.sha256(b"").digest()
    a, b = merkle.leaf_hash(b"a"), merkle.leaf_hash(b"b")
    assert merkle.root([a, b]) == hashlib.sha256(b"\x01" + a + b).digest()


def test_checkpoints_and_attestations_verify_only_with_the_right_key() -> None:
    key = Signer("gw", SigningKey.generate())
    other = SigningKey.generate().verify_key
    note = key.sign_checkpoint("gw/0", 42, b"\x07" * 32)
    assert verify_checkpoint(note, "gw", key.public_key) == ("gw/0", 42, b"\x07" * 32)
    with pytest.raises(CheckpointError):
        verify_checkpoint(note.replace("\n42\n", "\n43\n"), "gw", key.public_key)
    with pytest.raises(CheckpointError):
        verify_checkpoint(note, "gw", other)
    claims = Claims(
        request_id="req-1", point="lima-edge", jurisdiction="PE", model="m", log="gw/0",
        seq=3, ts_ms=1,
    )  # fmt: skip
    token = key.attest(claims)
    assert verify_attestation(token, key.public_key) == claims
    payload, signature = token.split(".")
    forged = payload.replace(payload[5], "A" if payload[5] != "A" else "B") + "." + signature
    with pytest.raises(CheckpointError):
        verify_attestation(forged, key.public_key)
    with pytest.raises(CheckpointError):
        verify_attestation(token, other)
    with pytest.raises(CheckpointError):  # a cut signature is refused, not an internal error
        verify_attestation(f"{payload}.{signature[:20]}", key.public_key)


def test_key_files_are_the_standard_ed25519_pem_forms_both_ways(tmp_path: Path) -> None:
    """Keys grifo writes are read by `cryptography` (OpenSSL's PKCS#8 and SubjectPublicKeyInfo),
    keys `cryptography` writes (an older grifo's, or `openssl genpkey`'s) are read by grifo,
    and a signature made by one verifies with the other's key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    ours = load_or_create(tmp_path / "ours.pem", "gw")
    assert (tmp_path / "ours.pem").stat().st_mode & 0o777 == 0o600
    theirs = serialization.load_pem_private_key((tmp_path / "ours.pem").read_bytes(), None)
    assert isinstance(theirs, Ed25519PrivateKey)
    assert theirs.public_key().public_bytes_raw() == bytes(ours.public_key)
    public = serialization.load_pem_public_key(public_pem(ours.public_key).encode())
    assert isinstance(public, Ed25519PublicKey)
    public.verify(ours.sign(b"checkpoint"), b"checkpoint")  # raises if it does not verify
    assert load_or_create(tmp_path / "ours.pem", "gw").public_key == ours.public_key

    key = Ed25519PrivateKey.generate()
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "theirs.pem").write_bytes(pkcs8)
    loaded = load_or_create(tmp_path / "theirs.pem", "gw")
    assert bytes(loaded.public_key) == key.public_key().public_bytes_raw()
    assert loaded.sign(b"x") == key.sign(b"x")  # Ed25519 is deterministic
    spki = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert load_public(spki) == loaded.public_key
    # Text before the block (RFC 7468 allows it) is not the plain form: `cryptography` reads it.
    (tmp_path / "noted.pem").write_bytes(b"grifo audit key\n" + pkcs8)
    assert load_or_create(tmp_path / "noted.pem", "gw").public_key == loaded.public_key
    assert load_public(b"grifo audit key\n" + spki) == loaded.public_key

    ec = generate_private_key(SECP256R1())
    (tmp_path / "ec.pem").write_bytes(
        ec.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(CheckpointError, match="not an Ed25519 private key"):
        load_or_create(tmp_path / "ec.pem", "gw")
    (tmp_path / "junk.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n")
    with pytest.raises(CheckpointError, match="not a readable PEM private key"):
        load_or_create(tmp_path / "junk.pem", "gw")
    ec_public = ec.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(CheckpointError, match="not an Ed25519 public key"):
        load_public(ec_public)
    with pytest.raises(CheckpointError, match="not a PEM public key"):
        load_public(b"nothing")


@pytest.fixture(scope="module")
def audited(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, list[dict[str, str]]]:
    """A fabric that served traffic for two tenants, then stopped, then served more (the log
    continues across the restart); returns the state directory and the responses' headers."""
    state = tmp_path_factory.mktemp("audit")
    text = topology_yaml().replace(
        "health_interval_s: 0.2}", "health_interval_s: 0.2, audit: {checkpoint_every: 7}}"
    )
    answers = []
    for _ in range(2):
        fab = Fabric.from_yaml(text, state)
        for tenant in ("demo-eu", "demo-latam", "demo-global"):
            client = fab.client(tenant)
            for i in range(5):
                raw = client.chat.completions.with_raw_response.create(
                    model=CHAT, messages=[{"role": "user", "content": f"audit me {i}"}]
                )
                answers.append(dict(raw.headers))
            stream = client.chat.completions.create(
                model=CHAT, messages=[{"role": "user", "content": "stream"}], stream=True
            )
            for _ in stream:
                pass
        fab.close()
    return state, answers


def _export(state: Path, out: Path, tenant: str | None = None) -> int:
    config = parse_config(topology_yaml(), "test")
    db = StateDB(state / "grifo.db")
    tables = db.open_audit()
    try:
        key = signer(config, state)
        return export(iter_logs(tables), out, public_pem(key.public_key), tenant=tenant)
    finally:
        tables.close()
        db.close()


def test_every_response_is_attested_and_the_attestation_verifies(
    audited: tuple[Path, list[dict[str, str]]],
) -> None:
    state, answers = audited
    key = signer(parse_config(topology_yaml(), "test"), state)
    for headers in answers:
        claims = verify_attestation(headers["x-grifo-attestation"], key.public_key)
        assert claims.request_id == headers["x-request-id"]
        assert (claims.point, claims.jurisdiction) == (
            headers["x-grifo-point"],
            headers["x-grifo-jurisdiction"],
        )


def test_the_whole_log_verifies_across_a_restart(
    audited: tuple[Path, list[dict[str, str]]], tmp_path: Path
) -> None:
    state, _answers = audited
    assert _export(state, tmp_path / "x") == 36, "18 requests per run (15 whole, 3 streamed)"
    report = verify(tmp_path / "x", _public(tmp_path / "x"), point_keys=_point_keys(state))
    assert report.problems == []
    assert (report.logs, report.records) == (1, 36)
    assert report.checkpoints >= 5
    assert (report.receipts, report.unchecked) == (36, 0), "every record carries its receipt"
    lines = [
        json.loads(line) for line in (tmp_path / "x" / "records.jsonl").read_text().splitlines()
    ]
    assert [line["seq"] for line in lines] == list(range(36))
    instance = (state / "audit-instance").read_text().strip()
    assert lines[0]["log"] == f"{gateway_name(parse_config(topology_yaml(), 't'))}/{instance}/0"
    cli = subprocess.run(
        [sys.executable, "-m", "grifo", "audit", "verify", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "verified" in cli.stdout


def test_a_tenant_export_holds_only_its_records_and_still_verifies(
    audited: tuple[Path, list[dict[str, str]]], tmp_path: Path
) -> None:
    state, _ = audited
    assert _export(state, tmp_path / "eu", tenant="demo-eu") == 12
    lines = (tmp_path / "eu" / "records.jsonl").read_text().splitlines()
    full = [json.loads(line) for line in lines if '"record"' in line]
    assert {json.loads(r["record"])["tenant"] for r in full} == {"demo-eu"}
    assert {json.loads(r["record"])["jurisdiction"] for r in full} <= {"DE"}, "EU only: Frankfurt"
    assert verify(tmp_path / "eu", _public(tmp_path / "eu")).problems == []
    assert "DE" in (tmp_path / "eu" / "summary.txt").read_text()


def _tamper_edit(lines: list[str]) -> list[str]:
    line = json.loads(lines[10])
    record = json.loads(line["record"])
    record["jurisdiction"] = "US" if record["jurisdiction"] != "US" else "DE"
    line["record"] = json.dumps(record, separators=(",", ":"))
    return [*lines[:10], json.dumps(line), *lines[11:]]


TAMPERING = {
    "edited": (_tamper_edit, "record 10 was edited"),
    "deleted": (lambda lines: lines[:10] + lines[11:], "deleted"),
    "inserted": (lambda lines: [*lines[:10], lines[10], *lines[10:]], "inserted"),
    "reordered": (lambda lines: [*lines[:10], lines[11], lines[10], *lines[12:]], "order"),
    "truncated": (lambda lines: lines[:-8], "records at the end were deleted"),
}


@pytest.mark.parametrize("kind", sorted(TAMPERING))
def test_tampering_is_detected_and_named(
    audited: tuple[Path, list[dict[str, str]]], tmp_path: Path, kind: str
) -> None:
    state, _ = audited
    clean = tmp_path / "clean"
    _export(state, clean)
    bad = tmp_path / kind
    shutil.copytree(clean, bad)
    change, expected = TAMPERING[kind]
    lines = (bad / "records.jsonl").read_text().splitlines()
    (bad / "records.jsonl").write_text("\n".join(change(lines)) + "\n")
    report = verify(bad, _public(bad))
    assert not report.ok
    assert any(expected in problem for problem in report.problems), report.problems
    cli = subprocess.run(
        [sys.executable, "-m", "grifo", "audit", "verify", str(bad)], capture_output=True, text=True
    )
    assert cli.returncode == 1
    assert "FAIL" in cli.stdout


def _public(directory: Path) -> VerifyKey:
    return load_public((directory / "public-key.pem").read_bytes())


def test_a_stream_ends_with_its_attestation(fabric: Fabric) -> None:
    body = json.dumps(
        {"model": CHAT, "messages": [{"role": "user", "content": "a b c"}], "stream": True}
    )
    conn = http.client.HTTPConnection("127.0.0.1", int(fabric.url.rsplit(":", 1)[1]), timeout=10)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body,
        {
            "authorization": f"Bearer {fabric.keys['demo-latam']}",
            "content-type": "application/json",
        },
    )
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    assert "data: [DONE]" in text
    comment = text.rsplit("\n\n", 2)[-2]
    assert comment.startswith(": x-grifo-attestation "), text[-300:]
    key = signer(parse_config(topology_yaml(), "test"), fabric.state_dir)
    claims = verify_attestation(comment.split(" ", 2)[2], key.public_key)
    assert claims.request_id == response.headers["x-request-id"]
    assert claims.point == response.headers["x-grifo-point"]
    assert claims.jurisdiction in {"PE", "BR"}
    record = fabric.audit_record(claims.request_id)
    assert record.received_ms <= record.first_token_ms <= record.done_ms  # when output began


def test_streams_are_attested_by_the_batch_signer_each_for_itself(fabric: Fabric) -> None:
    """A stream's attestation comes from the same per-turn batches as whole answers (streams
    that end together share a signature), and still proves its own request's claims."""
    attester = fabric.running.gateway.answers.attester
    assert attester is not None
    signed = attester.signed
    key, port = fabric.keys["demo-latam"], fabric.running.port
    body = {"model": CHAT, "messages": [{"role": "user", "content": "a b c"}], "stream": True}

    async def streams() -> list[bytes]:
        return await asyncio.gather(*(post_chat(port, key, body) for _ in range(8)))

    public = signer(parse_config(topology_yaml(), "test"), fabric.state_dir).public_key
    for raw in asyncio.run(streams()):
        request_id = re.search(rb"\r\nx-request-id: (\S+)\r\n", raw)
        token = re.search(rb"\n: x-grifo-attestation (\S+)\n\n", raw)
        assert request_id is not None, raw[:400]
        assert token is not None, raw[-400:]
        claims = verify_attestation(token.group(1).decode(), public)
        assert claims.request_id == request_id.group(1).decode()
    assert attester.signed == signed + 8


def test_a_tenant_can_prove_what_it_sent_and_received(fabric: Fabric) -> None:
    """The record's HMACs are HMAC-SHA-256 of the bodies as they crossed the wire, under the
    tenant's key: each request's own, though the log keys a tenant's HMAC once."""
    port = int(fabric.url.rsplit(":", 1)[1])
    key = tenant_key((fabric.state_dir / "audit-hmac.key").read_bytes(), "demo-latam")
    for text in ("first", "second, longer than the first"):
        body = json.dumps({"model": CHAT, "messages": [{"role": "user", "content": text}]})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(
            "POST",
            "/v1/chat/completions",
            body,
            {"authorization": f"Bearer {fabric.keys['demo-latam']}"},
        )
        response = conn.getresponse()
        answer = response.read()
        conn.close()
        assert response.status == 200, answer
        record = fabric.audit_record(response.headers["x-request-id"])
        assert record.input_hmac == hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
        assert record.output_hmac == hmac.new(key, answer, hashlib.sha256).hexdigest()


def test_a_whole_answer_has_no_first_token_time(fabric: Fabric) -> None:
    raw = fabric.client("demo-latam").chat.completions.with_raw_response.create(
        model=CHAT, messages=[{"role": "user", "content": "a b"}], max_tokens=2
    )
    record = fabric.audit_record(raw.headers["x-request-id"])
    assert record.first_token_ms == 0
    assert b"first_token_ms" not in canonical(record)  # old records keep their form


def _point_keys(state: Path) -> dict[str, VerifyKey]:
    return {
        path.stem: load_or_create(path, path.stem).public_key
        for path in (state / "points").glob("*.pem")
    }


def test_a_gateway_cannot_rewrite_where_a_request_ran(
    audited: tuple[Path, list[dict[str, str]]], tmp_path: Path
) -> None:
    """Even with its own signing key, a gateway that rewrites a record's jurisdiction and
    re-signs the whole log is caught by the point's receipt."""
    state, _ = audited
    out = tmp_path / "rewritten"
    _export(state, out)
    gateway = signer(parse_config(topology_yaml(), "test"), state)
    lines = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    prev, leaves, rewritten = GENESIS, [], []
    for line in lines:
        record = decode(line["record"])
        changes: dict[str, object] = {"prev_hash": prev}
        if line["seq"] == 3:
            # A place the request was allowed to go, so only the receipt can tell.
            places = sorted(record.allowed) if record.allowed else ["DE", "US"]
            changes["jurisdiction"] = next(j for j in places if j != record.jurisdiction)
        record = msgspec.structs.replace(record, **changes)
        data = canonical(record)
        prev = entry_hash(record.prev_hash, data)
        leaves.append(merkle.leaf_hash(data))
        rewritten.append(json.dumps({**line, "record": data.decode()}))
    (out / "records.jsonl").write_text("\n".join(rewritten) + "\n")
    marks = [json.loads(m) for m in (out / "checkpoints.jsonl").read_text().splitlines()]
    for mark in marks:
        mark["note"] = gateway.sign_checkpoint(
            mark["log"], mark["size"], merkle.root(leaves[: mark["size"]])
        )
    (out / "checkpoints.jsonl").write_text("\n".join(json.dumps(m) for m in marks) + "\n")
    assert verify(out, _public(out)).problems == [], "chain and checkpoints were re-signed"
    report = verify(out, _public(out), point_keys=_point_keys(state))
    assert len(report.problems) == 1
    assert "record 3 says" in report.problems[0]
    assert "the point signed" in report.problems[0]


def test_refused_and_failed_requests_have_records_too(fabric: Fabric) -> None:
    port = int(fabric.url.rsplit(":", 1)[1])

    def send(key: str, body: dict[str, object]) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"authorization": f"Bearer {key}"}
        )
        response = conn.getresponse()
        response.read()
        conn.close()
        return response.status, response.headers["x-request-id"]

    chat = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}]}
    cases = {
        send("grf-00000000-wrong", chat): "refused:401:invalid_api_key",
        send(fabric.keys["demo-eu"], {**chat, "model": "nope"}): "refused:404:model_not_found",
        send(fabric.keys["demo-eu"], {**chat, "temperature": "hot"}): "refused:400:",
    }
    deadline = time.monotonic() + 5
    while True:
        tables = fabric.running.db.open_audit()
        try:
            rows = {r.request_id: r for log in tables.logs() for r in tables.records_from(log, 0)}
        finally:
            tables.close()
        if all(rid in rows for _, rid in cases) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for (status, request_id), expected in cases.items():
        record = decode(rows[request_id].record)
        assert record.status.startswith(expected), (status, record.status)
        assert (record.point, record.cost_micros) == ("", 0), "no point saw it, nothing billed"
    assert decode(rows[next(rid for s, rid in cases if s == 401)].record).tenant == ""
    assert decode(rows[next(rid for s, rid in cases if s == 404)].record).tenant == "demo-eu"


def test_pruned_records_keep_the_log_verifiable(
    audited: tuple[Path, list[dict[str, str]]], tmp_path: Path
) -> None:
    state, _ = audited
    copy = tmp_path / "state"
    shutil.copytree(state, copy)
    db = StateDB(copy / "grifo.db")
    tables = db.open_audit()
    rows = [r for log in tables.logs() for r in tables.records_from(log, 0)]
    cutoff = sorted(r.ts_ms for r in rows)[20]
    assert tables.prune(cutoff) == sum(1 for r in rows if r.ts_ms < cutoff)
    assert tables.prune(cutoff) == 0, "pruning twice prunes nothing more"
    tables.close()
    db.close()
    out = tmp_path / "export"
    kept = _export(copy, out)
    assert kept == sum(1 for r in rows if r.ts_ms >= cutoff)
    report = verify(out, _public(out), point_keys=_point_keys(copy))
    assert report.problems == []
    assert report.receipts == kept
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "grifo",
            "audit",
            "prune",
            "--to",
            "2999-01-01",
            "--state-dir",
            str(copy),
        ],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr
    assert f"pruned the content of {kept} records" in cli.stdout
    assert _export(copy, tmp_path / "empty") == 0
    assert verify(tmp_path / "empty", _public(tmp_path / "empty")).problems == []


def test_a_rotated_key_still_verifies_what_it_signed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    text = topology_yaml().replace(
        "health_interval_s: 0.2}", "health_interval_s: 0.2, audit: {checkpoint_every: 2}}"
    )
    for round_ in range(2):
        fab = Fabric.from_yaml(text, state)
        for _ in range(3):
            fab.client("demo-global").chat.completions.create(
                model=CHAT, messages=[{"role": "user", "content": "sign me"}]
            )
        fab.close()
        if round_ == 0:
            cli = subprocess.run(
                [sys.executable, "-m", "grifo", "audit", "rotate-key", "--state-dir", str(state)],
                capture_output=True,
                text=True,
            )
            assert cli.returncode == 0, cli.stderr
    out = tmp_path / "export"
    cli = subprocess.run(
        [sys.executable, "-m", "grifo", "audit", "export", str(out), "--state-dir", str(state)],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr
    assert len(list((out / "public-keys").glob("*.pem"))) == 2
    cli = subprocess.run(
        [sys.executable, "-m", "grifo", "audit", "verify", str(out)], capture_output=True, text=True
    )
    assert cli.returncode == 0, cli.stdout
    only_new = verify(out, _public(out))  # the current key alone cannot vouch for the old ones
    assert any("no signature" in p for p in only_new.problems)


def test_verify_names_a_request_that_reached_a_place_outside_its_allowed_set(
    tmp_path: Path,
) -> None:
    """Even a log written and signed as is: a retry hop outside the allowed set is named."""

    def record(seq: int, prev: str, tried: list[str]) -> AuditRecord:
        return AuditRecord(
            log="gw",
            seq=seq,
            prev_hash=prev,
            request_id=f"r{seq}",
            received_ms=1,
            done_ms=2,
            tenant="t",
            key_id="k",
            endpoint="/v1/chat/completions",
            model="m",
            point="lima",
            site="lima",
            jurisdiction="PE",
            allowed=["PE"],
            status="ok",
            prompt_tokens=1,
            completion_tokens=1,
            cost_micros=1,
            input_hmac="",
            output_hmac="",
            policy="p",
            tried=tried,
        )

    first = record(0, GENESIS, ["lima-2:PE:500"])
    second = record(1, entry_hash(GENESIS, canonical(first)), ["fra:DE:timeout"])
    lines = [{"log": "gw", "seq": r.seq, "record": canonical(r).decode()} for r in (first, second)]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = verify(tmp_path, SigningKey.generate().verify_key)
    assert report.problems == ["gw: record 1: r1 reached DE, outside its allowed set"]
