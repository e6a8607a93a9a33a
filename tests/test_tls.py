"""TLS with real certificates on loopback: `grifo certs` makes a CA; clients reach the gateway
over HTTPS; the gateway reaches a point over mutual TLS, and the point refuses anyone without a
certificate from that CA."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from grifo.security.certs import init_ca, issue
from tests.support.fabric import CHAT, Fabric


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    init_ca(directory)
    issue(directory, "gateway", ["127.0.0.1", "localhost"])
    issue(directory, "lima-edge", ["127.0.0.1"])
    issue(directory, "gateway-client", [], client=True)
    other = directory / "other"
    init_ca(other, "someone else's CA")
    issue(other, "intruder", [], client=True)
    return directory


@pytest.fixture(scope="module")
def fab(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    topology = f"""
gateway:
  demo_keys: true
  health_interval_s: 0.2
  tls: {{cert_file: {pki}/gateway.pem, key_file: {pki}/gateway.key}}
  point_tls: {{ca_file: {pki}/ca.pem, cert_file: {pki}/gateway-client.pem,
              key_file: {pki}/gateway-client.key}}
points:
  - {{name: lima-edge, site: lima, region: sa-west, jurisdiction: PE, tier: edge,
     engine: {{kind: fake, embeddings: fake}},
     tls: {{cert_file: {pki}/lima-edge.pem, key_file: {pki}/lima-edge.key,
           client_ca_file: {pki}/ca.pem}}}}
tenants:
  - {{name: demo-peru, allowed_jurisdictions: [PE]}}
"""
    fabric = Fabric.from_yaml(topology, tmp_path_factory.mktemp("tls"))
    yield fabric
    fabric.close()


def _context(pki: Path, cert: str | None = None, ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca or pki / "ca.pem"))
    if cert is not None:
        base = pki / "other" if cert == "intruder" else pki
        context.load_cert_chain(base / f"{cert}.pem", base / f"{cert}.key")
    return context


def test_clients_reach_the_gateway_over_https_and_it_reaches_the_point_over_mtls(
    fab: Fabric, pki: Path
) -> None:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", fab.running.port, context=_context(pki), timeout=10
    )
    body = {"model": CHAT, "messages": [{"role": "user", "content": "over tls"}]}
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(body),
        {"authorization": f"Bearer {fab.keys['demo-peru']}"},
    )
    response = conn.getresponse()
    answer = json.loads(response.read())
    conn.close()
    assert response.status == 200, answer
    assert answer["choices"][0]["message"]["content"] == "over tls"
    assert response.getheader("x-grifo-point") == "lima-edge"
    assert fab.point_url("lima-edge").startswith("https://")


def test_plain_http_to_the_gateway_gets_no_answer(fab: Fabric) -> None:
    with socket.create_connection(("127.0.0.1", fab.running.port), timeout=5) as plain:
        plain.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        reply = plain.recv(4096)
    assert not reply.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("who", [None, "intruder"])
def test_the_point_refuses_clients_without_a_certificate_from_its_ca(
    fab: Fabric, pki: Path, who: str | None
) -> None:
    port = int(fab.point_url("lima-edge").rsplit(":", 1)[1])
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=_context(pki, who), timeout=5)

    def health() -> None:
        conn.request("GET", "/health")
        conn.getresponse().read()

    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        health()
    conn.close()
    # With the gateway's client certificate the same point answers.
    conn = http.client.HTTPSConnection(
        "127.0.0.1", port, context=_context(pki, "gateway-client"), timeout=5
    )
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()


def test_grifo_certs_makes_a_ca_and_certificates(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "grifo", "certs"]
    subprocess.run([*run, "init", str(tmp_path)], check=True, capture_output=True)
    out = subprocess.run(
        [*run, "issue", str(tmp_path), "edge-1", "--host", "edge-1.example", "--host", "10.0.0.7"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert str(tmp_path / "edge-1.pem") in out
    assert (tmp_path / "edge-1.key").stat().st_mode & 0o077 == 0  # the owner's only
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    context.load_cert_chain(tmp_path / "edge-1.pem", tmp_path / "edge-1.key")  # a valid pair
    again = subprocess.run([*run, "init", str(tmp_path)], capture_output=True, text=True)
    assert again.returncode == 1  # an existing CA is never overwritten
    assert "already holds a CA" in again.stderr
    assert "Traceback" not in again.stderr
