"""docker-compose.yml and deploy/nginx.conf agree (docker cannot run here, so they are read).

nginx resolves upstream names once, at start: compose therefore gives every gateway a fixed
address on its network and hands nginx those addresses, and nginx.conf has a server line for
each. A gateway copied without an address, an address outside the subnet, or an address nginx
is not told about would each send clients to the wrong place or to nobody.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
NGINX_TEMPLATE = (REPO / "deploy" / "nginx.conf").read_text()


def _gateways() -> dict[str, dict]:
    return {name: service for name, service in COMPOSE["services"].items() if service.get("image") == "harken:latest"}


def _network() -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Network]:
    """The default network's subnet, and the range Docker assigns addresses from by itself."""
    (config,) = COMPOSE["networks"]["default"]["ipam"]["config"]
    return ipaddress.ip_network(config["subnet"]), ipaddress.ip_network(config["ip_range"])


def _fixed_address(service: dict) -> str | None:
    return ((service.get("networks") or {}).get("default") or {}).get("ipv4_address")


def test_every_gateway_has_its_own_fixed_address_that_docker_never_gives_another_container():
    gateways = _gateways()
    assert len(gateways) >= 2
    addresses = {name: _fixed_address(service) for name, service in gateways.items()}
    assert all(addresses.values()), f"gateways without a fixed address: {addresses}"
    assert len(set(addresses.values())) == len(addresses), f"two gateways share an address: {addresses}"
    subnet, dynamic = _network()
    assert dynamic.subnet_of(subnet)
    for name, address in addresses.items():
        ip = ipaddress.ip_address(address)
        assert ip in subnet and ip not in (subnet.network_address, subnet.broadcast_address), (name, address)
        # postgres and nginx get addresses from the dynamic range: one of them starting first
        # must not be able to take a gateway's address.
        assert ip not in dynamic, (name, address)
        assert ip != next(subnet.hosts()), (name, address)      # Docker's gateway for the network


def test_nginx_is_given_exactly_the_gateways_fixed_addresses():
    environment = COMPOSE["services"]["nginx"]["environment"]
    placeholders = re.findall(r"server \$\{(GATEWAY_\d+)\}", NGINX_TEMPLATE)
    assert placeholders, "deploy/nginx.conf names no gateway placeholders"
    given = {environment[p] for p in placeholders}
    expected = {f"{_fixed_address(service)}:{service['environment']['HARKEN_PORT']}"
                for service in _gateways().values()}
    assert given == expected
    # Names would be resolved once and go stale when a gateway container is recreated.
    assert all(re.fullmatch(r"[\d.]+:\d+", target) for target in given), given


def test_gateways_outlast_their_drain_before_docker_kills_them():
    for name, service in _gateways().items():
        grace = int(str(service["stop_grace_period"]).rstrip("s"))
        assert grace > float(service["environment"]["HARKEN_DRAIN_TIMEOUT"]), name
