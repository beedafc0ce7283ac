"""Which KV-transfer address a decode instance advertises (engine.advertise, issue 9 item 4):
--advertise-host wins, a concrete bind host is kept, a wildcard bind advertises this host's own
routable address, and loopback only as a logged last resort."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from decode_service.server import DecodeServer
from engine.advertise import choose_advertise_host, discover_host_address, host_port, is_wildcard
from engine.instance import InstanceConfig

WILDCARDS = ["0.0.0.0", "[::]", "::", ""]


def no_discovery(bind_host: str) -> str | None:
    raise AssertionError(f"discovery must not run for bind host {bind_host!r}")


def discovers(address: str | None):
    return lambda bind_host: address


def ip(*args: str) -> str:
    """iproute2's answer (independent of the code under test); skips when `ip` is missing."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 `ip` not installed: cannot list this machine's addresses")
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10,
                          check=True).stdout


def global_addresses(version: int) -> set[str]:
    """This machine's global-scope IPv`version` addresses."""
    out = ip("-o", f"-{version}", "addr", "show", "scope", "global")
    return {line.split()[3].split("/")[0] for line in out.splitlines()}


def routable_ipv4_addresses() -> set[str]:
    """This machine's global IPv4 addresses, when it also has an IPv4 default route (without
    one, a wildcard bind advertises the host name's address, which may be loopback); skips
    otherwise."""
    addresses = global_addresses(4)
    if not addresses:
        pytest.skip("this machine has no global-scope IPv4 address, so a wildcard bind can only "
                    "advertise loopback here")
    if not ip("-4", "route", "show", "default").strip():
        pytest.skip("this machine has no IPv4 default route to find its own address by")
    return addresses


@pytest.mark.parametrize("bind", ["0.0.0.0", "10.1.2.3", "decode-3.internal", "[::]"])
def test_explicit_advertise_host_wins(bind):
    assert choose_advertise_host(bind, "kv.example.net", discover=no_discovery) == "kv.example.net"


@pytest.mark.parametrize("bind", ["10.1.2.3", "127.0.0.2", "decode-3.internal", "fd00::5",
                                  "[fd00::5]"])
def test_concrete_bind_host_is_advertised_as_is(bind):
    assert choose_advertise_host(bind, None, discover=no_discovery) == bind


@pytest.mark.parametrize("bind", WILDCARDS)
def test_wildcard_bind_advertises_the_discovered_address(bind):
    assert is_wildcard(bind)
    assert choose_advertise_host(bind, None, discover=discovers("10.9.8.7")) == "10.9.8.7"
    assert choose_advertise_host(bind, "", discover=discovers("10.9.8.7")) == "10.9.8.7"


@pytest.mark.parametrize("bind, loopback", [("0.0.0.0", "127.0.0.1"), ("[::]", "::1")])
def test_wildcard_without_routable_address_falls_back_to_loopback_with_warning(bind, loopback,
                                                                                 caplog):
    with caplog.at_level(logging.WARNING, logger="tandem.advertise"):
        assert choose_advertise_host(bind, None, discover=discovers(None)) == loopback
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "--advertise-host" in record.getMessage()
    assert "multi-host will fail" in record.getMessage()


def test_concrete_and_explicit_hosts_log_no_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="tandem.advertise"):
        choose_advertise_host("127.0.0.1", None, discover=no_discovery)
        choose_advertise_host("0.0.0.0", "10.0.0.1", discover=no_discovery)
    assert not caplog.records


@pytest.mark.parametrize("host, expected", [
    ("10.0.0.1", "10.0.0.1:8300"), ("decode-3.internal", "decode-3.internal:8300"),
    ("fd00::2", "[fd00::2]:8300"), ("::1", "[::1]:8300"), ("[fd00::2]", "[fd00::2]:8300")])
def test_host_port_brackets_ipv6(host, expected):
    assert host_port(host, 8300) == expected


def test_discovery_finds_a_global_address_of_this_machine():
    """The real probe (default route, then host name) on this machine, checked against the
    global addresses iproute2 lists."""
    addresses = routable_ipv4_addresses()
    assert discover_host_address("0.0.0.0") in addresses
    found6 = discover_host_address("[::]")
    assert found6 in addresses | global_addresses(6)


def test_decode_bound_to_wildcard_advertises_a_non_loopback_address():
    """The README's `tandem decode` (default --host 0.0.0.0, no --advertise-host) must advertise
    an address other hosts can reach, not 127.0.0.1 (which made remote prefill push to itself).
    Constructing the server decides the address; nothing is started."""
    addresses = routable_ipv4_addresses()
    config = InstanceConfig(model_dir=Path("unused"), served_model_name="unused")
    server = DecodeServer(config, "0.0.0.0", 0)
    assert server.advertise_host in addresses
    assert not ipaddress.ip_address(server.advertise_host).is_loopback
    assert DecodeServer(config, "0.0.0.0", 0, advertise_host="kv.example.net").advertise_host == \
        "kv.example.net"
    assert DecodeServer(config, "127.0.0.2", 0).advertise_host == "127.0.0.2"


def test_grpc_servers_bind_bare_ipv6_and_empty_hosts():
    """`--host ::` and an empty host bind every interface (they used to fail as ":::0")."""
    from engine.grpc_server import GrpcServer

    async def bound_port(host: str) -> int:  # grpc.aio servers are made inside a running loop
        return GrpcServer(host, 0).port

    for host in ("::", ""):
        try:
            port = asyncio.run(bound_port(host))
        except OSError as error:
            if "::" in str(error) and not socket.has_ipv6:
                pytest.skip("no IPv6 on this machine")
            raise
        assert port > 0
