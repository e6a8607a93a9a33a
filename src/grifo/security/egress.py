"""Which addresses grifo may connect to on someone's word (the SSRF rules): an agent's HTTP
tool, a point registering its URL.

A tool reaches only its configured host; this module decides whether the addresses that host
resolves to are acceptable. Non-public addresses (loopback, RFC 1918, ULA, link-local, CGNAT,
unspecified, multicast, reserved, documentation, IPv4 hidden inside IPv6, ...) are refused
unless the tool is marked `private`; known cloud metadata addresses are refused always.
The tables are explicit so the verdict does not drift with the Python version's `ipaddress`.
"""

from __future__ import annotations

import asyncio
import socket
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

from grifo.agent.tools.base import EgressRefusedError, ToolError

IpAddress = IPv4Address | IPv6Address

METADATA_ADDRESSES: frozenset[IpAddress] = frozenset(
    ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OCI, DigitalOcean, OpenStack instance metadata
        "169.254.170.2",  # AWS ECS task metadata and credentials
        "169.254.0.23",  # Tencent Cloud metadata
        "100.100.100.200",  # Alibaba Cloud metadata
        "168.63.129.16",  # Azure WireServer (platform agent channel)
        "fd00:ec2::254",  # AWS instance metadata over IPv6
    )
)
"""Refused even when the tool is `private`: no intended API lives there."""

_V4_DENY: tuple[tuple[IPv4Network, str], ...] = tuple(
    (IPv4Network(net), why)
    for net, why in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared (CGNAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "special-purpose"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # includes broadcast 255.255.255.255
    )
)

_V6_DENY: tuple[tuple[IPv6Network, str], ...] = tuple(
    (IPv6Network(net), why)
    for net, why in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible"),
        ("::ffff:0:0/96", "IPv4-mapped"),
        ("::ffff:0:0:0/96", "IPv4-translated"),
        ("64:ff9b:1::/48", "local NAT64"),
        ("100::/64", "discard"),
        ("2001::/23", "special-purpose"),  # includes Teredo 2001::/32
        ("2001:db8::/32", "documentation"),
        ("2002::/16", "6to4"),
        ("3fff::/20", "documentation"),
        ("5f00::/16", "segment-routing"),
        ("fc00::/7", "private (ULA)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)

_NAT64 = IPv6Network("64:ff9b::/96")  # DNS64/NAT64 well-known prefix: a public IPv4 inside


def _embedded_v4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, translated, compatible, NAT64, 6to4,
    Teredo client), if any: the packet may well end up there."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    value = int(address)
    compatible = value >> 32 == 0 and value > 1  # ::a.b.c.d (but not :: or ::1)
    if compatible or value >> 32 == 0xFFFF0000 or address in _NAT64:  # or ::ffff:0:a.b.c.d
        return IPv4Address(value & 0xFFFFFFFF)
    return None


def egress_refusal(address: str | IpAddress, *, private: bool = False) -> str | None:
    """Why a connection to `address` is refused ("loopback", "cloud metadata", ...), or None
    when it is allowed. `private` allows every address but the metadata ones. A string that
    is not an IP address is refused."""
    if isinstance(address, str):
        try:
            address = ip_address(address)
        except ValueError:
            return "unparseable"
    if isinstance(address, IPv6Address) and address.scope_id is not None:
        address = IPv6Address(int(address))  # fe80::1%eth0 -> fe80::1
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    embedded = _embedded_v4(address) if isinstance(address, IPv6Address) else None
    if embedded is not None:
        reason = egress_refusal(embedded, private=private)
        if reason is not None:
            return f"{reason} (IPv4 inside IPv6)"
    if private:
        return None
    table = _V4_DENY if isinstance(address, IPv4Address) else _V6_DENY
    for network, why in table:
        if address in network:
            return why
    if embedded is not None and address in _NAT64:
        return None  # NAT64 of an address that passed the IPv4 rules
    if not address.is_global or address.is_multicast or address.is_reserved:
        return "non-public"
    return None


async def resolve_allowed(host: str, port: int, *, private: bool = False) -> list[str]:
    """Resolve `host` once and return its addresses, all allowed: the caller connects to these
    (never resolving again, so a rebinding DNS answer cannot swap them). Raises
    EgressRefusedError when ANY address is refused, ToolError when the name does not resolve.
    Messages name the host and the kind of address, never the address itself."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except (OSError, UnicodeError) as exc:
        raise ToolError(f"cannot resolve the host {host}") from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise ToolError(f"cannot resolve the host {host}")
    for address in addresses:
        reason = egress_refusal(address, private=private)
        if reason is not None:
            raise EgressRefusedError(
                f"egress refused: {host} resolves to a {reason} address, which this tool "
                "may not reach"
            )
    return addresses
