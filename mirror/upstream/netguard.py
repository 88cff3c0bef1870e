"""How internal an IP address is: the ranking the upstream target guard compares.

    PUBLIC  <  PRIVATE  <  LOOPBACK          SPECIAL: never a target

PRIVATE is every range that reaches only an organisation's own network: RFC 1918,
carrier-grade NAT (100.64/10), benchmarking (198.18/15), IPv6 unique-local (fc00::/7).
SPECIAL is what no upstream may ever send the mirror to: link-local (169.254/16 and
fe80::/10, where cloud metadata endpoints live, and the few metadata endpoints that
sit elsewhere), unspecified, multicast, broadcast, reserved and documentation ranges,
and IPv6 transition forms whose real destination cannot be told.

IPv4 carried inside IPv6 (mapped ::ffff:a.b.c.d, NAT64 64:ff9b::/96, 6to4 2002::/16)
is ranked as the IPv4 address it reaches, so `::ffff:127.0.0.1` is loopback.
"""

from __future__ import annotations

import enum
import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Reach(enum.IntEnum):
    """How far inside the network an address is; a larger value is more internal."""

    PUBLIC = 1
    PRIVATE = 2
    LOOPBACK = 3
    SPECIAL = 4


def _nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


_V4_SPECIAL = _nets(
    "0.0.0.0/8",  # "this network"; 0.0.0.0 reaches the local host on Linux
    "169.254.0.0/16",  # link-local: cloud metadata endpoints
    "192.0.0.0/24",  # IETF protocol assignments (Oracle's metadata endpoint is here)
    "192.0.2.0/24",  # documentation
    "192.88.99.0/24",  # deprecated 6to4 relay anycast
    "198.51.100.0/24",  # documentation
    "203.0.113.0/24",  # documentation
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and the broadcast address
    "100.100.100.200/32",  # Alibaba Cloud's metadata endpoint, inside the CGNAT range
)
_V4_LOOPBACK = _nets("127.0.0.0/8")
_V4_PRIVATE = _nets(
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",  # carrier-grade NAT
    "198.18.0.0/15",  # benchmarking, used inside networks
)
_V6_SPECIAL = _nets(
    "::/96",  # unspecified and the deprecated IPv4-compatible form (::1 is checked first)
    "100::/64",  # discard-only
    "2001::/23",  # IETF protocol assignments, Teredo among them (its target is obscured)
    "2001:db8::/32",  # documentation
    "fd00:ec2::254/128",  # AWS's IPv6 metadata endpoint, inside the unique-local range
    "fe80::/10",  # link-local
    "fec0::/10",  # deprecated site-local
    "ff00::/8",  # multicast
)
_V6_PRIVATE = _nets("fc00::/7")
_V6_GLOBAL = _nets("2000::/3")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries and reaches (mapped, NAT64, 6to4), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def classify(address: IPAddress) -> Reach:
    """The reach of one address."""
    if isinstance(address, ipaddress.IPv6Address):
        carried = embedded_ipv4(address)
        if carried is not None:
            return classify(carried)
        if address == ipaddress.IPv6Address("::1"):
            return Reach.LOOPBACK
        if any(address in net for net in _V6_SPECIAL):
            return Reach.SPECIAL
        if any(address in net for net in _V6_PRIVATE):
            return Reach.PRIVATE
        # Outside global unicast, everything else is reserved.
        return Reach.PUBLIC if any(address in net for net in _V6_GLOBAL) else Reach.SPECIAL
    if any(address in net for net in _V4_SPECIAL):
        return Reach.SPECIAL
    if any(address in net for net in _V4_LOOPBACK):
        return Reach.LOOPBACK
    if any(address in net for net in _V4_PRIVATE):
        return Reach.PRIVATE
    return Reach.PUBLIC


def parse_address(text: str) -> IPAddress | None:
    """`text` as an IP address (an IPv6 zone is dropped), or None when it is a name."""
    try:
        return ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None


def classify_text(text: str) -> Reach:
    """The reach of an address given as text; an unparsable one is SPECIAL."""
    address = parse_address(text)
    return Reach.SPECIAL if address is None else classify(address)
