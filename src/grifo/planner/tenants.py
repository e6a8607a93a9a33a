"""Who sends each trace request, and where it may run.

Traces carry no tenants. Each task (a request with its dependent steps) is given one of the
topology's tenants, drawn uniformly with `random.Random(seed)` in the order tasks start; every
step of a task belongs to its tenant. A topology without tenants gets one unrestricted tenant.
The jurisdictions and tier of a request come from the gateway's own policy functions
(`request_policy`, `requested_tier`) applied to the tenant's principal with no request
headers, i.e. its default data class.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from grifo.admission.shedding import PRIORITIES
from grifo.config.model import GrifoConfig, TenantConfig
from grifo.jurisdictions import expand, merge_blocs
from grifo.placement.jurisdiction import request_policy, requested_tier
from grifo.planner.trace import TraceRequest
from grifo.security.keys import Principal

ANYONE = TenantConfig(name="anyone")


@dataclass(frozen=True, slots=True)
class Sender:
    tenant: str
    allowed: frozenset[str] | None  # None: anywhere
    tier: str | None  # None: any tier
    data_class: str


def principal(tenant: TenantConfig, blocs: Mapping[str, frozenset[str]]) -> Principal:
    """The principal the gateway builds for a key of `tenant` (see security/provision.py)."""
    allowed = (
        None
        if tenant.allowed_jurisdictions is None
        else expand(tenant.allowed_jurisdictions, blocs)
    )
    classes = {
        c: None if codes is None else expand(codes, blocs)
        for c, codes in tenant.data_classes.items()
    }
    redacted = {c: expand(codes, blocs) for c, codes in tenant.redacted_to.items()}
    return Principal(
        tenant.name,
        f"planner-{tenant.name}",
        allowed,
        None if tenant.tier == "any" else tenant.tier,
        tenant.timeout_ms / 1000 if tenant.timeout_ms else None,
        "user",
        classes or None,
        tenant.default_data_class or "",
        None,
        None,
        redacted or None,
        PRIORITIES[tenant.priority],
    )


def senders(config: GrifoConfig) -> dict[str, Sender]:
    """Each tenant's default request: its allowed set and tier, by the gateway's rules."""
    blocs = merge_blocs(config.blocs)
    out: dict[str, Sender] = {}
    for tenant in config.tenants or [ANYONE]:
        p = principal(tenant, blocs)
        data_class, allowed, _ = request_policy(p, {}, blocs)
        out[tenant.name] = Sender(tenant.name, allowed, requested_tier(p.tier, None), data_class)
    return out


def assign(requests: Sequence[TraceRequest], names: Sequence[str], seed: int) -> dict[int, str]:
    """Tenant of every request (by index): one seeded draw per task, in task order."""
    if not names:
        raise ValueError("no tenants to assign")
    rng = random.Random(seed)
    by_task: dict[int, str] = {}
    out: dict[int, str] = {}
    for r in requests:
        if r.task not in by_task:
            by_task[r.task] = rng.choice(list(names))
        out[r.index] = by_task[r.task]
    return out
