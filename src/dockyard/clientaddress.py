"""Who the client is: the TCP peer, or what trusted proxies say in ``X-Forwarded-For``.

registry:2 believes ``X-Forwarded-For`` from anyone. Dockyard believes it only from peers listed
in ``http.trustedproxies`` (addresses or networks; empty by default): anyone else could write
any address there and so escape a per-address limit or frame another client. From a trusted
peer the header is read from the right, because each proxy appends the address it saw: the
rightmost entry that is not itself a trusted proxy is the client. An entry that is not an
address ends the walk (everything left of it was written by someone we cannot vouch for), and
the last address that was vouched for is the answer.

Addresses are compared in one canonical form (an IPv4 client seen on a dual-stack socket as
``::ffff:192.0.2.1`` is ``192.0.2.1``). Limits key IPv6 clients by their /64 network: one host
is usually handed a whole /64, so counting single IPv6 addresses would count nothing.

Loaded by the supervising parent too, so it imports nothing of the HTTP stack.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: the prefix length a limit counts an IPv6 client by
IPV6_LIMIT_PREFIX = 64


def parse_address(text: str) -> IPAddress | None:
    """An address in canonical form (IPv4-mapped IPv6 unmapped), or None if ``text`` is not one.

    Accepts what proxies write into ``X-Forwarded-For``: a bare address, ``[v6]``, and an
    address with a port (``192.0.2.1:4711``, ``[2001:db8::1]:4711``)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        text = host
    elif text.count(":") == 1:  # IPv4 with a port; IPv6 has at least two colons
        host, _, port = text.partition(":")
        if not port.isdigit():
            return None
        text = host
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def canonical(text: str) -> str:
    """``text`` in canonical form if it is an address; otherwise unchanged (e.g. a unix
    socket's empty peer)."""
    address = parse_address(text)
    return text if address is None else str(address)


def limit_key(address: str) -> str:
    """What a per-client limit counts ``address`` as: itself for IPv4, its /64 for IPv6."""
    parsed = parse_address(address)
    if parsed is None:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((parsed, IPV6_LIMIT_PREFIX), strict=False))
    return str(parsed)


class TrustedProxies:
    """The peers whose ``X-Forwarded-For`` is believed (``http.trustedproxies``)."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        # Peers are unmapped before they are compared (parse_address), so an IPv4 entry also
        # matches that address seen on a dual-stack socket.
        self.networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
            ipaddress.ip_network(entry.strip(), strict=False) for entry in entries
        )

    def __bool__(self) -> bool:
        return bool(self.networks)

    def _trusts(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)

    def trusts(self, peer: str) -> bool:
        address = parse_address(peer)
        return address is not None and self._trusts(address)

    def client(self, peer: str, forwarded_for: Iterable[str] = ()) -> str:
        """The client's address: ``peer`` itself unless it is a trusted proxy; then the
        rightmost ``X-Forwarded-For`` entry that is not a trusted proxy (``forwarded_for``: the
        header's values, in the order they were received)."""
        current = parse_address(peer)
        if current is None:
            return peer
        if not self._trusts(current):
            return str(current)
        hops = [hop for value in forwarded_for for hop in value.split(",")]
        for hop in reversed(hops):
            address = parse_address(hop)
            if address is None:
                break  # not an address: nothing further left can be vouched for
            current = address
            if not self._trusts(address):
                break
        return str(current)
