"""The client's address behind trusted proxies (``SCRIBE_EVENTS_TRUSTED_PROXIES``).

A request's forwarding header (``X-Forwarded-For``, or ``Forwarded`` (RFC 7239) with
``SCRIBE_EVENTS_FORWARDED_HEADER=forwarded``: only the one the proxy writes, never the other,
which a client could send through it) is believed only when the direct peer is a trusted proxy;
otherwise it is ignored, so a client cannot pick the address that bans and limits see. Behind several trusted hops the client is the right-most address
that is not one of them (each proxy appends the peer it saw); an entry that is not an address
(``unknown``, an obfuscated name, garbage) ends the walk at the trusted hop that reported it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_HOPS = 32  # entries of a forwarding header looked at, from the right


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """Addresses or CIDR blocks (``10.0.0.0/8``, ``::1``); ValueError naming a bad one."""
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an IP address or network: {value!r}") from None
    return tuple(out)


def _address(text: str) -> str | None:
    """The normal form of an address as a forwarding header writes it (``"[::1]:80"``, ``1.2.3.4:5``)."""
    text = text.strip().strip('"')
    if text.startswith("["):  # [IPv6] or [IPv6]:port
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:  # IPv4:port
        text = text.split(":", 1)[0]
    try:
        return _plain(ipaddress.ip_address(text))
    except ValueError:
        return None


def _plain(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address in its normal form; an IPv4-mapped IPv6 one (``::ffff:1.2.3.4``) as IPv4."""
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped if mapped is not None else ip)


def _forwarded_for(value: str) -> list[str | None]:
    hops: list[str | None] = []
    for element in value.split(","):
        found: str | None = None
        for pair in element.split(";"):
            name, _, v = pair.partition("=")
            if name.strip().lower() == "for":
                found = _address(v)
        hops.append(found)
    return hops


def _joined(scope: dict[str, Any], name: bytes) -> str | None:
    """Every value of a header, in order, as one comma-separated list (None: absent)."""
    values = [v.decode("latin-1") for n, v in scope["headers"] if n == name]
    return ",".join(values) if values else None


class TrustedProxies:
    def __init__(self, networks: Iterable[str], header: str = "x-forwarded-for") -> None:
        self.networks = parse_networks(networks)
        self.header = header.lower().encode()

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: object) -> bool:
        return isinstance(address, str) and self.trusted(address)

    def trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        mapped = getattr(ip, "ipv4_mapped", None)
        return any(ip in net or (mapped is not None and mapped in net) for net in self.networks)

    def client(self, scope: dict[str, Any]) -> tuple[str, int] | None:
        """The client behind the proxies, or None to keep the direct peer."""
        peer = scope.get("client")
        if not peer or not self.trusted(peer[0]):
            return None
        value = _joined(scope, self.header)
        if value is None:
            return None
        hops = (
            _forwarded_for(value) if self.header == b"forwarded" else [_address(h) for h in value.split(",")]
        )
        client = peer[0]
        for hop in reversed(hops[-MAX_HOPS:]):
            if hop is None:
                break  # the trusted hop on its right cannot tell who sent it
            client = hop
            if not self.trusted(hop):
                break
        return (client, 0) if client != peer[0] else None
