"""An HTTP API the model may call, reached only at its configured host (`tools.http`).

The model chooses the arguments, never the URL: GET sends them as the query string, POST as a
JSON body. Each call resolves the host once, refuses non-public addresses (see `egress`) and
connects to the very address it checked (no second lookup for a rebinding DNS server to
answer differently), sending the configured Host and TLS server name. Redirects are not
followed, the body is read up to a bound, and the whole call has one deadline. Results and
errors never carry the configured headers (they may hold API keys) or a stack trace.

The connection is grifo's own `ConnectionPool` (HTTP/1.1 on httptools, TLS by an ssl context),
one per checked address tried, connecting to that address (`connect_host`) while speaking to the
configured host (Host header and TLS server name).
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import Mapping
from typing import Any, cast
from urllib.parse import quote, urlencode, urlsplit

import jsonschema  # type: ignore[import-untyped,unused-ignore]
from jsonschema.exceptions import best_match  # type: ignore[import-untyped,unused-ignore]

from grifo.agent.tools.base import JsonObject, ToolArgumentsError, ToolError, ToolResult, ToolSpec
from grifo.config.tools import HttpToolConfig
from grifo.errors import GrifoError, PointUnavailableError
from grifo.http.client import ConnectionPool
from grifo.http.upstream import UpstreamResponse
from grifo.security.egress import resolve_allowed

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FORBIDDEN_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "te", "upgrade", "trailer",
     "keep-alive", "proxy-connection", "expect"}
)  # fmt: skip
_PUBLIC_HEADERS = frozenset({"accept", "accept-language", "content-type", "user-agent"})
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"
_EXCERPT_CHARS = 200
_TRUNCATED = "\n[truncated]"


_IDLE_CONNECTIONS = 4


class HttpTool:
    """A `Tool` calling the HTTP API of one `HttpToolConfig`.

    `tls` is the context for https:// (default: the system's CAs; the certificate must match
    the URL's host).
    """

    def __init__(self, config: HttpToolConfig, *, tls: ssl.SSLContext | None = None) -> None:
        self._config = config
        where = f"http tool {config.name!r}"
        parts = urlsplit(config.url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"{where}: the url must start with http:// or https://")
        if "@" in parts.netloc:
            raise ValueError(f"{where}: the url must not hold a user name or password")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
            host = (parts.hostname or "").encode("idna").decode("ascii")
        except (ValueError, UnicodeError) as exc:
            raise ValueError(f"{where}: the url's host or port is not valid") from exc
        if not host or not re.fullmatch(r"[A-Za-z0-9.:_-]+", host):
            raise ValueError(f"{where}: the url must name a host (letters, digits, . - : _)")
        self._host, self._port = host, port
        shown = f"[{host}]" if ":" in host else host
        default_port = port == (443 if scheme == "https" else 80)
        authority = shown if default_port else f"{shown}:{port}"
        self._host_header = authority
        self._path = quote(parts.path or "/", safe=_PATH_SAFE)
        self._query = quote(parts.query, safe=_PATH_SAFE + "?")
        self._source = f"{scheme}://{authority}{self._path}"
        self._tls = (tls or ssl.create_default_context()) if scheme == "https" else None
        self._headers: list[tuple[bytes, bytes]] = []
        self._secrets: list[str] = []
        for name, value in config.headers.items():
            if not _TOKEN.fullmatch(name) or name.lower() in _FORBIDDEN_HEADERS:
                raise ValueError(f"{where}: the header name {name!r} is not allowed")
            if any(c in value for c in "\r\n\0"):
                raise ValueError(f"{where}: the value of header {name!r} has a line break")
            try:
                self._headers.append((name.lower().encode("ascii"), value.encode("latin-1")))
            except UnicodeEncodeError as exc:
                raise ValueError(f"{where}: the value of header {name!r} is not latin-1") from exc
            if name.lower() not in _PUBLIC_HEADERS:
                self._secrets += [s for s in (value, *value.split()[-1:]) if len(s) >= 4]
        self._secrets.sort(key=len, reverse=True)
        try:
            validator_class = jsonschema.Draft202012Validator
            validator_class.check_schema(config.parameters)
        except jsonschema.SchemaError as exc:
            raise ValueError(
                f"{where}: parameters is not a valid JSON Schema: {exc.message}"
            ) from exc
        self._validator = validator_class(config.parameters)
        self._spec = ToolSpec(config.name, config.description, config.parameters)
        self._pools: dict[str, ConnectionPool] = {}  # by checked address

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    async def call(self, arguments: JsonObject) -> ToolResult:
        target, body = self._encode(arguments)
        config = self._config
        try:
            async with asyncio.timeout(config.timeout_s):
                return await self._exchange(target, body)
        except TimeoutError:
            raise ToolError(
                f"{config.name}: {self._host} did not answer within {config.timeout_s:g} s"
            ) from None

    # -- the request ----------------------------------------------------------------------------
    def _encode(self, arguments: JsonObject) -> tuple[str, bytes]:
        if not isinstance(cast(object, arguments), dict):
            raise ToolArgumentsError("the arguments must be a JSON object")
        error = best_match(self._validator.iter_errors(arguments))
        if error is not None:
            at = "/".join(str(p) for p in error.absolute_path) or "(root)"
            raise ToolArgumentsError(
                f"arguments do not match the schema at {at}: {error.message}"[:300]
            )
        if self._config.method == "POST":
            try:
                return self._target(""), json.dumps(arguments, allow_nan=False).encode()
            except (TypeError, ValueError) as exc:
                raise ToolArgumentsError("the arguments cannot be sent as JSON") from exc
        return self._target(_query(arguments)), b""

    def _target(self, query: str) -> str:
        joined = "&".join(q for q in (self._query, query) if q)
        return f"{self._path}?{joined}" if joined else self._path

    async def _exchange(self, target: str, body: bytes) -> ToolResult:
        config = self._config
        addresses = await resolve_allowed(self._host, self._port, private=config.private)
        headers = list(self._headers)
        names = {name for name, _ in headers}
        if body and b"content-type" not in names:
            headers.append((b"content-type", b"application/json"))
        if b"accept" not in names:
            headers.append((b"accept", b"application/json, text/*;q=0.9, */*;q=0.5"))
        await self._forget_except(addresses)
        failure = ""
        for address in addresses:  # in the resolver's order; the next one if it is not reached
            pool = self._pool(address)
            try:
                response = await pool.request(
                    config.method, target, headers=headers, body=body,
                    head_timeout_s=config.timeout_s,
                )  # fmt: skip
            except GrifoError as exc:
                cause = exc.__cause__  # the pool chains one only if it could not connect
                if isinstance(exc, PointUnavailableError) and isinstance(
                    cause, OSError | TimeoutError
                ):
                    if isinstance(cause, ssl.SSLError):
                        failure = f": TLS failed ({cause.reason or 'handshake'})"
                    continue
                raise ToolError(f"{config.name}: no answer from {self._host}") from exc
            return await self._result(response)
        raise ToolError(f"cannot connect to {self._host}:{self._port}{failure}")

    def _pool(self, address: str) -> ConnectionPool:
        """Connections to one checked address, kept open between calls: a run's tool calls
        do not pay a new TCP (and TLS) handshake each."""
        pool = self._pools.get(address)
        if pool is None:
            pool = self._pools[address] = ConnectionPool(
                self._host, self._port, max_idle=_IDLE_CONNECTIONS,
                connect_timeout_s=self._config.timeout_s, tls=self._tls, connect_host=address,
                host_header=self._host_header,
            )  # fmt: skip
        return pool

    async def _forget_except(self, addresses: list[str]) -> None:
        """Close the connections to addresses the host no longer resolves to."""
        for address in [a for a in self._pools if a not in addresses]:
            await self._pools.pop(address).close()

    async def aclose(self) -> None:
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            await pool.close()

    async def _result(self, response: UpstreamResponse) -> ToolResult:
        name, status = self._config.name, response.status
        if 300 <= status < 400:
            response.close()
            raise ToolError(f"{name}: {self._host} answered {status}, a redirect; not followed")
        limit = 4 * self._config.max_result_chars
        if not 200 <= status < 300:
            limit = min(limit, 4 * _EXCERPT_CHARS)
        data, cut = await _read_bounded(response, limit)
        text = self._redact(data.decode("utf-8", errors="replace"), cut=cut)
        if not 200 <= status < 300:
            excerpt = " ".join(text.split())[:_EXCERPT_CHARS]
            raise ToolError(f"{name}: {self._host} answered {status}: {excerpt or '(no body)'}")
        maximum = self._config.max_result_chars
        if cut or len(text) > maximum:
            text = text[: maximum - len(_TRUNCATED)] + _TRUNCATED
        return ToolResult(text=text, sources=(self._source,))

    def _redact(self, text: str, *, cut: bool) -> str:
        """Configured header values (and their last word, the token of "Bearer x") out of text
        the API sent back (it may echo the request); when the body was `cut`, also a secret's
        beginning left at the very end."""
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
            for n in range(min(len(secret) - 1, len(text)) if cut else 0, 3, -1):
                if text.endswith(secret[:n]):
                    text = text[:-n] + "[redacted]"
                    break
        return text


def _query(arguments: Mapping[str, Any]) -> str:
    pairs: list[tuple[str, str]] = []
    for key, value in arguments.items():
        if value is None:
            continue
        if isinstance(value, bool):
            pairs.append((key, "true" if value else "false"))
        elif isinstance(value, str | int | float):
            pairs.append((key, str(value)))
        else:
            raise ToolArgumentsError(f"argument {key!r} must be a string, number or boolean")
    return urlencode(pairs, quote_via=quote)


async def _read_bounded(response: UpstreamResponse, limit: int) -> tuple[bytes, bool]:
    """At most `limit` bytes of the body, and whether there was more (the rest is dropped and
    the connection closed)."""
    chunks: list[bytes] = []
    size = 0
    try:
        while (chunk := await response.next_chunk()) is not None:
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                return b"".join(chunks)[:limit], True
    except GrifoError as exc:
        raise ToolError("the API's response broke off") from exc
    finally:
        response.close()
    return b"".join(chunks), False
