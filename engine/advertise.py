"""Which address an instance tells its peers to reach it on (today: decode's KV-transfer endpoint,
which prefill instances on other hosts push to).

`choose_advertise_host` decides; `discover_host_address` finds this host's own routable address
for a wildcard bind; `host_port` formats host:port (IPv6 bracketed). Standard library only.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Callable

logger = logging.getLogger("tandem.advertise")

IPV4_WILDCARDS = frozenset({"0.0.0.0"})
IPV6_WILDCARDS = frozenset({"", "::", "[::]"})  # "" binds every interface (gRPC: both families)

# Destinations only used to ask the kernel which source address the default route would use: a
# UDP connect() sends nothing. Documentation prefixes (RFC 5737, RFC 3849): never actually local.
_PROBE_TARGETS = {socket.AF_INET: "198.51.100.1", socket.AF_INET6: "2001:db8::1"}


def is_wildcard(host: str) -> bool:
    """True when binding `host` listens on every interface (0.0.0.0, ::, [::], empty)."""
    return host.strip() in IPV4_WILDCARDS | IPV6_WILDCARDS


def _routable(address: str) -> bool:
    """True for a unicast address another host could route to: not loopback, unspecified,
    link-local (needs a scope id) or multicast."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_unspecified or ip.is_link_local or ip.is_multicast)


def default_route_address(family: int) -> str | None:
    """The source address this host's routing table picks for traffic leaving on the default
    route, or None when there is no such route (or only a loopback/link-local source)."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((_PROBE_TARGETS[family], 9))
            address = sock.getsockname()[0]
    except OSError:
        return None
    return address if _routable(address) else None


def hostname_address(family: int) -> str | None:
    """The first routable address `socket.gethostname()` resolves to in `family`, or None."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, family, socket.SOCK_STREAM)
    except OSError:
        return None
    return next((info[4][0] for info in infos if _routable(info[4][0])), None)


def discover_host_address(bind_host: str) -> str | None:
    """This host's own routable address that a wildcard bind of `bind_host` listens on: the
    default route's source address, else the host name's address; IPv4 first, IPv6 too only
    when the bind covers IPv6 (::, [::], empty). None when there is none."""
    families = [socket.AF_INET]
    if bind_host.strip() in IPV6_WILDCARDS and socket.has_ipv6:
        families.append(socket.AF_INET6)
    for probe in (default_route_address, hostname_address):
        for family in families:
            address = probe(family)
            if address:
                return address
    return None


def choose_advertise_host(bind_host: str, explicit: str | None = None, *,
                   discover: Callable[[str], str | None] = discover_host_address) -> str:
    """The host peers should use to reach a server bound to `bind_host`.

    1. `explicit` (--advertise-host) wins when given;
    2. a concrete bind host (an address or a name) is advertised as is;
    3. a wildcard bind (0.0.0.0, ::, [::], empty) advertises `discover(bind_host)`, this host's
       own routable address;
    4. only when that finds none: loopback, with a WARNING that peers on other hosts will fail
       and --advertise-host is needed.
    The result is a bare host (IPv6 unbracketed unless given bracketed); format with `host_port`.
    """
    if explicit:
        return explicit
    if not is_wildcard(bind_host):
        return bind_host
    found = discover(bind_host)
    if found:
        return found
    loopback = "127.0.0.1" if bind_host.strip() in IPV4_WILDCARDS else "::1"
    logger.warning("bound to %r but found no routable address of this host; advertising %s, so "
                   "instances on other hosts cannot reach this one (multi-host will fail): pass "
                   "--advertise-host HOST", bind_host, loopback)
    return loopback


def host_port(host: str, port: int) -> str:
    """"host:port" for gRPC targets and logs; a bare IPv6 address gets brackets."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"
