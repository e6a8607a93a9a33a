"""`/v1/grifo/points`: points register, heartbeat and deregister with a join token.

    POST   /v1/grifo/points                   register: {name, site, region, jurisdiction,
                                              tier, url, rtt_ms, prices} -> 201
    POST   /v1/grifo/points/<name>/heartbeat  {in_flight, queued, tokens_per_s, cache_usage,
                                              models} -> 200; 404 when not registered
    DELETE /v1/grifo/points/<name>            deregister (drain) -> 200

The order of checks is the security rule: the token (401), the body (400 naming the field),
the token's scope (403: a token never lets a point claim a jurisdiction, tier or name outside
it), the name (409: a configured point's, or a live registration's by another token), and the
URL, which must resolve only to addresses points live on (loopback, private networks: never
link-local or cloud metadata). The gateway connects to the address it vetted, not to whatever
the name resolves to later. Refusals are logged with the token's id, never the token.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from typing import Annotated, TypeVar

import msgspec

from grifo.config.base import Name, Tier
from grifo.config.load import parse_point_url, point_problems
from grifo.config.model import PointConfig, Prices
from grifo.errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
)
from grifo.http.message import Request, Response
from grifo.registry.roster import ALLOWED_ADDRESSES, Roster
from grifo.registry.tokens import JoinToken
from grifo.security.egress import egress_refusal
from grifo.store.registry_sql import RegisteredRow
from grifo.wire.requests import decode_json

log = logging.getLogger("grifo.registry")
PREFIX = "/v1/grifo/points"
MAX_BODY = 64 * 1024
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Count = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
S = TypeVar("S", bound=msgspec.Struct)


class Registration(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """What a point says it is (a `PointConfig` reached at `url`)."""

    name: Name
    site: Text
    region: Text
    jurisdiction: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}$")]
    tier: Tier
    url: Annotated[str, msgspec.Meta(max_length=2048)]
    rtt_ms: Annotated[float, msgspec.Meta(ge=0, le=60_000)] = 0.0
    prices: Prices = Prices()


class Heartbeat(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A point's load signals, as its `/load` reports them, and the models it serves."""

    in_flight: Count = 0
    queued: Count = 0
    completed: Annotated[int, msgspec.Meta(ge=0)] = 0
    tokens_per_s: Annotated[float, msgspec.Meta(ge=0, le=1e9)] = 0.0
    cache_usage: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    models: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=256)]], msgspec.Meta(max_length=256)
    ] = []


class RegistryApi:
    def __init__(self, roster: Roster) -> None:
        self.roster = roster

    async def handle(self, request: Request) -> Response:
        if request.path == PREFIX:
            if request.method != "POST":
                raise MethodNotAllowedError(f"{PREFIX} accepts POST only")
            return await self._register(request)
        name, _, action = request.path[len(PREFIX) + 1 :].partition("/")
        if not request.path.startswith(PREFIX + "/") or action not in ("", "heartbeat"):
            raise NotFoundError(f"no route {request.method} {request.path}")
        method = "POST" if action else "DELETE"
        if request.method != method:
            raise MethodNotAllowedError(f"{request.path} accepts {method} only")
        token = self._token(request)
        if not _NAME.match(name):
            raise NotFoundError(f"no registered point {name[:64]!r}", code="point_not_registered")
        if action:
            return await self._heartbeat(request, token, name)
        return await self._deregister(token, name)

    def _token(self, request: Request) -> JoinToken:
        try:
            return self.roster.tokens.authenticate(request.headers.get(b"authorization"))
        except AuthenticationError:
            self.roster.events["unauthorized"] += 1
            log.warning("%s %s refused: no valid join token", request.method, request.path)
            raise

    async def _register(self, request: Request) -> Response:
        token = self._token(request)
        ask = _decode(Registration, request.body)
        point = PointConfig(
            name=ask.name,
            site=ask.site,
            region=ask.region,
            jurisdiction=ask.jurisdiction,
            tier=ask.tier,
            rtt_ms=ask.rtt_ms,
            url=ask.url,
            prices=ask.prices,
        )
        problems = point_problems("$", point)
        if problems:
            field = problems[0].partition(":")[0].removeprefix("$").lstrip(".") or None
            raise InvalidRequestError(f"invalid registration: {problems[0]}", param=field)
        refusal = token.refusal(point)
        if refusal is not None:
            self._refuse(token, point, "refused", refusal[1])
            raise PermissionDeniedError(
                refusal[1], param=refusal[0], code="registration_out_of_scope"
            )
        if point.name in self.roster.static:
            self._refuse(token, point, "conflict", "the name of a configured point")
            raise ConflictError(
                f"{point.name!r} is the name of a configured point",
                param="name",
                code="point_name_taken",
            )
        try:
            address = await _vet(ask.url)
        except InvalidRequestError as exc:
            self._refuse(token, point, "refused", exc.message)  # an address it may not reach
            raise
        identity = msgspec.json.encode(point).decode()
        settings = self.roster.settings
        expire_ms = self.roster.expire_ms
        tables = self.roster.tables
        if not await asyncio.to_thread(
            tables.register, point.name, token.id, identity, address, expire_ms
        ):
            self._refuse(token, point, "conflict", "registered by another join token")
            raise ConflictError(
                f"a point named {point.name!r} is registered and alive; choose another name",
                param="name",
                code="point_name_taken",
            )
        row = RegisteredRow(point.name, token.id, identity, address, "{}", _now_ms(), 0)
        self.roster.upsert(row)  # here at once; other processes within heartbeat_s
        self.roster.events["registered"] += 1
        answer = {
            "object": "grifo.point_registration",
            "name": point.name,
            "jurisdiction": point.jurisdiction,
            "tier": point.tier,
            "heartbeat_s": settings.heartbeat_s,
            "expire_after_s": settings.expire_after_s,
        }
        return Response(201, msgspec.json.encode(answer))

    async def _heartbeat(self, request: Request, token: JoinToken, name: str) -> Response:
        beat = _decode(Heartbeat, request.body or b"{}")
        signals = msgspec.json.encode(beat).decode()
        tables = self.roster.tables
        if not await asyncio.to_thread(
            tables.heartbeat, name, token.id, signals, self.roster.expire_ms
        ):
            raise NotFoundError(
                f"no live registration of {name!r} by this join token; register again",
                code="point_not_registered",
            )
        settings = self.roster.settings
        answer = {
            "object": "grifo.point_registration",
            "name": name,
            "heartbeat_s": settings.heartbeat_s,
            "expire_after_s": settings.expire_after_s,
        }
        return Response(200, msgspec.json.encode(answer))

    async def _deregister(self, token: JoinToken, name: str) -> Response:
        if not await asyncio.to_thread(self.roster.tables.deregister, name, token.id):
            raise NotFoundError(
                f"no registration of {name!r} by this join token", code="point_not_registered"
            )
        self.roster.remove(name, "deregistered", "deregistered")  # other processes: heartbeat_s
        answer = {"object": "grifo.point_registration", "name": name, "deregistered": True}
        return Response(200, msgspec.json.encode(answer))

    def _refuse(self, token: JoinToken, point: PointConfig, event: str, why: str) -> None:
        self.roster.events[event] += 1
        log.warning(
            "registration of %s (%s, %s) with join token %s refused: %s",
            point.name,
            point.jurisdiction,
            point.tier,
            token.id,
            why,
        )


async def _vet(url: str) -> str:
    """The address the gateway will connect to for `url`: its host resolved once, and every
    address it resolves to one that points may live on."""
    parsed = parse_point_url(url)
    assert parsed is not None  # point_problems checked it
    host, port = parsed
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise InvalidRequestError(f"cannot resolve the host of url {host!r}", param="url") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        reason = egress_refusal(address)
        if reason not in ALLOWED_ADDRESSES:
            raise InvalidRequestError(
                f"url: {host} resolves to a {reason} address, which the gateway does not "
                "connect to",
                param="url",
                code="url_refused",
            )
    if not addresses:
        raise InvalidRequestError(f"cannot resolve the host of url {host!r}", param="url")
    return addresses[0]


def _decode(kind: type[S], body: bytes) -> S:
    """A JSON body as `kind`, or 400 naming the field (as every grifo request is decoded)."""
    if len(body) > MAX_BODY:
        raise PayloadTooLargeError(f"the body is larger than {MAX_BODY} bytes")
    return decode_json(kind, body)


def _now_ms() -> int:
    return int(time.time() * 1000)
