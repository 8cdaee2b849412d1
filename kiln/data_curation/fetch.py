"""Fetching URLs safely: an address policy, redirects re-checked hop by hop, retries with
backoff on transient errors only, a size cap, and one failure reason per URL.

`fetch_all` fetches many URLs concurrently (aiohttp, one session, at most `concurrency`
requests in flight) and returns one `FetchResult` per URL: the body, or the reason it could
not be had, named like a drop reason (`FAILURES` lists them). What it promises:

- **Addresses.** A host is resolved once, by the connector's resolver, and every address it
  resolves to is checked before any connection is made; the connection then goes to those
  checked addresses, so a DNS answer that changes between check and connect (rebinding)
  cannot slip through. A literal IP in the URL is checked the same way before the request.
  Refused unless allowed: loopback (`allow_loopback`), private and other non-global ranges
  (`allow_private`: 10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7, ...). Always refused:
  link-local (169.254/16, the cloud metadata address; fe80::/10), multicast, reserved and
  unspecified addresses. An IPv4-mapped IPv6 address is judged as its IPv4 address.
- **Schemes.** http and https; `fs_schemes` (e.g. s3, gs) are read through fsspec when the
  recipe allows them; anything else is `refused_scheme`. Redirects must stay on http(s).
- **Redirects** are followed by hand (301, 302, 303, 307, 308), each hop checked like the
  first URL; a URL seen twice in one chain is `redirect_loop`, more than `max_redirects`
  hops `too_many_redirects`.
- **Retries** only for transient failures -- HTTP 429 and 5xx, timeouts, connection resets
  and refusals, bodies cut short -- up to `retries` more attempts, waiting
  `backoff_s * 2**attempt` times a jitter in [0.5, 1.5) drawn from the URL (so the waits
  are reproducible), or the server's `Retry-After` when that is longer, never over
  `max_backoff_s`. 404, other 4xx, refusals, bad URLs and oversized bodies are final.
- **Size.** A `Content-Length` over `max_bytes` is refused before the body is read; a body
  without one is streamed and abandoned as soon as it passes `max_bytes` (`too_large`).
- **Content type.** With `content_types` set, a response whose type matches none of them
  (`image/*` matches every image type) is `wrong_content_type`, unread.

Proxies from the environment are not used (`trust_env` stays off), so the address policy
is about the address actually connected to.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import socket
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import fsspec
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

__all__ = [
    "FAILURES",
    "FetchPolicy",
    "FetchResult",
    "RefusedAddress",
    "address_refusal",
    "fetch_all",
    "url_refusal",
]

#: Every failure reason a `FetchResult` can carry, and what it means.
FAILURES: dict[str, str] = {
    "missing_url": "the row has no URL to download its image from",
    "bad_url": "the URL cannot be parsed or has no host",
    "refused_scheme": "the URL's scheme is not http(s), nor one the recipe allows "
    "(download.fs_schemes); redirects must stay on http(s)",
    "refused_address": "the host is or resolves to a loopback, private, link-local, "
    "multicast, reserved or unspecified address (download.allow_loopback / allow_private)",
    "dns_error": "the host name does not resolve",
    "connection_error": "the connection failed or was reset (after the retries)",
    "timeout": "no complete response within download.timeout_s (after the retries)",
    "http_404": "HTTP 404 Not Found (or no such object in s3/gs)",
    "http_error": "any other HTTP error status (429 and 5xx after the retries)",
    "redirect_loop": "a redirect chain came back to a URL it had already visited",
    "too_many_redirects": "more than download.max_redirects redirects",
    "wrong_content_type": "the response's Content-Type is not one of download.content_types",
    "too_large": "the body is larger than download.max_bytes",
    "truncated_body": "the body ended before its Content-Length (after the retries)",
}

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HTTP = frozenset({"http", "https"})
_CHUNK = 1 << 16


@dataclass(frozen=True)
class FetchPolicy:
    """How URLs are fetched (the download stage builds it from its config)."""

    timeout_s: float = 10.0
    retries: int = 2
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    max_bytes: int = 32 << 20
    max_redirects: int = 5
    allow_loopback: bool = False
    allow_private: bool = False
    fs_schemes: tuple[str, ...] = ()
    content_types: tuple[str, ...] | None = (
        "image/*",
        "application/octet-stream",
        "binary/octet-stream",
    )
    user_agent: str = "kiln-download/0.1"
    concurrency: int = 64


@dataclass(frozen=True)
class FetchResult:
    """What fetching one URL gave: `body` on success, else `reason` (a `FAILURES` key) and a
    short `detail`. `status` is the last HTTP status seen (None without a response)."""

    url: str
    body: bytes | None = None
    status: int | None = None
    reason: str | None = None
    detail: str | None = None
    final_url: str | None = None
    #: Bytes of the body as received (after any Content-Encoding is undone).
    size: int | None = None
    attempts: int = 1
    #: Whether another attempt may succeed (the retry loop's business only).
    transient: bool = False
    retry_after: float | None = None


class RefusedAddress(OSError):
    """A host resolved to an address the policy refuses (raised before connecting)."""

    def __init__(self, host: str, address: str, why: str) -> None:
        super().__init__(f"{host} resolves to {address} ({why})")
        self.host, self.address, self.why = host, address, why


def address_refusal(address: str, policy: FetchPolicy) -> str | None:
    """Why `address` (an IP literal) is refused by `policy`, or None when it is allowed."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return "unspecified address"
    if ip.is_multicast:
        return "multicast address"
    if ip.is_loopback:
        return None if policy.allow_loopback else "loopback address"
    if ip.is_link_local:
        return "link-local address"
    if ip.is_reserved:
        return "reserved address"
    if ip.is_private or not ip.is_global:
        return None if policy.allow_private else "private address"
    return None


def _literal_ip(host: str) -> str | None:
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    return None


def url_refusal(url: URL, policy: FetchPolicy, *, redirect: bool = False) -> tuple[str, str] | None:
    """(reason, detail) when `url` must not be fetched before any lookup: a bad URL, a
    refused scheme, a literal IP the policy refuses; None when it may go on."""
    scheme = url.scheme.lower()
    if not scheme:
        return "bad_url", "not an absolute URL (no scheme; set download.base_url for paths)"
    allowed_fs = () if redirect else policy.fs_schemes
    if scheme not in _HTTP:
        if scheme in allowed_fs:
            return None if url.host or url.path.strip("/") else ("bad_url", "no bucket or path")
        return "refused_scheme", f"scheme {scheme or '(none)'!r}"
    host = url.host
    if not host:
        return "bad_url", "no host"
    ip = _literal_ip(host)
    if ip is not None:
        why = address_refusal(ip, policy)
        if why:
            return "refused_address", f"{ip} is a {why}"
    return None


class _CheckedResolver(AbstractResolver):
    """aiohttp resolver that refuses hosts resolving to any address the policy refuses; the
    connector connects only to the addresses returned here (no second lookup)."""

    def __init__(self, policy: FetchPolicy) -> None:
        self._policy = policy
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        infos = await self._inner.resolve(host, port, family)
        for info in infos:
            why = address_refusal(info["host"], self._policy)
            if why:
                raise RefusedAddress(host, info["host"], why)
        return infos

    async def close(self) -> None:
        await self._inner.close()


def _type_allowed(content_type: str, allowed: Sequence[str]) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    for pattern in allowed:
        p = pattern.lower()
        if p == kind or (p.endswith("/*") and kind.startswith(p[:-1])):
            return True
    return False


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: use the backoff


def _refused(e: BaseException) -> RefusedAddress | None:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, RefusedAddress):
            return cur
        seen.add(id(cur))
        nxt = getattr(cur, "os_error", None)
        cur = nxt if isinstance(nxt, BaseException) else (cur.__cause__ or cur.__context__)
    return None


async def _read_capped(resp: aiohttp.ClientResponse, max_bytes: int) -> bytes | None:
    """The body, or None as soon as it passes `max_bytes` (the connection is then closed)."""
    parts: list[bytes] = []
    total = 0
    async for chunk in resp.content.iter_chunked(_CHUNK):
        total += len(chunk)
        if total > max_bytes:
            resp.close()
            return None
        parts.append(chunk)
    return b"".join(parts)


async def _http_once(session: aiohttp.ClientSession, url: str, policy: FetchPolicy) -> FetchResult:
    """One attempt: the URL and its redirects, each hop checked before it is requested."""
    try:
        current = URL(url)
    except (ValueError, TypeError) as e:
        return FetchResult(url, reason="bad_url", detail=str(e)[:200])
    seen = {str(current)}
    timeout = aiohttp.ClientTimeout(total=policy.timeout_s)
    status: int | None = None
    for hop in range(policy.max_redirects + 1):
        refusal = url_refusal(current, policy, redirect=hop > 0)
        if refusal:
            return FetchResult(url, status=status, reason=refusal[0], detail=refusal[1])
        try:
            async with session.get(current, allow_redirects=False, timeout=timeout) as resp:
                status = resp.status
                if status in _REDIRECTS:
                    location = resp.headers.get("Location")
                    if not location:
                        return FetchResult(
                            url,
                            status=status,
                            reason="http_error",
                            detail=f"HTTP {status} without Location",
                        )
                    try:
                        nxt = current.join(URL(location))
                    except (ValueError, TypeError):
                        return FetchResult(
                            url,
                            status=status,
                            reason="bad_url",
                            detail=f"redirect to {location[:200]!r}",
                        )
                    if str(nxt) in seen:
                        return FetchResult(
                            url,
                            status=status,
                            reason="redirect_loop",
                            detail=f"back to {str(nxt)[:200]}",
                        )
                    seen.add(str(nxt))
                    current = nxt
                    continue
                if status == 404:
                    return FetchResult(url, status=status, reason="http_404", detail="HTTP 404")
                if status == 429 or status >= 500:
                    return FetchResult(
                        url,
                        status=status,
                        reason="http_error",
                        detail=f"HTTP {status}",
                        transient=True,
                        retry_after=_retry_after(resp.headers.get("Retry-After")),
                    )
                if not 200 <= status < 300:
                    return FetchResult(
                        url, status=status, reason="http_error", detail=f"HTTP {status}"
                    )
                final = str(current)
                if policy.content_types is not None and not _type_allowed(
                    resp.headers.get("Content-Type", "application/octet-stream"),
                    policy.content_types,
                ):
                    kind = resp.headers.get("Content-Type", "")[:100]
                    return FetchResult(
                        url,
                        status=status,
                        reason="wrong_content_type",
                        detail=f"Content-Type {kind!r}",
                        final_url=final,
                    )
                length = resp.content_length
                if length is not None and length > policy.max_bytes:
                    return FetchResult(
                        url,
                        status=status,
                        reason="too_large",
                        detail=f"Content-Length {length}",
                        final_url=final,
                    )
                body = await _read_capped(resp, policy.max_bytes)
                if body is None:
                    return FetchResult(
                        url,
                        status=status,
                        reason="too_large",
                        detail=f"body over {policy.max_bytes} bytes",
                        final_url=final,
                    )
                return FetchResult(url, body=body, status=status, final_url=final, size=len(body))
        except TimeoutError:
            return FetchResult(
                url,
                status=status,
                reason="timeout",
                detail=f"no response in {policy.timeout_s:g}s",
                transient=True,
            )
        except aiohttp.ClientPayloadError as e:
            return FetchResult(
                url, status=status, reason="truncated_body", detail=type(e).__name__, transient=True
            )
        except aiohttp.ClientConnectorDNSError as e:
            refused = _refused(e)
            if refused is not None:
                return FetchResult(
                    url, status=status, reason="refused_address", detail=str(refused)[:200]
                )
            return FetchResult(
                url, status=status, reason="dns_error", detail=f"{current.host} does not resolve"
            )
        except aiohttp.InvalidURL as e:
            return FetchResult(url, status=status, reason="bad_url", detail=str(e)[:200])
        except (aiohttp.ClientConnectionError, ConnectionError) as e:
            refused = _refused(e)
            if refused is not None:
                return FetchResult(
                    url, status=status, reason="refused_address", detail=str(refused)[:200]
                )
            return FetchResult(
                url,
                status=status,
                reason="connection_error",
                detail=type(e).__name__,
                transient=True,
            )
        except aiohttp.ClientResponseError as e:  # malformed status line or headers
            return FetchResult(
                url, status=status, reason="http_error", detail=f"bad response ({type(e).__name__})"
            )
        except aiohttp.ClientError as e:
            return FetchResult(
                url, status=status, reason="connection_error", detail=type(e).__name__
            )
    return FetchResult(
        url,
        status=status,
        reason="too_many_redirects",
        detail=f"over {policy.max_redirects} redirects",
    )


def _read_fs(url: str, max_bytes: int) -> FetchResult:
    """One object of an fsspec filesystem (s3, gs, ...), at most `max_bytes` read."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
        size = fs.size(path)
        if size is not None and size > max_bytes:
            return FetchResult(url, reason="too_large", detail=f"object of {size} bytes")
        with fs.open(path, "rb") as f:
            body = f.read(max_bytes + 1)
    except FileNotFoundError:
        return FetchResult(url, reason="http_404", detail="no such object")
    except (ImportError, ValueError) as e:
        return FetchResult(url, reason="bad_url", detail=str(e)[:200])
    except OSError as e:
        return FetchResult(url, reason="connection_error", detail=type(e).__name__, transient=True)
    if len(body) > max_bytes:
        return FetchResult(url, reason="too_large", detail=f"body over {max_bytes} bytes")
    return FetchResult(url, body=body, final_url=url, size=len(body))


async def _fs_once(url: str, policy: FetchPolicy) -> FetchResult:
    refusal = url_refusal(URL(url), policy)
    if refusal:
        return FetchResult(url, reason=refusal[0], detail=refusal[1])
    try:
        return await asyncio.wait_for(
            asyncio.to_thread(_read_fs, url, policy.max_bytes), policy.timeout_s
        )
    except TimeoutError:
        return FetchResult(
            url, reason="timeout", detail=f"no object in {policy.timeout_s:g}s", transient=True
        )


def _backoff(url: str, attempt: int, policy: FetchPolicy, retry_after: float | None) -> float:
    """Seconds to wait before attempt `attempt + 1`: exponential with a jitter drawn from
    (url, attempt), so it is the same on every run; at least what `Retry-After` asked; never
    over `max_backoff_s`."""
    jitter = 0.5 + (zlib.crc32(f"{attempt}:{url}".encode()) % 1000) / 1000
    wait = policy.backoff_s * 2**attempt * jitter
    if retry_after is not None:
        wait = max(wait, retry_after)
    return min(policy.max_backoff_s, wait)


async def _fetch(
    session: aiohttp.ClientSession, url: str, policy: FetchPolicy, gate: asyncio.Semaphore
) -> FetchResult:
    """`url` with retries on transient failures (module doc)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    attempt = 0
    while True:
        async with gate:
            if scheme in policy.fs_schemes and scheme not in _HTTP:
                result = await _fs_once(url, policy)
            else:
                result = await _http_once(session, url, policy)
        if not result.transient or attempt >= policy.retries:
            return _with_attempts(result, attempt + 1)
        await asyncio.sleep(_backoff(url, attempt, policy, result.retry_after))
        attempt += 1


def _with_attempts(result: FetchResult, attempts: int) -> FetchResult:
    detail = result.detail
    if result.reason and attempts > 1:
        detail = f"{detail} ({attempts} attempts)"
    return dataclasses.replace(
        result, detail=detail, attempts=attempts, transient=False, retry_after=None
    )


async def fetch_all(
    urls: Sequence[str],
    policy: FetchPolicy,
    on_result: Callable[[FetchResult], Awaitable[Any]] | None = None,
) -> list[tuple[FetchResult, Any]]:
    """Fetch every URL (at most `policy.concurrency` at a time); (result, on_result's return
    value) per URL, in `urls` order.

    `on_result(result)`, when given, is awaited as soon as a URL is done (the download stage
    decodes there while the other downloads go on), and the body is then dropped from the
    returned result, so a batch's bodies are not all held at once.
    """
    connector = aiohttp.TCPConnector(limit=policy.concurrency, resolver=_CheckedResolver(policy))
    gate = asyncio.Semaphore(policy.concurrency)
    # images are compressed already: ask for no Content-Encoding (a server that sends one
    # anyway is decompressed, and max_bytes counts the decompressed bytes)
    headers = {"User-Agent": policy.user_agent, "Accept-Encoding": "identity"}
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, trust_env=False, auto_decompress=True
    ) as session:

        async def one(url: str) -> tuple[FetchResult, Any]:
            result = await _fetch(session, url, policy, gate)
            if on_result is None:
                return result, None
            done = await on_result(result)
            return dataclasses.replace(result, body=None), done

        return list(await asyncio.gather(*(one(u) for u in urls)))
