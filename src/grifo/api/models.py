"""`GET /v1/models`: the models a caller can reach, with the jurisdictions that serve them."""

from __future__ import annotations

from grifo.http.message import Request, Response
from grifo.placement.jurisdiction import request_policy
from grifo.service import Gateway
from grifo.wire.responses import model_list


def list_models(gateway: Gateway, request: Request) -> Response:
    principal = gateway.keys.authenticate(request.headers.get(b"authorization"))
    _, allowed, _ = request_policy(principal, request.headers, gateway.blocs)
    cards: dict[str, dict[str, object]] = {}
    for point in gateway.points:
        if allowed is not None and point.jurisdiction not in allowed:
            continue
        for model in point.models.values():
            if principal.models is not None and model.id not in principal.models:
                continue
            card = cards.setdefault(
                model.id,
                {
                    "id": model.id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "grifo",
                    "kind": model.kind,
                    "context_length": model.context_length,
                    "jurisdictions": [],
                },
            )
            jurisdictions = card["jurisdictions"]
            assert isinstance(jurisdictions, list)
            if point.jurisdiction not in jurisdictions:
                jurisdictions.append(point.jurisdiction)
    return Response(200, model_list(sorted(cards.values(), key=lambda c: str(c["id"]))))
