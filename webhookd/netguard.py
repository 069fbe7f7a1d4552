"""SSRF protection: the addresses a delivery may connect to, checked where connections are made.

Endpoint URLs are written by people and, through the ``webhook_endpoints`` table, by
applications that may take them from their own users. Unchecked, a URL is a way into the
daemon's own network: services on loopback, the private networks around the host, the cloud
metadata service at 169.254.169.254. So by default a delivery connects only to public addresses;
``delivery.allowed_networks`` (CIDRs) and ``delivery.allow_private_networks`` open more, on
purpose.

The check runs on the addresses a connection is about to use, never on the URL when it is saved:
:class:`GuardedResolver` filters every DNS answer aiohttp gets, so a name that resolved to a
public address yesterday and resolves to 127.0.0.1 now (DNS rebinding) is refused now; and
:func:`check_url_host` refuses IP-literal hosts, for which aiohttp asks no resolver.

IPv6 forms that carry an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible, NAT64
``64:ff9b::/96`` and ``64:ff9b:1::/48``, 6to4 ``2002::/16``, Teredo) are judged by the IPv4
address inside them too, so ``::ffff:127.0.0.1`` is loopback. Pure policy functions and one
resolver; no settings are read here (:meth:`AddressPolicy.from_settings` takes them).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from webhookd.errors import WebhookdError
from webhookd.log import log_event

if TYPE_CHECKING:
    from webhookd.settings import DeliverySettings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

logger = logging.getLogger(__name__)

ALLOWED_NETWORKS_KEY = "delivery.allowed_networks"
ALLOW_PRIVATE_KEY = "delivery.allow_private_networks"


@dataclass(frozen=True, slots=True)
class _Range:
    network: IPNetwork
    kind: str  # what the range is, for people: "loopback", "private (RFC 1918)", ...
    private: bool  # opened by allow_private_networks (internal-use unicast, not link-local)


def _r(cidr: str, kind: str, *, private: bool = False) -> _Range:
    return _Range(ipaddress.ip_network(cidr), kind, private)


# The kind of a globally reachable range inside a blocked one: it stays public.
_PUBLIC = ""

# First match wins: a more specific range comes before the range that contains it.
# Sources: the IANA IPv4 and IPv6 Special-Purpose Address Registries. Ranges there that are
# globally reachable (AS112, AMT, PCP/TURN anycast) are left public.
_V4_RANGES: tuple[_Range, ...] = (
    _r("0.0.0.0/32", "unspecified"),
    _r("0.0.0.0/8", "'this network' (RFC 791)"),
    _r("10.0.0.0/8", "private (RFC 1918)", private=True),
    _r("100.64.0.0/10", "shared address space (CGNAT, RFC 6598)", private=True),
    _r("127.0.0.0/8", "loopback", private=True),
    _r("169.254.169.254/32", "link-local: the cloud metadata service"),
    _r("169.254.0.0/16", "link-local"),
    _r("172.16.0.0/12", "private (RFC 1918)", private=True),
    _r("192.0.0.9/32", _PUBLIC),  # PCP anycast
    _r("192.0.0.10/32", _PUBLIC),  # TURN anycast
    _r("192.0.0.0/24", "IETF protocol assignments (reserved)"),
    _r("192.0.2.0/24", "documentation (TEST-NET-1)"),
    _r("192.88.99.0/24", "6to4 relay anycast (deprecated)"),
    _r("192.168.0.0/16", "private (RFC 1918)", private=True),
    _r("198.18.0.0/15", "benchmarking (RFC 2544)"),
    _r("198.51.100.0/24", "documentation (TEST-NET-2)"),
    _r("203.0.113.0/24", "documentation (TEST-NET-3)"),
    _r("224.0.0.0/4", "multicast"),
    _r("255.255.255.255/32", "broadcast"),
    _r("240.0.0.0/4", "reserved"),
)

_V6_RANGES: tuple[_Range, ...] = (
    _r("::/128", "unspecified"),
    _r("::1/128", "loopback", private=True),
    _r("::ffff:0:0/96", "IPv4-mapped"),  # judged by the IPv4 address inside (see _EMBEDDINGS)
    _r("::ffff:0:0:0/96", "IPv4-translated (SIIT, reserved)"),
    _r("::/96", "IPv4-compatible (deprecated)"),
    _r("64:ff9b::/96", "NAT64"),  # judged by the IPv4 address inside
    _r("64:ff9b:1::/48", "local-use NAT64 (RFC 8215)", private=True),
    _r("100::/64", "discard-only (RFC 6666)"),
    _r("2001::/32", "Teredo tunnelling"),
    _r("2001:1::1/128", _PUBLIC),  # PCP anycast
    _r("2001:1::2/128", _PUBLIC),  # TURN anycast
    _r("2001:3::/32", _PUBLIC),  # AMT
    _r("2001:4:112::/48", _PUBLIC),  # AS112-v6
    _r("2001::/23", "IETF protocol assignments (reserved)"),
    _r("2001:db8::/32", "documentation"),
    _r("2002::/16", "6to4"),  # judged by the IPv4 address inside
    _r("3fff::/20", "documentation (RFC 9637)"),
    _r("5f00::/16", "SRv6 SIDs (RFC 9602, reserved)"),
    _r("fc00::/7", "unique local (private, RFC 4193)", private=True),
    _r("fe80::/10", "link-local"),
    _r("fec0::/10", "site-local (deprecated)", private=True),
    _r("ff00::/8", "multicast"),
    # Everything else outside global unicast is unassigned.
    _r("::/3", "reserved (outside global unicast 2000::/3)"),
    _r("4000::/2", "reserved (outside global unicast 2000::/3)"),
    _r("8000::/1", "reserved (outside global unicast 2000::/3)"),
)

_LOW32 = 0xFFFFFFFF


def _low32(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    return [ipaddress.IPv4Address(int(addr) & _LOW32)]


def _sixtofour(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    return [ipaddress.IPv4Address((int(addr) >> 80) & _LOW32)]


def _teredo(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    server, client = addr.teredo or (None, None)
    return [a for a in (server, client) if a is not None]


@dataclass(frozen=True, slots=True)
class _Embedding:
    network: ipaddress.IPv6Network
    name: str
    extract: Callable[[ipaddress.IPv6Address], list[ipaddress.IPv4Address]]
    # A transparent form reaches exactly the IPv4 address inside it (a NAT64 gateway or a 6to4
    # relay forwards there), so it is allowed when that address is. Other forms stay blocked
    # by their own range; the IPv4 address inside only makes the reason precise.
    transparent: bool


def _e(
    cidr: str,
    name: str,
    extract: Callable[[ipaddress.IPv6Address], list[ipaddress.IPv4Address]],
    transparent: bool,
) -> _Embedding:
    return _Embedding(ipaddress.IPv6Network(cidr), name, extract, transparent)


_EMBEDDINGS: tuple[_Embedding, ...] = (
    _e("::ffff:0:0/96", "IPv4-mapped", _low32, True),
    _e("64:ff9b::/96", "NAT64", _low32, True),
    _e("2002::/16", "6to4", _sixtofour, True),
    _e("::ffff:0:0:0/96", "IPv4-translated", _low32, False),
    _e("64:ff9b:1::/48", "local-use NAT64", _low32, False),
    _e("2001::/32", "Teredo", _teredo, False),
    # Last: ::/96 also holds :: and ::1, which are judged as themselves.
    _e("::/96", "IPv4-compatible", _low32, False),
)


@dataclass(frozen=True, slots=True)
class Block:
    """Why one address is refused."""

    address: IPAddress  # the address a connection would have used
    matched: IPAddress  # the address found in ``network``: ``address`` or the IPv4 inside it
    network: IPNetwork  # the blocked range
    kind: str  # what the range is
    private: bool  # allow_private_networks would allow it
    via: str | None = None  # the IPv6 form that carried ``matched`` ("IPv4-mapped", ...)

    def reason(self) -> str:
        """``loopback, 127.0.0.0/8``; for an embedded address, the form that carried it too."""
        why = f"{self.kind}, {self.network}"
        if self.via is not None:
            return f"{self.via} form of {self.matched}: {why}"
        return why

    def describe(self) -> str:
        """``127.0.0.1 (loopback, 127.0.0.0/8)``."""
        return f"{self.address} ({self.reason()})"

    @property
    def single(self) -> str:
        """The CIDR that allows exactly this address."""
        return f"{self.matched}/{self.matched.max_prefixlen}"


def _range_of(addr: IPAddress) -> _Range | None:
    table = _V4_RANGES if isinstance(addr, ipaddress.IPv4Address) else _V6_RANGES
    for entry in table:
        if addr in entry.network:
            return None if entry.kind == _PUBLIC else entry
    return None


def parse_address(text: str) -> IPAddress:
    """An address as a resolver or a URL gives it: IPv6 may be bracketed or carry a %zone."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]
    return ipaddress.ip_address(text)


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which addresses deliveries may connect to. The default allows public addresses only."""

    allow_private: bool = False
    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(cls, settings: DeliverySettings) -> AddressPolicy:
        return cls(
            allow_private=settings.allow_private_networks,
            allowed=tuple(ipaddress.ip_network(n) for n in settings.allowed_networks),
        )

    def check(self, address: IPAddress | str) -> Block | None:
        """None if a connection to ``address`` is allowed, else why not. Pure."""
        addr = parse_address(address) if isinstance(address, str) else address
        if any(addr.version == n.version and addr in n for n in self.allowed):
            return None
        if isinstance(addr, ipaddress.IPv6Address):
            for embedding in _EMBEDDINGS:
                if addr not in embedding.network or addr in _SELF_JUDGED:
                    continue
                for inner in embedding.extract(addr):
                    block = self.check(inner)
                    if block is not None:
                        # allow_private_networks opens a form that is not transparent only if
                        # it opens the form's own range too.
                        own = None if embedding.transparent else _range_of(addr)
                        private = block.private and (own is None or own.private)
                        return replace(block, address=addr, via=embedding.name, private=private)
                if embedding.transparent:
                    return None
                break
        entry = _range_of(addr)
        if entry is None or (entry.private and self.allow_private):
            return None
        return Block(addr, addr, entry.network, entry.kind, entry.private)


_SELF_JUDGED = frozenset({ipaddress.IPv6Address("::"), ipaddress.IPv6Address("::1")})


class BlockedAddressError(WebhookdError):
    """A delivery would connect to an address the policy refuses. The message names the host,
    each refused address and its range, and the setting that would allow it."""

    def __init__(self, message: str, host: str, blocks: Sequence[Block] = ()) -> None:
        self.host = host
        self.blocks = tuple(blocks)
        super().__init__(message)

    @classmethod
    def for_blocks(
        cls, host: str, blocks: Sequence[Block], *, literal: bool
    ) -> BlockedAddressError:
        return cls(blocked_message(host, blocks, literal=literal), host, blocks)


def blocked_message(host: str, blocks: Sequence[Block], *, literal: bool) -> str:
    """One line: what was blocked, why, and how to allow it."""
    details = ", ".join(b.describe() for b in blocks)
    if literal:
        subject = f"the URL's host {host} is not a public address ({blocks[0].reason()})"
    elif len(blocks) == 1:
        subject = f"{host} resolves to {details}"
    else:
        subject = f"{host} resolves only to addresses that are not public: {details}"
    singles = _unique(f'"{b.single}"' for b in blocks)
    ranges = _unique(f'"{b.network}"' for b in blocks)
    how = f"add {', '.join(singles)}"
    if ranges != singles:
        how += f" (or the whole range{'s' if len(ranges) > 1 else ''} {', '.join(ranges)})"
    how += f" to {ALLOWED_NETWORKS_KEY}"
    if all(b.private for b in blocks):
        how += f", or set {ALLOW_PRIVATE_KEY} = true"
    return f"{_PREFIX}: {subject}; to allow it, {how}"


_PREFIX = "blocked by SSRF protection"


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _looks_like_ip(host: str) -> bool:
    # aiohttp's own test for "connect to this host without resolving it": all digits and dots,
    # or any colon. It must match, or a host could skip both this check and the resolver.
    return ":" in host or host.replace(".", "").isdigit()


def check_url_host(url: str, policy: AddressPolicy) -> None:
    """Raise :class:`BlockedAddressError` if ``url``'s host is an IP literal the policy refuses.

    aiohttp connects to such a host without a resolver, so :class:`GuardedResolver` never sees
    it. A host that looks like an address to aiohttp but is not a canonical one (``127.1``,
    ``2130706433``) is refused: the socket layer may still map it onto an address.
    """
    host = URL(url).raw_host or ""
    if not _looks_like_ip(host):
        return
    try:
        addr = parse_address(host)
    except ValueError:
        raise BlockedAddressError(
            f"{_PREFIX}: the URL's host {host} looks like an IP address but is not one written "
            "in full (such as 203.0.113.7 or [2001:db8::7]); write the address or a host name",
            host,
        ) from None
    block = policy.check(addr)
    if block is not None:
        raise BlockedAddressError.for_blocks(host, [block], literal=True)


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that passes on only the answers the policy allows.

    Every lookup aiohttp makes for a connection goes through here, so an answer is checked each
    time it is used to connect, however it changed since the last lookup. Some answers
    refused: the others are used. All refused: :class:`BlockedAddressError`.

    ``resolver`` does the lookups (default: aiohttp's ``DefaultResolver``, the system's DNS);
    tests pass a double whose answers change between calls to simulate DNS rebinding. Assign
    ``policy`` to change it (a configuration reload): the next lookup uses it.
    """

    def __init__(self, policy: AddressPolicy, resolver: AbstractResolver | None = None) -> None:
        self.policy = policy
        self._resolver = resolver if resolver is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._resolver.resolve(host, port, family)
        policy = self.policy
        allowed: list[ResolveResult] = []
        blocks: list[Block] = []
        for answer in answers:
            try:
                block = policy.check(answer["host"])
            except ValueError:
                continue  # not an address: never connect to what cannot be checked
            if block is None:
                allowed.append(answer)
            else:
                blocks.append(block)
        if allowed:
            if blocks:
                log_event(
                    logger,
                    logging.WARNING,
                    "address_blocked",
                    host=host,
                    blocked=[b.describe() for b in blocks],
                    hint="the host's other addresses are used",
                )
            return allowed
        if blocks:
            raise BlockedAddressError.for_blocks(host, blocks, literal=False)
        raise BlockedAddressError(f"{_PREFIX}: {host} resolves to no usable address", host)

    async def close(self) -> None:
        await self._resolver.close()
