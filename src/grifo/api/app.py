"""The gateway's HTTP surface: routes requests to the pipeline and turns errors into envelopes.

Every response, errors included, carries `x-request-id`. Unknown exceptions become a 500 with no
detail (the log has it, keyed by request id); client mistakes are always 4xx.
"""

from __future__ import annotations

import itertools
import logging
import math
import uuid
from collections.abc import Awaitable
from importlib import resources

from grifo.api.admin import PREFIXES as ADMIN_PREFIXES
from grifo.api.admin import ROUTES as ADMIN_ROUTES
from grifo.api.admin import AdminApi
from grifo.api.dashboard import asset, is_asset
from grifo.api.models import list_models
from grifo.errors import GrifoError, MethodNotAllowedError, NotFoundError
from grifo.http.message import Request, Response, StreamResponse
from grifo.registry.api import PREFIX as REGISTRY_PREFIX
from grifo.registry.api import RegistryApi
from grifo.service import Gateway
from grifo.telemetry.logs import REQUEST_ID
from grifo.telemetry.peers import merge
from grifo.telemetry.scrape import scrape

log = logging.getLogger("grifo.api")

_ID_PREFIX = f"req-{uuid.uuid4().hex[:16]}"
_ids = itertools.count(1)


def new_request_id() -> str:
    """Unique across processes (random per-process prefix) without a syscall per request."""
    return f"{_ID_PREFIX}{next(_ids):012x}"


async def _ready(response: Response) -> Response:
    return response


_INFERENCE = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/grifo/agent-runs"}
)
_GET = frozenset({"/v1/models", "/healthz", "/readyz", "/metrics", "/openapi.json"})
OPENAPI = resources.files("grifo.api").joinpath("openapi.json").read_bytes()  # the API, described


class GatewayApp:
    def __init__(
        self, gateway: Gateway, admin: AdminApi | None = None, registry: RegistryApi | None = None
    ) -> None:
        self.gateway = gateway
        self.admin = admin
        self.registry = registry  # points joining and leaving, when configured

    async def handle(self, request: Request) -> Response | StreamResponse:
        request_id = new_request_id()
        REQUEST_ID.set(request_id)  # on this request's log lines
        try:
            response = await self._route(request, request_id)
        except GrifoError as exc:
            response = Response(exc.status, exc.envelope())
            if exc.retry_after_s is not None:
                retry = str(max(1, math.ceil(exc.retry_after_s))).encode()
                response.headers.append((b"retry-after", retry))
            if exc.status >= 500:
                log.warning("%s %s -> %d %s", request_id, request.path, exc.status, exc.code)
        except Exception:
            log.exception("%s %s failed", request_id, request.path)
            error = GrifoError(f"internal error; quote request id {request_id}")
            response = Response(error.status, error.envelope())
        for name, _ in response.headers:
            if name == b"x-request-id":  # a replay keeps its own
                break
        else:
            response.headers.append((b"x-request-id", request_id.encode()))
        if log.isEnabledFor(logging.INFO):  # the access log: off at the default level
            log.info("%s %s %d", request.method, request.path, response.status)
        return response

    def _route(self, request: Request, request_id: str) -> Awaitable[Response | StreamResponse]:
        """The handler's answer, to await (a plain call: an inference request's coroutines
        are one level shallower on each of their resumptions)."""
        path = request.path
        if path in _INFERENCE:
            if request.method != "POST":
                raise MethodNotAllowedError(f"{path} accepts POST only")
            return self.gateway.infer(request, request_id)
        if path in _GET:
            if request.method not in ("GET", "HEAD"):
                raise MethodNotAllowedError(f"{path} accepts GET only")
            if path == "/metrics" and self.gateway.peers is not None:
                return self._merged_metrics()
            return _ready(self._get(request))
        if is_asset(path):
            if request.method not in ("GET", "HEAD"):
                raise MethodNotAllowedError(f"{path} accepts GET only")
            return _ready(asset(path))
        if (path in ADMIN_ROUTES or path.startswith(ADMIN_PREFIXES)) and self.admin is not None:
            return self.admin.handle(request)  # it checks the method of each route
        if self.registry is not None and (
            path == REGISTRY_PREFIX or path.startswith(REGISTRY_PREFIX + "/")
        ):
            return self.registry.handle(request)  # join tokens, not API keys
        raise NotFoundError(f"no route {request.method} {path}")

    def _get(self, request: Request) -> Response:
        if request.path == "/v1/models":
            return list_models(self.gateway, request)
        if request.path == "/healthz":
            return Response(200, b'{"status":"ok"}')
        if request.path == "/readyz":
            return self._readyz()
        if request.path == "/openapi.json":
            return Response(200, OPENAPI)
        return Response(200, scrape(self.gateway), content_type=b"text/plain; version=0.0.4")

    async def _merged_metrics(self) -> Response:
        """Every worker's metrics in one exposition (`serve --workers`: telemetry/peers.py)."""
        assert self.gateway.peers is not None
        others, missing = await self.gateway.peers.expositions()
        own = scrape(self.gateway).decode()
        body = merge([own, *others], workers=1 + len(others), missing=missing)
        return Response(200, body, content_type=b"text/plain; version=0.0.4")

    def _readyz(self) -> Response:
        import msgspec

        points = {
            p.name: {"ready": p.healthy, "jurisdiction": p.jurisdiction, "reason": p.reason}
            for p in self.gateway.points
        }
        ready = self.gateway.ready()
        body = msgspec.json.encode({"ready": ready, "points": points})
        return Response(200 if ready else 503, body)
