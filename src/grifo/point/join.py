"""A point that joins gateways: it registers at start, heartbeats its load, and deregisters
when it drains (`grifo point --register URL`, see README, Points join and leave).

Each gateway URL is kept on its own: registered (again and again with backoff until a gateway
answers), then a heartbeat every `heartbeat_s` the gateway asked for; a heartbeat answered 404
(the registration expired or was dropped) registers again. With a shared store one gateway
replica suffices; naming several keeps the point joined while any of them is up. On drain the
point deregisters, then keeps serving for one `heartbeat_s`, the time every gateway process
needs to see it gone, before it closes its listener.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgspec

from grifo.config.load import ConfigError, parse_point_url
from grifo.config.model import PointConfig
from grifo.errors import GrifoError
from grifo.http.client import ConnectionPool
from grifo.http.message import Request
from grifo.point.app import PointApp

log = logging.getLogger("grifo.point.join")
PREFIX = "/v1/grifo/points"
MAX_BACKOFF_S = 30.0
MAX_DRAIN_WAIT_S = 30.0


@dataclass(frozen=True, slots=True)
class JoinSettings:
    gateways: tuple[str, ...]  # base URLs: http(s)://host[:port]
    token: str
    advertise_url: str | None = None  # where gateways reach this point (default: its listener)
    ca_file: str | None = None  # to verify https:// gateways (default: the system's CAs)


def settings_from_args(args: argparse.Namespace) -> JoinSettings:
    """`grifo point --register ...`'s settings, checked."""
    token = os.environ.get(args.join_token_env)
    if not token:
        raise ConfigError(f"--register needs the join token in ${args.join_token_env}")
    for url in args.register:
        if gateway_address(url) is None:
            raise ConfigError(f"--register: expected http(s)://host[:port], got {url!r}")
    advertise = args.advertise_url
    if advertise is None and args.host in ("0.0.0.0", "::", ""):  # noqa: S104 (not a bind)
        raise ConfigError("--register with a wildcard --host needs --advertise-url")
    if advertise is not None and parse_point_url(advertise) is None:
        raise ConfigError(f"--advertise-url: expected http(s)://host:port, got {advertise!r}")
    return JoinSettings(tuple(args.register), token, advertise, args.register_ca_file)


def gateway_address(url: str) -> tuple[str, int, bool] | None:
    """(host, port, tls) of a gateway's base URL, or None when it is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    tls = parts.scheme == "https"
    return parts.hostname, port or (443 if tls else 80), tls


class _Gateway:
    def __init__(self, url: str, token: str, ca_file: str | None) -> None:
        address = gateway_address(url)
        assert address is not None, "checked by the command line"
        host, port, tls = address
        context = ssl.create_default_context(cafile=ca_file) if tls else None
        self.url = url
        self.pool = ConnectionPool(host, port, tls=context)
        self.auth = f"Bearer {token}".encode()
        self.joined = False
        self.heartbeat_s = 2.0

    async def call(self, method: str, path: str, payload: object = None) -> tuple[int, Any]:
        body = b"" if payload is None else msgspec.json.encode(payload)
        headers = [(b"authorization", self.auth), (b"content-type", b"application/json")]
        response = await self.pool.request(
            method, path, headers=headers, body=body, head_timeout_s=5.0
        )
        raw = await asyncio.wait_for(response.read(), 5.0)
        try:
            return response.status, msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return response.status, None


class Membership:
    def __init__(self, settings: JoinSettings, point: PointConfig, url: str, app: PointApp):
        self.point = point
        self.app = app
        self.identity = {
            "name": point.name,
            "site": point.site,
            "region": point.region,
            "jurisdiction": point.jurisdiction,
            "tier": point.tier,
            "url": url,
            "rtt_ms": point.rtt_ms,
            "prices": msgspec.to_builtins(point.prices),
        }
        self.gateways = [_Gateway(g, settings.token, settings.ca_file) for g in settings.gateways]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._keep(g)) for g in self.gateways]

    async def leave(self) -> None:
        """Deregister everywhere, then wait until every gateway process has seen it."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        joined = [g for g in self.gateways if g.joined]
        path = f"{PREFIX}/{self.point.name}"
        answers = await asyncio.gather(
            *(g.call("DELETE", path) for g in joined), return_exceptions=True
        )
        for gateway, answer in zip(joined, answers, strict=True):
            if isinstance(answer, BaseException) or answer[0] != 200:
                log.warning("could not deregister from %s; it expires us instead", gateway.url)
        wait_s = min(max((g.heartbeat_s for g in joined), default=0.0), MAX_DRAIN_WAIT_S)
        if wait_s:
            log.info("deregistered; serving %.1f s more while gateways catch up", wait_s)
            await asyncio.sleep(wait_s + 0.5)
        for gateway in self.gateways:
            await gateway.pool.close()

    async def _keep(self, gateway: _Gateway) -> None:
        backoff = 0.5
        while True:
            if not await self._register(gateway):
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))  # jitter
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            backoff = 0.5
            while gateway.joined:
                await asyncio.sleep(gateway.heartbeat_s)
                await self._heartbeat(gateway)

    async def _register(self, gateway: _Gateway) -> bool:
        try:
            status, answer = await gateway.call("POST", PREFIX, self.identity)
        except (GrifoError, TimeoutError, OSError):
            log.info("gateway %s does not answer yet; registering again shortly", gateway.url)
            return False
        if status != 201 or not isinstance(answer, dict):
            log.error("gateway %s refused the registration: %s", gateway.url, _message(answer))
            return False
        gateway.heartbeat_s = float(answer.get("heartbeat_s", 2.0))
        gateway.joined = True
        log.info("registered with %s as %s", gateway.url, self.point.name)
        return True

    async def _heartbeat(self, gateway: _Gateway) -> None:
        path = f"{PREFIX}/{self.point.name}/heartbeat"
        try:
            status, answer = await gateway.call("POST", path, await self._signals())
        except (GrifoError, TimeoutError, OSError):
            return  # the gateway is away: keep beating; it says 404 if we expired meanwhile
        if status == 404:
            log.warning("gateway %s lost our registration; registering again", gateway.url)
            gateway.joined = False
        elif status != 200:
            log.warning("gateway %s refused a heartbeat: %s", gateway.url, _message(answer))

    async def _signals(self) -> dict[str, Any]:
        """This point's own `/load`, and the models it serves."""
        response = await self.app.handle(Request("GET", "/load", "", {}, b""))
        load: dict[str, Any] = {}
        with contextlib.suppress(AttributeError, msgspec.DecodeError):
            load = msgspec.json.decode(getattr(response, "body", b"{}"))
        signals = {
            k: load[k]
            for k in ("in_flight", "queued", "completed", "tokens_per_s", "cache_usage")
            if isinstance(load.get(k), int | float)
        }
        signals["models"] = [str(card["id"]) for card in self.app.model_cards()]
        return signals


def _message(answer: object) -> str:
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        return str(answer["error"].get("message"))
    return "an unexpected answer"
