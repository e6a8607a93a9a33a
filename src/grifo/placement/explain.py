"""`grifo policy explain`: where a tenant's requests of a data class may run, and why."""

from __future__ import annotations

from grifo.config.load import ConfigError
from grifo.config.model import GrifoConfig
from grifo.jurisdictions import expand, merge_blocs


def explain(config: GrifoConfig, tenant_name: str, data_class: str | None = None) -> list[str]:
    tenant = next((t for t in config.tenants if t.name == tenant_name), None)
    if tenant is None:
        raise ConfigError(f"no tenant named {tenant_name!r}")
    where = f"tenants[{config.tenants.index(tenant)}]"
    name = data_class if data_class is not None else (tenant.default_data_class or "")
    if name and name not in tenant.data_classes:
        known = ", ".join(sorted(tenant.data_classes)) or "none"
        raise ConfigError(f"tenant {tenant_name!r} has no data class {name!r} (it has: {known})")
    if name:
        codes = tenant.data_classes[name]
        source = f"{where}.data_classes.{name}"
        if data_class is None:
            source += " (its default_data_class, used when a request names none)"
    else:
        codes = tenant.allowed_jurisdictions
        source = f"{where}.allowed_jurisdictions"
    allowed = None if codes is None else expand(codes, merge_blocs(config.blocs))
    shown = (
        "anywhere (unrestricted)" if allowed is None else ", ".join(sorted(allowed)) or "nowhere"
    )
    lines = [
        f"tenant {tenant_name}, data class {name or '(none)'}",
        f"allowed: {shown}",
        f"because: {source} = {codes if codes is not None else 'null'}",
        "points:",
    ]
    for point in config.points:
        inside = allowed is None or point.jurisdiction in allowed
        mark = "yes" if inside else "no "
        why = "" if inside else f"  ({point.jurisdiction} is outside the allowed set)"
        lines.append(f"  {mark} {point.name:<24} {point.jurisdiction}  {point.tier}{why}")
    lines.append(
        "A request may narrow this with x-grifo-allowed-jurisdictions, never widen it; "
        "retries and failover stay inside it, and with no point left the answer is 503."
    )
    return lines
