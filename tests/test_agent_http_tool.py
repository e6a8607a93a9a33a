"""The agent's HTTP tool against real servers on loopback, and its egress (SSRF) rules.

Every end-to-end test runs on the standard asyncio loop and on uvloop (which points use).
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from grifo.agent.tools.base import EgressRefusedError, ToolArgumentsError, ToolError
from grifo.agent.tools.http_tool import HttpTool
from grifo.config.tools import HttpToolConfig
from grifo.security.certs import init_ca, issue
from grifo.security.egress import egress_refusal, resolve_allowed
from tests.conftest import Runner

SECRET = "sk-live-7f3a9c2e1b"
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "days": {"type": "integer"}},
    "required": ["city"],
    "additionalProperties": False,
}


def ok(body: bytes, status: str = "200 OK", extra: bytes = b"") -> bytes:
    head = f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\n".encode()
    return head + extra + b"connection: close\r\n\r\n" + body


class Upstream:
    """A scripted HTTP server on loopback: records each request and answers `reply` (a
    function of the request head and body); None never answers."""

    def __init__(
        self,
        reply: bytes | Callable[[bytes, bytes], bytes] | None,
        tls: ssl.SSLContext | None = None,
        hold: bool = False,
    ) -> None:
        self.reply = reply
        self.hold = hold  # keep the connection open after the reply
        self.tls = tls
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0
        self.port = 0

    async def __aenter__(self) -> Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length)
            self.requests.append((head, body))
            if self.reply is None:
                await reader.read()  # until the client gives up and closes
            else:
                reply = self.reply if isinstance(self.reply, bytes) else self.reply(head, body)
                writer.write(reply)
                await writer.drain()
                if self.hold:
                    await reader.read()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


def tool(url: str, **fields: Any) -> HttpTool:
    fields.setdefault("parameters", SCHEMA)
    return HttpTool(HttpToolConfig(name="weather", description="Weather.", url=url, **fields))


# -- round trips --------------------------------------------------------------------------------
def test_get_sends_arguments_as_the_query_with_the_configured_headers(run: Runner) -> None:
    async def main() -> None:
        async with Upstream(ok(b'{"temp": 21}')) as up:
            url = f"http://localhost:{up.port}/v1/forecast?units=metric#frag"
            weather = tool(url, method="GET", private=True, headers={"X-Api-Key": SECRET})
            result = await weather.call({"city": "São Paulo & co", "days": 3})
        assert result.text == '{"temp": 21}'
        assert result.sources == (f"http://localhost:{up.port}/v1/forecast",)
        head = up.requests[0][0].decode()
        line = head.split("\r\n")[0]
        assert (
            line == "GET /v1/forecast?units=metric&city=S%C3%A3o%20Paulo%20%26%20co&days=3 HTTP/1.1"
        )
        assert f"host: localhost:{up.port}\r\n" in head.lower()
        assert f"x-api-key: {SECRET}\r\n" in head

    run(main())


def test_post_sends_arguments_as_a_json_body(run: Runner) -> None:
    async def main() -> None:
        async with Upstream(lambda head, body: ok(b"echo:" + body)) as up:
            weather = tool(f"http://127.0.0.1:{up.port}/api", private=True)
            result = await weather.call({"city": "Lima", "days": 2})
        head, body = up.requests[0]
        assert head.startswith(b"POST /api HTTP/1.1\r\n")
        assert b"content-type: application/json\r\n" in head
        assert json.loads(body) == {"city": "Lima", "days": 2}
        assert result.text == "echo:" + body.decode()

    run(main())


def test_https_connects_to_the_checked_address_with_the_urls_server_name(
    run: Runner, tmp_path: Path
) -> None:
    init_ca(tmp_path)
    issue(tmp_path, "api", ["localhost"])
    issue(tmp_path, "elsewhere", ["elsewhere.example"])
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    names: list[str | None] = []

    def server_context(cert: str) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tmp_path / f"{cert}.pem", tmp_path / f"{cert}.key")
        context.sni_callback = lambda _sock, name, _ctx: names.append(name)
        return context

    async def main() -> None:
        async with Upstream(ok(b"secure"), tls=server_context("api")) as up:
            config = HttpToolConfig(
                name="w", description="", url=f"https://localhost:{up.port}/x", private=True
            )
            assert (await HttpTool(config, tls=client).call({})).text == "secure"
        async with Upstream(ok(b"secure"), tls=server_context("elsewhere")) as up:
            config = HttpToolConfig(
                name="w", description="", url=f"https://localhost:{up.port}/x", private=True
            )
            with pytest.raises(ToolError, match="TLS failed"):
                await HttpTool(config, tls=client).call({})

    run(main())
    assert names[0] == "localhost"


# -- arguments ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "arguments", "message"),
    [
        ("POST", {"days": 3}, "'city' is a required property"),
        ("POST", {"city": 5}, "at city: 5 is not of type 'string'"),
        ("POST", {"city": "x" * 41}, "is too long"),
        ("POST", {"city": "Lima", "url": "http://169.254.169.254/"}, "Additional properties"),
        ("GET", {"city": ["a", "b"]}, "not of type 'string'"),
    ],
)
def test_arguments_off_the_schema_are_refused_before_any_connection(
    run: Runner, method: str, arguments: dict[str, Any], message: str
) -> None:
    async def main() -> None:
        async with Upstream(ok(b"{}")) as up:
            weather = tool(f"http://127.0.0.1:{up.port}/", method=method, private=True)
            with pytest.raises(ToolArgumentsError, match=message):
                await weather.call(arguments)
        assert up.connections == 0

    run(main())


def test_get_refuses_non_scalar_arguments_the_schema_allows(run: Runner) -> None:
    async def main() -> None:
        async with Upstream(ok(b"{}")) as up:
            weather = tool(
                f"http://127.0.0.1:{up.port}/", method="GET", private=True, parameters={}
            )
            with pytest.raises(ToolArgumentsError, match="string, number or boolean"):
                await weather.call({"filter": {"a": 1}})
        assert up.connections == 0

    run(main())


# -- egress -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "2130706433", "0x7f.1", "[::ffff:127.0.0.1]"]
)
def test_loopback_is_refused_unless_the_tool_is_private(run: Runner, host: str) -> None:
    async def main() -> None:
        async with Upstream(ok(b"inside")) as up:
            weather = tool(f"http://{host}:{up.port}/", parameters={})
            with pytest.raises(EgressRefusedError, match="loopback") as caught:
                await weather.call({})
            if host == "localhost":  # the address a name resolves to is not told
                assert "127.0.0.1" not in str(caught.value)
            assert up.connections == 0
            if host.startswith("["):
                return  # the server listens on IPv4 only
            allowed = tool(f"http://{host}:{up.port}/", parameters={}, private=True)
            assert (await allowed.call({})).text == "inside"

    run(main())


REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("::1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("fc00::1", "private (ULA)"),
    ("fd12:3456::1", "private (ULA)"),
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("100.64.0.1", "shared (CGNAT)"),
    ("100.127.255.254", "shared (CGNAT)"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("192.0.2.10", "documentation"),
    ("2001:db8::1", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("fec0::1", "site-local"),
    ("169.254.169.254", "cloud metadata"),
    ("169.254.170.2", "cloud metadata"),
    ("fd00:ec2::254", "cloud metadata"),
    ("100.100.100.200", "cloud metadata"),
    ("::ffff:127.0.0.1", "loopback (IPv4 inside IPv6)"),
    ("::ffff:10.0.0.1", "private (IPv4 inside IPv6)"),
    ("::ffff:169.254.169.254", "cloud metadata (IPv4 inside IPv6)"),
    ("::ffff:8.8.8.8", "IPv4-mapped"),
    ("::ffff:0:7f00:1", "loopback (IPv4 inside IPv6)"),
    ("::127.0.0.1", "loopback (IPv4 inside IPv6)"),
    ("64:ff9b::a9fe:a9fe", "cloud metadata (IPv4 inside IPv6)"),
    ("64:ff9b::7f00:1", "loopback (IPv4 inside IPv6)"),
    ("2002:7f00:1::1", "loopback (IPv4 inside IPv6)"),
    ("2002:808:808::1", "6to4"),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback (IPv4 inside IPv6)"),  # Teredo
    ("not-an-address", "unparseable"),
]


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_non_public_addresses_are_refused(address: str, reason: str) -> None:
    assert egress_refusal(address) == reason


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "64:ff9b::808:808"]
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert egress_refusal(address) is None
    assert egress_refusal(address, private=True) is None


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("10.0.0.7", True),
        ("fd12::1", True),
        ("100.64.1.1", True),
        ("169.254.1.1", True),
        ("169.254.169.254", False),
        ("fd00:ec2::254", False),
        ("100.100.100.200", False),
        ("::ffff:169.254.169.254", False),
        ("64:ff9b::a9fe:a9fe", False),
    ],
)
def test_private_tools_reach_private_addresses_but_never_metadata(
    address: str, allowed: bool
) -> None:
    assert (egress_refusal(address, private=True) is None) is allowed


def test_a_name_is_refused_if_any_of_its_addresses_is(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        answers = ["93.184.216.34", "169.254.169.254"]

        async def getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
            tcp = (socket.AF_INET, socket.SOCK_STREAM, 6, "")
            return [(*tcp, (address, port)) for address in answers]

        monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
        with pytest.raises(EgressRefusedError, match="cloud metadata"):
            await resolve_allowed("api.example", 443)
        answers.pop()
        assert await resolve_allowed("api.example", 443) == ["93.184.216.34"]

    asyncio.run(main())


def test_the_checked_address_is_the_one_connected_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: a second lookup could answer differently, so there is none."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        lookups: list[str] = []

        async def getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
            lookups.append(host)
            address = "127.0.0.1" if len(lookups) == 1 else "169.254.169.254"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

        monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
        async with Upstream(ok(b"pinned")) as up:
            api = tool(f"http://api.example:{up.port}/p", private=True, parameters={})
            assert (await api.call({})).text == "pinned"
        assert lookups == ["api.example"]
        assert f"host: api.example:{up.port}\r\n".encode() in up.requests[0][0]

    asyncio.run(main())


# -- responses ----------------------------------------------------------------------------------
def test_redirects_are_not_followed(run: Runner) -> None:
    async def main() -> None:
        moved = ok(b"", "302 Found", b"location: http://169.254.169.254/latest/meta-data/\r\n")
        async with Upstream(moved) as up:
            weather = tool(f"http://127.0.0.1:{up.port}/", private=True)
            with pytest.raises(ToolError, match="302, a redirect; not followed") as caught:
                await weather.call({"city": "Lima"})
        assert "169.254" not in str(caught.value)
        assert up.connections == 1

    run(main())


def test_an_oversized_body_is_cut(run: Runner) -> None:
    async def main() -> None:
        big = b"0123456789" * 200_000  # 2 MB
        async with Upstream(ok(big)) as up:
            weather = tool(f"http://127.0.0.1:{up.port}/", private=True, max_result_chars=100)
            result = await weather.call({"city": "Lima"})
        assert len(result.text) == 100
        assert result.text.endswith("[truncated]")
        assert result.text.startswith("0123456789" * 5)

    run(main())


def test_reading_stops_at_the_limit(run: Runner) -> None:
    """A body that claims 1 GB, sends 1 MB and stalls: the tool has read enough long before."""

    async def main() -> None:
        head = b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000\r\n\r\n"
        async with Upstream(head + b"x" * 1_000_000, hold=True) as up:
            weather = tool(f"http://127.0.0.1:{up.port}/", private=True, timeout_s=5)
            started = time.monotonic()
            result = await weather.call({"city": "Lima"})
            assert time.monotonic() - started < 2
        assert result.text == "x" * (4000 - len("\n[truncated]")) + "\n[truncated]"

    run(main())


def test_invalid_utf8_is_replaced() -> None:
    async def main() -> None:
        async with Upstream(ok(b"caf\xe9 \xff ok")) as up:
            weather = tool(f"http://127.0.0.1:{up.port}/", private=True)
            assert (await weather.call({"city": "x"})).text == "caf\ufffd \ufffd ok"

    asyncio.run(main())


def test_a_silent_server_times_out(run: Runner) -> None:
    async def main() -> None:
        async with Upstream(None) as up:
            weather = tool(f"http://127.0.0.1:{up.port}/", private=True, timeout_s=0.3)
            started = time.monotonic()
            with pytest.raises(ToolError, match=r"did not answer within 0\.3 s"):
                await weather.call({"city": "Lima"})
            assert time.monotonic() - started < 2
        assert len(up.requests) == 1

    run(main())


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        ("404 Not Found", b"no such city", "answered 404: no such city"),
        ("500 Internal Server Error", b"", r"answered 500: \(no body\)"),
        ("429 Too Many Requests", b"slow\n down " * 500, "answered 429: slow down slow"),
    ],
)
def test_non_2xx_is_an_error_with_a_short_excerpt(
    run: Runner, status: str, body: bytes, message: str
) -> None:
    async def main() -> None:
        async with Upstream(ok(body, status)) as up:
            weather = tool(f"http://127.0.0.1:{up.port}/", private=True)
            with pytest.raises(ToolError, match=message) as caught:
                await weather.call({"city": "Lima"})
        assert len(str(caught.value)) < 300

    run(main())


def test_configured_headers_never_come_back(run: Runner) -> None:
    def echo(status: str) -> Callable[[bytes, bytes], bytes]:
        return lambda head, body: ok(head, status)  # like httpbin's /anything

    async def main() -> None:
        headers = {"Authorization": f"Bearer {SECRET}", "Accept": "application/json"}
        for status in ("200 OK", "400 Bad Request"):
            async with Upstream(echo(status)) as up:
                weather = tool(f"http://127.0.0.1:{up.port}/", private=True, headers=headers)
                try:
                    text = (await weather.call({"city": "Lima"})).text
                except ToolError as exc:
                    text = str(exc)
            assert SECRET.encode() in up.requests[0][0]  # it was sent
            assert SECRET not in text
            assert "[redacted]" in text
            assert "Traceback" not in text

    run(main())


def test_a_secret_cut_at_the_byte_limit_leaves_no_beginning() -> None:
    weather = tool("https://api.example/", headers={"X-Key": SECRET})
    assert weather._redact("echo " + SECRET[:9], cut=True) == "echo [redacted]"
    assert weather._redact("echo " + SECRET[:9], cut=False) == "echo " + SECRET[:9]


def test_connection_refused_is_a_tool_error() -> None:
    async def main() -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with pytest.raises(ToolError, match=f"cannot connect to 127.0.0.1:{port}"):
            await tool(f"http://127.0.0.1:{port}/", private=True).call({"city": "Lima"})

    asyncio.run(main())


# -- configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/x", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("gopher://example.com/", "http:// or https://"),
        ("example.com/api", "http:// or https://"),
        ("http:///api", "must name a host"),
        ("http://user:pw@example.com/", "user name or password"),
        ("http://evil.example\\@good.example/", "user name or password"),
        ("http://example.com:99999/", "not valid"),
        ("http://exa mple.com/", "must name a host"),
    ],
)
def test_bad_urls_are_refused_at_construction(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tool(url)


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "internal"},
        {"X-A": "a\r\nHost: evil"},
        {"X-A\n": "a"},
        {"Bad Name": "x"},
        {"Content-Length": "1"},
        {"X-A": "caf\u20ac"},
    ],
)
def test_bad_headers_are_refused_at_construction(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="header"):
        tool("https://api.example/", headers=headers)


def test_an_invalid_schema_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="not a valid JSON Schema"):
        tool("https://api.example/", parameters={"type": "nope"})


def test_the_spec_comes_from_the_configuration() -> None:
    spec = tool("https://api.example/").spec
    assert (spec.name, spec.description, dict(spec.parameters)) == ("weather", "Weather.", SCHEMA)


def test_calls_reuse_their_connection_and_close_it_with_the_tool(run: Runner) -> None:
    """A run's tool calls pay one TCP handshake, not one each (across a WAN, each costs a
    round trip); closing the tool closes its connections."""
    connections = 0
    closed = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:  # keep-alive: one request after another on this connection
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (int(x.split(b":")[1]) for x in head.split(b"\r\n")
                     if x.lower().startswith(b"content-length:")),
                    0,
                )  # fmt: skip
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            closed.set()
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        weather = tool(f"http://127.0.0.1:{port}/api", private=True)
        try:
            for _ in range(5):
                assert (await weather.call({"city": "Lima"})).text == "ok"
            assert connections == 1
            await weather.aclose()
            await asyncio.wait_for(closed.wait(), 5)
        finally:
            server.close()

    run(main())
