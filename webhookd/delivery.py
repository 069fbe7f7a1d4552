"""One HTTP attempt: POST the body with its headers, classify what happened. No policy here.

Redirects are never followed, responses are read up to a cap (a huge or endless body costs no
memory), and the total timeout bounds a slow drip.
"""

from __future__ import annotations

import dataclasses
import errno as errno_codes
import functools
import os
import ssl
import time
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from aiohttp.abc import AbstractResolver

from webhookd.endpoints import CABundleError, load_ca_bundle
from webhookd.models import AttemptResult, Delivery, Endpoint, ErrorKind
from webhookd.netguard import AddressPolicy, BlockedAddressError, GuardedResolver, check_url_host
from webhookd.settings import DeliverySettings
from webhookd.signing import active_secrets, request_headers

_READ_CHUNK_BYTES = 16 * 1024
# aiohttp keeps DNS answers this long; each one passed the address guard when it came in.
DNS_CACHE_SECONDS = 60


@dataclass(frozen=True, slots=True)
class HttpResult:
    started_at: float
    duration_seconds: float
    result: AttemptResult
    status_code: int | None
    error: str | None
    response_excerpt: str | None
    error_kind: ErrorKind | None = None  # for a failure: what exactly went wrong
    retry_after: str | None = None  # the response's Retry-After header, as sent
    location: str | None = None  # the response's Location header (a 3xx), as sent


# URLs remembered as allowed by the address policy (a bound: endpoints come and go).
_MAX_ALLOWED_URLS = 100_000


@functools.lru_cache(maxsize=16)
def _client_timeout(total: float, connect: float) -> aiohttp.ClientTimeout:
    """One (immutable) ClientTimeout per configuration, not one per request."""
    return aiohttp.ClientTimeout(total=total, sock_connect=connect)


class HttpSender(Protocol):
    """What the dispatcher needs of a sender: :class:`Sender` in this process, or
    :class:`webhookd.sender_pool.SenderPool` with the requests made in child processes."""

    async def start(self) -> None: ...
    def apply(self, settings: DeliverySettings) -> None: ...
    async def send(self, endpoint: Endpoint, delivery: Delivery) -> HttpResult: ...
    async def close(self) -> None: ...


class Sender:
    """Owns the aiohttp client session (keep-alive connections are reused per endpoint host).

    Every connection passes the address guard (:mod:`webhookd.netguard`): its resolver filters
    each DNS answer, and an IP-literal host is checked before the request.
    """

    def __init__(
        self,
        settings: DeliverySettings,
        *,
        resolver: AbstractResolver | None = None,
        dns_cache_seconds: int = DNS_CACHE_SECONDS,
    ) -> None:
        """``resolver`` does the DNS lookups under the guard instead of the system (tests pass
        a double whose answers change, to simulate DNS rebinding); ``dns_cache_seconds`` 0
        turns aiohttp's DNS cache off, so that every new connection looks the host up."""
        self._settings = settings
        self._policy = AddressPolicy.from_settings(settings)
        self._dns = resolver
        self._dns_cache_seconds = dns_cache_seconds
        self._guard: GuardedResolver | None = None
        self._session: aiohttp.ClientSession | None = None
        self._retired: list[aiohttp.ClientSession] = []  # closed with the sender
        self._tls: dict[str, ssl.SSLContext] = {}  # CA bundle path -> its context
        self._allowed_urls: set[str] = set()  # passed check_url_host under self._policy

    def apply(self, settings: DeliverySettings) -> None:
        """Use ``settings`` (timeouts, header prefix, excerpt size, address policy, CA bundles)
        from the next attempt on; attempts already running keep the values they started with.
        A changed address policy also starts a new connection pool, so that no kept-alive
        connection made under the old policy (or DNS answer cached under it) is used again."""
        policy = AddressPolicy.from_settings(settings)
        self._settings = settings
        self._tls = {}  # the CA bundle files are read again
        if policy != self._policy:
            self._policy = policy
            self._allowed_urls = set()
            if self._guard is not None:
                self._guard.policy = policy
            if self._session is not None:
                self._retired.append(self._session)
                self._session = self._new_session()

    async def start(self) -> None:
        self._guard = GuardedResolver(self._policy, self._dns)
        self._session = self._new_session()

    def _new_session(self) -> aiohttp.ClientSession:
        assert self._guard is not None
        # No connection cap here: the dispatcher's global limiter bounds the requests in flight,
        # and unlike a connector's limit it can be resized by a configuration reload.
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=0,
            resolver=self._guard,
            use_dns_cache=self._dns_cache_seconds > 0,
            ttl_dns_cache=int(self._dns_cache_seconds) or None,
        )
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
        )

    async def close(self) -> None:
        sessions = [*self._retired, *([self._session] if self._session is not None else [])]
        self._session = None
        self._retired = []
        for session in sessions:
            await session.close()
        if self._guard is not None:
            await self._guard.close()
            self._guard = None

    def _tls_context(self, endpoint: Endpoint, settings: DeliverySettings) -> ssl.SSLContext | bool:
        """The endpoint's CA bundle, else delivery.ca_bundle, else True: aiohttp's verifying
        default with the system's CAs. Certificates are verified in every case."""
        path = endpoint.ca_bundle or (str(settings.ca_bundle) if settings.ca_bundle else None)
        if path is None or not endpoint.url.lower().startswith("https:"):
            return True
        context = self._tls.get(path)
        if context is None:
            context = self._tls[path] = load_ca_bundle(path)
        return context

    async def send(self, endpoint: Endpoint, delivery: Delivery) -> HttpResult:
        """Make one attempt. Never raises for network trouble: it is classified instead."""
        return await self.send_body(
            endpoint, delivery.body, delivery.event_type, delivery.delivery_id
        )

    async def send_body(
        self, endpoint: Endpoint, body: bytes, event_type: str, delivery_id: str
    ) -> HttpResult:
        """:meth:`send` with the three fields of the delivery a request uses."""
        if self._session is None:
            raise RuntimeError("Sender.start() was not called")
        settings = self._settings  # one attempt uses one configuration, even across a reload
        started = time.time()
        t0 = time.perf_counter()
        headers = request_headers(
            header_prefix=settings.header_prefix,
            secrets=active_secrets(endpoint, started),
            schemes=endpoint.schemes,
            body=body,
            event_type=event_type,
            delivery_id=delivery_id,
            timestamp=int(started),
            extra=endpoint.headers,
        )
        try:
            # aiohttp connects to an IP-literal host without asking the guarded resolver.
            if endpoint.url not in self._allowed_urls:
                check_url_host(endpoint.url, self._policy)
                if len(self._allowed_urls) < _MAX_ALLOWED_URLS:
                    self._allowed_urls.add(endpoint.url)
            tls = self._tls_context(endpoint, settings)
        except BlockedAddressError as exc:
            return self._result(
                started, t0, AttemptResult.NETWORK_ERROR, None, str(exc), None, ErrorKind.BLOCKED
            )
        except CABundleError as exc:
            return self._result(
                started, t0, AttemptResult.NETWORK_ERROR, None, str(exc), None, ErrorKind.TLS
            )
        status: int | None = None
        excerpt: str | None = None
        retry_after: str | None = None
        location: str | None = None
        try:
            async with self._session.post(
                endpoint.url,
                data=body,
                headers=headers,
                allow_redirects=False,
                ssl=tls,
                timeout=_client_timeout(settings.timeout_seconds, settings.connect_timeout_seconds),
            ) as response:
                status = response.status
                retry_after = response.headers.get("Retry-After")
                location = response.headers.get("Location")
                excerpt = await self._read_excerpt(response, settings.response_excerpt_bytes)
        except BlockedAddressError as exc:  # the guarded resolver refused every address
            return self._result(
                started,
                t0,
                AttemptResult.NETWORK_ERROR,
                status,
                str(exc),
                excerpt,
                ErrorKind.BLOCKED,
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            return self._result(
                started,
                t0,
                AttemptResult.TIMEOUT,
                status,
                _timeout_text(exc, settings, status),
                excerpt,
                timeout_kind(exc),
            )
        except aiohttp.ClientError as exc:
            return self._result(
                started,
                t0,
                AttemptResult.NETWORK_ERROR,
                status,
                describe_client_error(exc),
                excerpt,
                classify_client_error(exc),
            )
        except OSError as exc:
            return self._result(
                started,
                t0,
                AttemptResult.NETWORK_ERROR,
                status,
                f"network error: {exc}",
                excerpt,
                _errno_kind(exc.errno),
            )
        if 200 <= status < 300:
            return self._result(started, t0, AttemptResult.SUCCESS, status, None, excerpt)
        kind = status_kind(status, retry_after)
        error = f"HTTP {status}"
        if kind is ErrorKind.REDIRECT:
            error += (
                f" to {location[:300]!r}" if location else " (no Location)"
            ) + " (redirects are not followed; point the endpoint at the final URL)"
        elif kind is ErrorKind.GONE:
            error += " Gone (the receiver wants no more deliveries: the endpoint is disabled)"
        elif retry_after is not None and kind is ErrorKind.RATE_LIMITED:
            error += f" (Retry-After: {retry_after[:100]})"
        result = self._result(started, t0, AttemptResult.HTTP_ERROR, status, error, excerpt, kind)
        return dataclasses.replace(result, retry_after=retry_after, location=location)

    async def _read_excerpt(self, response: aiohttp.ClientResponse, cap: int) -> str:
        data = bytearray()
        while len(data) < cap:
            chunk = await response.content.read(min(_READ_CHUNK_BYTES, cap - len(data)))
            if not chunk:
                break
            data += chunk
        if not response.content.at_eof():
            # Past the cap: drop the connection instead of reading (maybe forever) to the end.
            response.close()
        return data[:cap].decode("utf-8", "replace")

    @staticmethod
    def _result(
        started: float,
        t0: float,
        result: AttemptResult,
        status: int | None,
        error: str | None,
        excerpt: str | None,
        kind: ErrorKind | None = None,
    ) -> HttpResult:
        return HttpResult(
            started_at=started,
            duration_seconds=time.perf_counter() - t0,
            result=result,
            status_code=status,
            error=error,
            response_excerpt=excerpt,
            error_kind=kind,
        )


def _timeout_text(exc: BaseException, settings: DeliverySettings, status: int | None) -> str:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return f"timed out connecting after {settings.connect_timeout_seconds:g} s"
    if status is not None:
        return f"timed out reading the response after {settings.timeout_seconds:g} s"
    return f"timed out after {settings.timeout_seconds:g} s"


def status_kind(status: int, retry_after: str | None) -> ErrorKind:
    """The kind of failure a non-2xx status is."""
    if 300 <= status < 400:
        return ErrorKind.REDIRECT
    if status == 410:
        return ErrorKind.GONE
    if status == 429 or (status == 503 and retry_after is not None):
        return ErrorKind.RATE_LIMITED
    return ErrorKind.HTTP_STATUS


def timeout_kind(exc: BaseException) -> ErrorKind:
    """No connection in time, or no complete response within the total timeout."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ErrorKind.CONNECT_TIMEOUT
    return ErrorKind.READ_TIMEOUT


_RESET_ERRNOS = frozenset({errno_codes.ECONNRESET, errno_codes.EPIPE, errno_codes.ECONNABORTED})


def _errno_kind(number: int | None) -> ErrorKind:
    if number == errno_codes.ECONNREFUSED:
        return ErrorKind.CONNECTION_REFUSED
    if number in _RESET_ERRNOS:
        return ErrorKind.CONNECTION_RESET
    if number == errno_codes.ETIMEDOUT:
        return ErrorKind.CONNECT_TIMEOUT
    return ErrorKind.NETWORK


def classify_client_error(exc: aiohttp.ClientError) -> ErrorKind:
    """The kind of an aiohttp error (the order matters: the classes inherit from each other)."""
    if isinstance(exc, aiohttp.ClientSSLError):
        return ErrorKind.TLS
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return ErrorKind.DNS
    if isinstance(exc, aiohttp.ClientConnectorError):
        return _errno_kind(exc.os_error.errno)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return ErrorKind.CONNECTION_CLOSED
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return ErrorKind.PROTOCOL
    if isinstance(exc, aiohttp.ClientOSError):
        return _errno_kind(exc.errno)
    return ErrorKind.NETWORK


# OpenSSL's X509_V_ERR_* codes that call for a different fix than "trust its CA".
_X509_NOT_YET_VALID = 9
_X509_EXPIRED = 10
_X509_HOSTNAME_MISMATCH = 62
_X509_IP_ADDRESS_MISMATCH = 64


def describe_certificate_error(error: Exception) -> str:
    """What is wrong with the receiver's certificate, and what fixes it."""
    code = getattr(error, "verify_code", None)
    reason = getattr(error, "verify_message", None) or str(error)
    if code == _X509_EXPIRED:
        return f"TLS certificate expired: {reason}; the receiver must renew it"
    if code == _X509_NOT_YET_VALID:
        return f"TLS certificate not yet valid: {reason}; check the clocks of both hosts"
    if code in (_X509_HOSTNAME_MISMATCH, _X509_IP_ADDRESS_MISMATCH):
        return (
            f"TLS certificate hostname mismatch: {reason.rstrip('.')}; the certificate must "
            "name the URL's host"
        )
    return (
        f"TLS certificate not trusted: {reason}; if the receiver uses a private CA, set the "
        "endpoint's ca_bundle (or delivery.ca_bundle) to its certificate"
    )


def describe_client_error(exc: aiohttp.ClientError) -> str:
    """A one-line description an operator can act on."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return describe_certificate_error(exc.certificate_error)
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS error: {exc}"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"DNS lookup failed for {exc.host}: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        errno = exc.os_error.errno
        # asyncio's "Connect call failed (...)" hides the cause; the errno names it.
        reason = os.strerror(errno) if errno else exc.os_error.strerror or str(exc.os_error)
        return f"cannot connect to {exc.host}:{exc.port}: {reason}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without a response"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"broken response body: {exc}"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"invalid HTTP response: {exc.message}"
    if isinstance(exc, aiohttp.ClientOSError):
        return f"network error: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"
