"""SSRF protection's address policy (webhookd.netguard), its messages, and its settings.

The policy is a pure function of an address and the settings, so most of this is a table. The
resolver is exercised here with a stand-in for DNS only (no sockets); the connections it guards
are tested for real in tests/integration/test_ssrf.py.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from hypothesis import given
from hypothesis import strategies as st

from webhookd.errors import ConfigError
from webhookd.netguard import (
    AddressPolicy,
    BlockedAddressError,
    GuardedResolver,
    check_url_host,
)
from webhookd.settings import DeliverySettings, Settings, load_settings

DEFAULT = AddressPolicy()
PRIVATE = AddressPolicy(allow_private=True)

# (address, the range that blocks it by default (None: public), allow_private_networks opens it).
# Deprecated or tunnelling forms (IPv4-compatible, SIIT, Teredo) stay blocked whatever they carry.
TABLE: list[tuple[str, str | None, bool]] = [
    # IPv4: public
    ("8.8.8.8", None, False),
    ("1.1.1.1", None, False),
    ("93.184.216.34", None, False),
    ("100.63.255.255", None, False),  # just below CGNAT
    ("100.128.0.0", None, False),  # just above CGNAT
    ("172.15.255.255", None, False),  # just below 172.16/12
    ("172.32.0.0", None, False),  # just above it
    ("192.0.0.9", None, False),  # PCP anycast: globally reachable
    ("192.0.0.10", None, False),  # TURN anycast: globally reachable
    ("192.31.196.1", None, False),  # AS112: globally reachable
    ("198.17.255.255", None, False),
    ("198.20.0.0", None, False),  # just above benchmarking
    ("223.255.255.255", None, False),  # the last unicast address
    # IPv4: unspecified, "this network", loopback
    ("0.0.0.0", "0.0.0.0/32", False),
    ("0.1.2.3", "0.0.0.0/8", False),
    ("127.0.0.1", "127.0.0.0/8", True),
    ("127.255.255.254", "127.0.0.0/8", True),
    # private (RFC 1918) and CGNAT
    ("10.0.0.1", "10.0.0.0/8", True),
    ("10.255.255.255", "10.0.0.0/8", True),
    ("172.16.0.1", "172.16.0.0/12", True),
    ("172.31.255.254", "172.16.0.0/12", True),
    ("192.168.1.1", "192.168.0.0/16", True),
    ("100.64.0.1", "100.64.0.0/10", True),
    ("100.127.255.254", "100.64.0.0/10", True),
    # link-local and the cloud metadata service: never opened by allow_private_networks
    ("169.254.169.254", "169.254.169.254/32", False),
    ("169.254.0.1", "169.254.0.0/16", False),
    ("169.254.170.2", "169.254.0.0/16", False),  # ECS task metadata
    # documentation, benchmarking, reserved, multicast, broadcast
    ("192.0.2.1", "192.0.2.0/24", False),
    ("198.51.100.7", "198.51.100.0/24", False),
    ("203.0.113.7", "203.0.113.0/24", False),
    ("198.18.0.1", "198.18.0.0/15", False),
    ("198.19.255.255", "198.18.0.0/15", False),
    ("192.0.0.1", "192.0.0.0/24", False),
    ("192.0.0.170", "192.0.0.0/24", False),  # NAT64 discovery
    ("192.88.99.1", "192.88.99.0/24", False),
    ("224.0.0.1", "224.0.0.0/4", False),
    ("239.255.255.250", "224.0.0.0/4", False),  # SSDP
    ("240.0.0.1", "240.0.0.0/4", False),
    ("255.255.255.254", "240.0.0.0/4", False),
    ("255.255.255.255", "255.255.255.255/32", False),
    # IPv6: public
    ("2606:4700:4700::1111", None, False),
    ("2a00:1450:4001:82b::200e", None, False),
    ("2001:4860:4860::8888", None, False),
    ("2001:3::1", None, False),  # AMT: globally reachable
    ("2001:1::1", None, False),  # PCP anycast
    # IPv6: special
    ("::", "::/128", False),
    ("::1", "::1/128", True),
    ("fe80::1", "fe80::/10", False),
    ("fe80::1%eth0", "fe80::/10", False),
    ("febf::1", "fe80::/10", False),
    ("fc00::1", "fc00::/7", True),
    ("fd12:3456:789a::1", "fc00::/7", True),
    ("fec0::1", "fec0::/10", True),
    ("ff02::1", "ff00::/8", False),
    ("ff05::1:3", "ff00::/8", False),
    ("2001:db8::1", "2001:db8::/32", False),
    ("2001:db8:ffff::1", "2001:db8::/32", False),
    ("3fff::1", "3fff::/20", False),
    ("100::1", "100::/64", False),
    ("2001:2::1", "2001::/23", False),  # benchmarking (IETF protocol assignments)
    ("5f00::1", "5f00::/16", False),
    ("4000::1", "4000::/2", False),  # unassigned, outside 2000::/3
    ("1::1", "::/3", False),
    # IPv4-mapped: judged as the IPv4 address
    ("::ffff:127.0.0.1", "127.0.0.0/8", True),
    ("::ffff:10.1.2.3", "10.0.0.0/8", True),
    ("::ffff:169.254.169.254", "169.254.169.254/32", False),
    ("::ffff:0.0.0.0", "0.0.0.0/32", False),
    ("::ffff:8.8.8.8", None, False),
    # IPv4-compatible (deprecated): blocked, with the IPv4 address named when it is the reason
    ("::127.0.0.1", "127.0.0.0/8", False),
    ("::169.254.169.254", "169.254.169.254/32", False),
    ("::8.8.8.8", "::/96", False),
    # IPv4-translated (SIIT)
    ("::ffff:0:127.0.0.1", "127.0.0.0/8", False),
    ("::ffff:0:8.8.8.8", "::ffff:0:0:0/96", False),
    # NAT64 well-known prefix: judged as the IPv4 address inside (DNS64 networks use it)
    ("64:ff9b::127.0.0.1", "127.0.0.0/8", True),
    ("64:ff9b::10.0.0.1", "10.0.0.0/8", True),
    ("64:ff9b::169.254.169.254", "169.254.169.254/32", False),
    ("64:ff9b::192.168.0.1", "192.168.0.0/16", True),
    ("64:ff9b::8.8.8.8", None, False),
    # local-use NAT64 (RFC 8215): not globally reachable
    ("64:ff9b:1::10.0.0.1", "10.0.0.0/8", True),
    ("64:ff9b:1::8.8.8.8", "64:ff9b:1::/48", True),
    # 6to4: the IPv4 address is bits 16-48
    ("2002:7f00:1::1", "127.0.0.0/8", True),
    ("2002:a9fe:a9fe::1", "169.254.169.254/32", False),
    ("2002:c0a8:0101::1", "192.168.0.0/16", True),
    ("2002:808:808::1", None, False),
    # Teredo: the server and the (obfuscated) client address are judged; Teredo stays blocked
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "192.0.2.0/24", False),  # client 192.0.2.45
    ("2001:0:7f00:1::", "127.0.0.0/8", False),  # server 127.0.0.1
    ("2001:0:808:808:0:f7f7:f7f7:f7f7", "2001::/32", False),  # public inside: still Teredo
]


@pytest.mark.parametrize(("address", "blocked_by", "private"), TABLE)
def test_the_default_policy_allows_only_public_addresses(
    address: str, blocked_by: str | None, private: bool
) -> None:
    block = DEFAULT.check(address)
    if blocked_by is None:
        assert block is None, f"{address} should be public, got {block}"
        return
    assert block is not None, f"{address} should be blocked by {blocked_by}"
    assert str(block.network) == blocked_by
    assert block.private is private


@pytest.mark.parametrize(("address", "blocked_by", "private"), TABLE)
def test_allow_private_networks_opens_only_internal_unicast(
    address: str, blocked_by: str | None, private: bool
) -> None:
    block = PRIVATE.check(address)
    if blocked_by is None or private:
        assert block is None, f"{address} should be allowed with allow_private_networks"
    else:
        assert block is not None, f"{address} must stay blocked with allow_private_networks"
        assert not block.private  # so its message does not suggest allow_private_networks


def test_the_metadata_service_stays_blocked_with_allow_private_networks() -> None:
    for address in ("169.254.169.254", "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe"):
        block = PRIVATE.check(address)
        assert block is not None
        assert "metadata" in block.kind


def test_allowed_networks_open_exactly_what_they_list() -> None:
    policy = AddressPolicy(allowed=(ipaddress.ip_network("10.20.0.0/16"),))
    assert policy.check("10.20.3.4") is None
    assert policy.check("10.21.0.1") is not None
    assert policy.check("192.168.0.1") is not None
    assert policy.check("127.0.0.1") is not None


def test_allowed_networks_cover_the_ipv4_address_inside_ipv6_forms() -> None:
    policy = AddressPolicy(allowed=(ipaddress.ip_network("127.0.0.0/8"),))
    assert policy.check("::ffff:127.0.0.1") is None
    assert policy.check("64:ff9b::127.0.0.1") is None
    assert policy.check("::1") is not None  # IPv6 loopback is its own range


def test_allowed_networks_can_open_link_local_on_purpose() -> None:
    policy = AddressPolicy(allowed=(ipaddress.ip_network("169.254.169.254/32"),))
    assert policy.check("169.254.169.254") is None
    assert policy.check("169.254.169.253") is not None


def test_an_ipv6_network_in_the_allow_list_does_not_open_ipv4() -> None:
    policy = AddressPolicy(allowed=(ipaddress.ip_network("::/0"),))
    assert policy.check("2001:db8::1") is None
    assert policy.check("127.0.0.1") is not None


ipv4s = st.integers(min_value=0, max_value=2**32 - 1).map(ipaddress.IPv4Address)


@given(ipv4s)
def test_ipv6_forms_that_reach_an_ipv4_address_are_judged_as_that_address(
    v4: ipaddress.IPv4Address,
) -> None:
    expected = DEFAULT.check(v4)
    forms = {
        "IPv4-mapped": ipaddress.IPv6Address(f"::ffff:{v4}"),
        "NAT64": ipaddress.IPv6Address(f"64:ff9b::{v4}"),
        "6to4": ipaddress.IPv6Address((0x2002 << 112) | (int(v4) << 80) | 1),
    }
    for name, v6 in forms.items():
        block = DEFAULT.check(v6)
        assert (block is None) == (expected is None), f"{name} {v6} vs {v4}"
        if block is not None and expected is not None:
            assert block.network == expected.network
            assert block.matched == v4


@given(ipv4s)
def test_non_public_ipv4_addresses_are_never_reachable_through_an_ipv6_form(
    v4: ipaddress.IPv4Address,
) -> None:
    if DEFAULT.check(v4) is None:
        return
    for text in (f"::{v4}", f"::ffff:0:{v4}", f"64:ff9b:1::{v4}"):
        assert DEFAULT.check(text) is not None, text


@given(st.integers(min_value=0, max_value=2**128 - 1).map(ipaddress.IPv6Address))
def test_only_global_unicast_and_the_ipv4_carrying_forms_can_be_public(
    v6: ipaddress.IPv6Address,
) -> None:
    if DEFAULT.check(v6) is None:
        carriers = [ipaddress.ip_network(n) for n in ("::ffff:0:0/96", "64:ff9b::/96")]
        assert v6 in ipaddress.ip_network("2000::/3") or any(v6 in n for n in carriers)


# -- messages ----------------------------------------------------------------------------------


def blocked(url: str, policy: AddressPolicy = DEFAULT) -> str:
    with pytest.raises(BlockedAddressError) as info:
        check_url_host(url, policy)
    return str(info.value)


def test_a_blocked_literal_says_what_why_and_how_to_allow_it() -> None:
    message = blocked("https://127.0.0.1:8443/hook")
    assert message.startswith("blocked by SSRF protection: the URL's host 127.0.0.1 ")
    assert "loopback, 127.0.0.0/8" in message
    assert '"127.0.0.1/32"' in message
    assert '"127.0.0.0/8"' in message
    assert "delivery.allowed_networks" in message
    assert "delivery.allow_private_networks = true" in message


def test_the_metadata_service_message_offers_only_the_allow_list() -> None:
    message = blocked("http://169.254.169.254/latest/meta-data/", PRIVATE)
    assert "cloud metadata service" in message
    assert '"169.254.169.254/32"' in message
    assert "allow_private_networks" not in message  # it would not help


def test_an_embedded_address_is_named_in_the_message() -> None:
    message = blocked("http://[::ffff:127.0.0.1]/")
    assert "IPv4-mapped form of 127.0.0.1" in message
    assert '"127.0.0.1/32"' in message


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "https://[::1]:8443/",
        "https://[::ffff:7f00:1]/",
        "http://0.0.0.0:8080/",
        "http://10.0.0.5/h",
        "http://[fd00::5]/h",
        "http://[fe80::1%25eth0]/h",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://2130706433/",  # 127.0.0.1 as one number
        "http://017700000001/",  # ... in octal
        "http://127.1/",  # ... abbreviated
    ],
)
def test_ip_literal_hosts_are_refused_before_any_connection(url: str) -> None:
    assert blocked(url).startswith("blocked by SSRF protection")


@pytest.mark.parametrize(
    "url",
    ["https://hooks.example.com/x", "https://8.8.8.8/x", "https://[2606:4700::1111]/x"],
)
def test_public_literals_and_host_names_pass_the_literal_check(url: str) -> None:
    check_url_host(url, DEFAULT)  # host names are judged by the resolver, when connecting


def test_an_allowed_literal_passes() -> None:
    check_url_host(
        "http://127.0.0.1:9/", AddressPolicy(allowed=(ipaddress.ip_network("127.0.0.0/8"),))
    )
    check_url_host("http://[::1]:9/", PRIVATE)


# -- the resolver, with a stand-in for DNS --------------------------------------------------------


class FixedDNS(AbstractResolver):
    """Answers every lookup with ``answers`` (a test double for DNS; nothing else is faked)."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.lookups = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups += 1
        return [
            ResolveResult(
                hostname=host,
                host=a,
                port=port,
                family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for a in self.answers
        ]

    async def close(self) -> None:
        pass


async def test_the_resolver_passes_on_only_allowed_answers() -> None:
    guard = GuardedResolver(DEFAULT, FixedDNS("127.0.0.1", "93.184.216.34", "::1", "2606::1"))
    answers = await guard.resolve("mixed.example", 443, socket.AF_UNSPEC)
    assert [a["host"] for a in answers] == ["93.184.216.34", "2606::1"]


async def test_the_resolver_refuses_a_name_with_only_blocked_answers() -> None:
    guard = GuardedResolver(DEFAULT, FixedDNS("127.0.0.1", "::1"))
    with pytest.raises(BlockedAddressError) as info:
        await guard.resolve("localhost", 80)
    message = str(info.value)
    assert "localhost resolves only to addresses that are not public" in message
    assert "127.0.0.1 (loopback, 127.0.0.0/8)" in message
    assert "::1 (loopback, ::1/128)" in message
    assert '"127.0.0.1/32", "::1/128"' in message
    assert "delivery.allow_private_networks = true" in message


async def test_the_resolver_refuses_answers_that_are_not_addresses() -> None:
    guard = GuardedResolver(DEFAULT, FixedDNS("not-an-address"))
    with pytest.raises(BlockedAddressError, match="no usable address"):
        await guard.resolve("weird.example", 80)


async def test_a_new_policy_applies_to_the_next_lookup() -> None:
    dns = FixedDNS("10.1.2.3")
    guard = GuardedResolver(DEFAULT, dns)
    with pytest.raises(BlockedAddressError):
        await guard.resolve("internal.example", 80)
    guard.policy = PRIVATE
    assert [a["host"] for a in await guard.resolve("internal.example", 80)] == ["10.1.2.3"]
    guard.policy = DEFAULT
    with pytest.raises(BlockedAddressError):
        await guard.resolve("internal.example", 80)
    assert dns.lookups == 3


# -- settings -----------------------------------------------------------------------------------


def test_protection_is_on_by_default() -> None:
    delivery = Settings.model_validate({}).delivery
    assert delivery.allow_private_networks is False
    assert delivery.allowed_networks == ()
    assert AddressPolicy.from_settings(delivery) == DEFAULT


def test_allowed_networks_are_normalised() -> None:
    delivery = DeliverySettings.model_validate(
        {"allowed_networks": ["10.0.0.0/8", "192.168.1.7", "FD00::/8", " ::1 "]}
    )
    assert delivery.allowed_networks == ("10.0.0.0/8", "192.168.1.7/32", "fd00::/8", "::1/128")
    policy = AddressPolicy.from_settings(delivery)
    assert policy.check("192.168.1.7") is None
    assert policy.check("192.168.1.8") is not None


def test_bad_allowed_networks_are_refused_with_the_key_and_a_suggestion(tmp_path: Path) -> None:
    config = tmp_path / "webhookd.toml"
    config.write_text('[delivery]\nallowed_networks = ["10.1.2.3/8", "intranet"]\n')
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    [problem] = info.value.problems
    assert problem.startswith("delivery.allowed_networks: ")
    assert "did you mean '10.0.0.0/8'?" in problem
    assert "'intranet' is not a CIDR" in problem


def test_the_environment_can_set_the_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOKD_DELIVERY__ALLOWED_NETWORKS", '["10.0.0.0/8"]')
    monkeypatch.setenv("WEBHOOKD_DELIVERY__ALLOW_PRIVATE_NETWORKS", "true")
    delivery = load_settings().delivery
    assert delivery.allowed_networks == ("10.0.0.0/8",)
    assert delivery.allow_private_networks is True
