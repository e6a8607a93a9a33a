"""The live dashboard: `/ui` is a static page (no data, no CDN: the files in `ui/`); it polls
`GET /admin/dashboard` with an admin-role key, which answers what that key may see.

Points (with their state, load, answer times and requests served) are shown to every admin
role; budgets, recent placement decisions and the audit log's tail only for the tenants the key
sees (`Principal.sees`): a tenant admin or auditor sees its own tenant, an admin all.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from grifo.errors import NotFoundError, StoreUnavailableError
from grifo.http.message import Response
from grifo.security.keys import Principal
from grifo.telemetry.fabric import point_states

if TYPE_CHECKING:
    from grifo.service import Gateway

_ASSETS = {
    "/ui": ("index.html", b"text/html; charset=utf-8"),
    "/ui/": ("index.html", b"text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", b"text/javascript; charset=utf-8"),
    "/ui/app.css": ("app.css", b"text/css; charset=utf-8"),
}
_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:"),
    (b"cache-control", b"no-cache"),
    (b"x-content-type-options", b"nosniff"),
]


def asset(path: str) -> Response:
    """A file of the dashboard page; they hold no data, so they need no key."""
    found = _ASSETS.get(path)
    if found is None:
        raise NotFoundError(f"no route GET {path}")
    name, content_type = found
    body = resources.files("grifo.api").joinpath("ui", name).read_bytes()
    return Response(200, body, headers=list(_HEADERS), content_type=content_type)


def is_asset(path: str) -> bool:
    return path in _ASSETS


def dashboard_state(gateway: Gateway, principal: Principal) -> dict[str, Any]:
    """Everything the page shows, as this key may see it."""
    points = point_states(gateway)
    by_name = {p.name: p for p in gateway.points}
    for row in points:
        state = by_name[row["name"]]
        row["answered"] = state.answered
        row["answer_p50_ms"] = _ms(state.answer_s, 0.5)
        row["answer_p99_ms"] = _ms(state.answer_s, 0.99)
        row["first_token_p50_ms"] = _ms(state.first_token_s, 0.5)
        row["first_token_p99_ms"] = _ms(state.first_token_s, 0.99)
    budgets = []
    if gateway.budgets is not None:
        with contextlib.suppress(StoreUnavailableError):
            budgets = [
                {
                    "tenant": burn.tenant,
                    "limit_micros": burn.limit_micros,
                    "spent_micros": burn.spent_micros,
                    "rate_micros_per_hour": burn.rate_micros_per_hour,
                    "projected_micros": burn.projected_micros,
                    "runs_out_at": _iso(burn.runs_out_at),
                }
                for burn in gateway.budgets.burn()
                if principal.sees(burn.tenant)
            ]
    placements = [
        {
            "ts": ts,
            "request_id": request_id,
            "tenant": tenant,
            "model": model,
            "point": point,
            "candidates": [
                f"{c.point.name} ({c.point.jurisdiction}) {c.score_ms:.1f}" for c in candidates
            ],
            "reason": _reason(candidates, tried),
        }
        for ts, request_id, tenant, model, point, candidates, tried in reversed(gateway.placements)
        if principal.sees(tenant)
    ]
    audit = []
    if gateway.audit is not None:
        audit = [
            {
                "seq": r.seq,
                "done_ms": r.done_ms,
                "request_id": r.request_id,
                "tenant": r.tenant,
                "point": r.point,
                "jurisdiction": r.jurisdiction,
                "status": r.status,
                "cost_micros": r.cost_micros,
            }
            for r in reversed(gateway.audit.recent)
            if principal.sees(r.tenant)
        ]
    return {
        "now": time.time(),
        "role": principal.role,
        "tenant": principal.tenant,
        "points": points,
        "budgets": budgets,
        "placements": placements,
        "audit": audit,
    }


def _ms(window: Any, q: float) -> float | None:
    return round(window.quantile(q) * 1000, 2) if len(window) else None


def _reason(candidates: Any, tried: list[Any]) -> str:
    if tried:
        moved = ", ".join(f"{point.name}: {outcome}" for point, outcome in tried)
        return f"moved on from {moved}"
    if len(candidates) == 1:
        return "the only compliant point serving the model"
    return f"best score of {len(candidates)} compliant candidates"


def _iso(moment: dt.datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()
