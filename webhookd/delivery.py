"""One HTTP attempt: POST the body with its headers, classify what happened. No policy here.

Redirects are never followed, responses are read up to a cap (a huge or endless body costs no
memory), and the total timeout bounds a slow drip.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import aiohttp

from webhookd.models import AttemptResult, Delivery, Endpoint
from webhookd.settings import DeliverySettings
from webhookd.signing import active_secrets, request_headers

_READ_CHUNK_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class HttpResult:
    started_at: float
    duration_seconds: float
    result: AttemptResult
    status_code: int | None
    error: str | None
    response_excerpt: str | None


class Sender:
    """Owns the aiohttp client session (keep-alive connections are reused per endpoint host)."""

    def __init__(self, settings: DeliverySettings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None

    def apply(self, settings: DeliverySettings) -> None:
        """Use ``settings`` (timeouts, header prefix, excerpt size) from the next attempt on;
        attempts already running keep the values they started with."""
        self._settings = settings

    async def start(self) -> None:
        # No connection cap here: the dispatcher's global limiter bounds the requests in flight,
        # and unlike a connector's limit it can be resized by a configuration reload.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, endpoint: Endpoint, delivery: Delivery) -> HttpResult:
        """Make one attempt. Never raises for network trouble: it is classified instead."""
        if self._session is None:
            raise RuntimeError("Sender.start() was not called")
        settings = self._settings  # one attempt uses one configuration, even across a reload
        started = time.time()
        t0 = time.perf_counter()
        headers = request_headers(
            header_prefix=settings.header_prefix,
            secrets=active_secrets(endpoint, started),
            schemes=endpoint.schemes,
            body=delivery.body,
            event_type=delivery.event_type,
            delivery_id=delivery.delivery_id,
            timestamp=int(started),
            extra=endpoint.headers,
        )
        status: int | None = None
        excerpt: str | None = None
        try:
            async with self._session.post(
                endpoint.url,
                data=delivery.body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=settings.timeout_seconds, sock_connect=settings.connect_timeout_seconds
                ),
            ) as response:
                status = response.status
                excerpt = await self._read_excerpt(response, settings.response_excerpt_bytes)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            return self._result(
                started,
                t0,
                AttemptResult.TIMEOUT,
                status,
                _timeout_text(exc, settings, status),
                excerpt,
            )
        except aiohttp.ClientError as exc:
            return self._result(
                started,
                t0,
                AttemptResult.NETWORK_ERROR,
                status,
                describe_client_error(exc),
                excerpt,
            )
        except OSError as exc:
            return self._result(
                started, t0, AttemptResult.NETWORK_ERROR, status, f"network error: {exc}", excerpt
            )
        if 200 <= status < 300:
            return self._result(started, t0, AttemptResult.SUCCESS, status, None, excerpt)
        error = f"HTTP {status}"
        if 300 <= status < 400:
            error += " (redirects are not followed; point the endpoint at the final URL)"
        return self._result(started, t0, AttemptResult.HTTP_ERROR, status, error, excerpt)

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
    ) -> HttpResult:
        return HttpResult(
            started_at=started,
            duration_seconds=time.perf_counter() - t0,
            result=result,
            status_code=status,
            error=error,
            response_excerpt=excerpt,
        )


def _timeout_text(exc: BaseException, settings: DeliverySettings, status: int | None) -> str:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return f"timed out connecting after {settings.connect_timeout_seconds:g} s"
    if status is not None:
        return f"timed out reading the response after {settings.timeout_seconds:g} s"
    return f"timed out after {settings.timeout_seconds:g} s"


def describe_client_error(exc: aiohttp.ClientError) -> str:
    """A one-line description an operator can act on."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate not trusted: {exc.certificate_error}"
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
