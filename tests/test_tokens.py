"""OIDC/JWT bearer tokens against a JWKS file: tenant and role from claims, and every way a
token can be wrong is a 401 (or 403 for a role that may not do it)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.support.fabric import CHAT, Fabric

ISSUER = "https://idp.example"
AUDIENCE = "grifo"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
FORGER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def fab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    directory = tmp_path_factory.mktemp("jwt")
    keys = [
        {**json.loads(RSAAlgorithm.to_jwk(RSA_KEY.public_key())), "kid": "rsa-1", "use": "sig"},
        {**json.loads(ECAlgorithm.to_jwk(EC_KEY.public_key())), "kid": "ec-1", "use": "sig"},
    ]
    (directory / "jwks.json").write_text(json.dumps({"keys": keys}))
    topology = f"""
gateway:
  demo_keys: true
  health_interval_s: 0.2
  jwt: {{jwks_file: {directory}/jwks.json, issuer: "{ISSUER}", audience: {AUDIENCE}}}
points:
  - {{name: lima-edge, site: lima, region: sa-west, jurisdiction: PE, tier: edge,
     engine: {{kind: fake, embeddings: fake}}}}
tenants:
  - {{name: acme, allowed_jurisdictions: [PE]}}
  - {{name: other}}
"""
    fabric = Fabric.from_yaml(topology, directory / "state")
    yield fabric
    fabric.close()


def token(key: Any = RSA_KEY, kid: str = "rsa-1", alg: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "ana", "tenant": "acme", "exp": now + 300}
    body.update(claims)
    return jwt.encode(
        {k: v for k, v in body.items() if v is not None}, key, alg, headers={"kid": kid}
    )


def call(fab: Fabric, bearer: str, path: str = "/v1/chat/completions") -> tuple[int, Any]:
    data = None
    if path.startswith("/v1/"):
        data = json.dumps({"model": CHAT, "messages": [{"role": "user", "content": "hi"}]})
    request = urllib.request.Request(
        f"{fab.url}{path}",
        data=None if data is None else data.encode(),
        headers={"authorization": f"Bearer {bearer}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_valid_token_is_its_tenants_user(fab: Fabric) -> None:
    for bearer in (token(), token(key=EC_KEY, kid="ec-1", alg="ES256")):
        status, body = call(fab, bearer)
        assert status == 200, body
    deadline = time.monotonic() + 5
    while True:  # the ledger writer batches: wait for both rows
        rows = [e for e in fab.running.db.ledger() if e.key_id == "jwt:ana"]
        if len(rows) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(rows) == 2
    assert {e.tenant for e in rows} == {"acme"}


def test_roles_come_from_the_token_and_keep_their_limits(fab: Fabric) -> None:
    auditor = token(role="auditor")
    assert call(fab, auditor)[0] == 403  # an auditor reads, it does not run inference
    status, body = call(fab, auditor, "/admin/usage?period=all")
    assert status == 200, body
    assert {row.get("tenant") for row in body["data"]} <= {"acme"}
    status, _ = call(fab, auditor, "/admin/usage?tenant=other")
    assert status == 404  # another tenant does not exist for it


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _hs256_with_the_public_key(claims: dict[str, Any]) -> str:
    """The algorithm-confusion attack: HMAC keyed with the RSA public key's PEM."""
    pem = RSA_KEY.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    signing_input = _b64({"alg": "HS256", "kid": "rsa-1"}) + "." + _b64(claims)
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


def _wrong_tokens() -> dict[str, str]:
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "tenant": "acme", "exp": 2**31}
    return {
        "expired": token(exp=int(time.time()) - 3600),
        "wrong audience": token(aud="someone-else"),
        "wrong issuer": token(iss="https://evil.example"),
        "unknown tenant": token(tenant="nobody"),
        "no tenant": token(tenant=None),
        "self-made role": token(role="superuser"),
        "forged signature": token(key=FORGER),
        "unknown kid": token(kid="rsa-9"),
        "no exp": token(exp=None),
        "alg none": _b64({"alg": "none", "kid": "rsa-1"}) + "." + _b64(claims) + ".",
        "hmac with the public key": _hs256_with_the_public_key(claims),
        "garbage": "eyJhbGciOi.not-a-token",
    }


@pytest.mark.parametrize("case", list(_wrong_tokens()))
def test_every_wrong_token_is_401(fab: Fabric, case: str) -> None:
    status, body = call(fab, _wrong_tokens()[case])
    assert status == 401, (case, body)
    assert body["error"]["code"] in ("invalid_token", "expired_token")
    assert "Traceback" not in json.dumps(body)


def test_api_keys_still_work_beside_tokens(fab: Fabric) -> None:
    assert call(fab, fab.keys["acme"])[0] == 200
    assert Path(fab.state_dir / "demo-keys.json").exists()
