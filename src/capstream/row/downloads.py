"""Images named by URL, downloaded on the event loop: concurrent, retried, safe and polite.

One ``ImageDownloads`` per event loop (a caption session's, ``capstream estimate``'s) holds one
aiohttp ``ClientSession``, opened at the first download: connections are reused, at most
``image.download_concurrency`` downloads run at once and ``image.download_per_host`` to one host,
and identical URLs in flight are fetched once.

* **Retries** (tenacity, the policy of ``model/retry.py``): 408, 429, 5xx, timeouts and dropped
  connections, ``image.download_attempts`` attempts in all, jittered backoff, ``Retry-After``
  honoured up to ``MAX_RETRY_WAIT_S``. Anything else (404, 403, 410, an HTML page, too large) fails
  at once. A failure is an ``ImageError`` naming the status and the URL (credentials and query
  masked: ``shown_url``).
* **Safety**: ``http``/``https`` only. A host whose addresses are not public (loopback, private,
  link-local such as the cloud metadata address 169.254.169.254, multicast, reserved,
  unspecified; IPv4 and IPv6, mapped forms included) is refused without connecting, unless
  ``image.allow_private_urls``. The check is on the resolved addresses, which are the only ones
  aiohttp then connects to (``PublicOnlyResolver``), and on an address written in the URL itself;
  redirects are followed here, at most ``MAX_REDIRECTS``, each hop checked again.
* **Opt-outs**: an ``X-Robots-Tag`` of ``noai``, ``noimageai`` or ``noml`` (for every agent, or
  for ``capstream``) makes the row an error and the image is not read, unless
  ``image.respect_opt_outs: false``. Requests carry ``User-Agent: capstream/<version>``
  (``image.user_agent``).

``RowSlots`` decides how many rows a backend starts ahead of the request slots (downloaded rows
get ``download_concurrency`` more, so that an image is ready when a slot frees), and
``embedded_images`` gives a shard the bytes of its rows' downloads (``output.embed_images``).

    >>> downloads = ImageDownloads(config.image)                  # inside the loop that uses it
    >>> data = await downloads.fetch("https://cdn.example.com/a.jpg")  # bytes; ImageError if none
    >>> head = await downloads.head("https://cdn.example.com/a.jpg")   # its first bytes and its end
    >>> await downloads.aclose()
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Sequence

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from .. import __version__
from ..errors import Failure, ImageError, RefusedAddress, RequestFailed
from ..model.retry import request_retrying, retry_after_from_headers, transient_status
from .images import KeptFiles, url_of

if TYPE_CHECKING:
    from ..config import ImageConfig

MAX_REDIRECTS = 5
MAX_RETRY_WAIT_S = 10.0  # the longest wait between two attempts, Retry-After included
MAX_BYTES = 50 * 2**20  # a larger image is refused (as files are)
HEAD_BYTES = 64 * 1024  # what `capstream estimate` asks for first: enough for nearly every header
TAIL_BYTES = 4096  # and then the file's end, to tell a truncated file (images.ends_as_it_should)
OPT_OUTS = frozenset({"noai", "noimageai", "noml"})
AGENT_TOKEN = "capstream"  # an X-Robots-Tag directive for this agent alone: "capstream: noai"
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_READ_CHUNK = 64 * 1024

__all__ = ["ImageDownloads", "ImageHead", "PublicOnlyResolver", "RowSlots", "embedded_images", "fetch_all",
           "is_public_address", "opted_out", "shown_url", "MAX_REDIRECTS"]


# --------------------------------------------------------------------------------------- safety


def is_public_address(address: str) -> bool:
    """Whether an IP address is one a dataset's URL may reach: global, and neither loopback,
    private, link-local, multicast, reserved nor unspecified; an IPv6 address that carries an IPv4
    one (mapped, 6to4, Teredo) only when that one is too."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope ("fe80::1%eth0") says nothing more
    inner: list[Any] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        inner += [a for a in (ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())) if a is not None]
    return all(a.is_global and not (a.is_loopback or a.is_private or a.is_link_local or a.is_multicast
                                    or a.is_reserved or a.is_unspecified) for a in inner)


class PublicOnlyResolver(AbstractResolver):
    """An aiohttp resolver that keeps only the addresses ``allowed`` accepts (``is_public_address``):
    aiohttp connects only to what its resolver returns, so a name pointing inside the network is
    never connected to. None left: ``RefusedAddress``."""

    def __init__(self, inner: AbstractResolver | None = None,
                 allowed: Callable[[str], bool] = is_public_address):
        self.inner = inner if inner is not None else DefaultResolver()
        self.allowed = allowed

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        found = await self.inner.resolve(host, port, family)
        kept = [r for r in found if self.allowed(r["host"])]
        if not kept:
            raise RefusedAddress(host, [r["host"] for r in found])
        return kept

    async def close(self) -> None:
        await self.inner.close()


def opted_out(robots_tags: Sequence[str]) -> str | None:
    """The opt-out directive among ``X-Robots-Tag`` values (``noai``, ``noimageai``, ``noml``), for
    every agent or for ``capstream``, or None. A value is a list of directives; ``agent:`` in front
    of one names the agent it and those after it are for ("noai, googlebot: noindex" opts out;
    "googlebot: noindex, noai" does not; "googlebot: noindex, capstream: noai" does), and
    ``unavailable_after: <date>`` is a directive with a value, not an agent.

    >>> opted_out(["noindex, capstream: noai"])
    'noai'
    """
    for value in robots_tags:
        for_us = True  # directives before any agent's name are for every agent
        for part in value.split(","):
            name, colon, rest = part.partition(":")
            name = name.strip().lower()
            if colon and name != "unavailable_after":
                for_us, part = name == AGENT_TOKEN, rest  # "agent: directive"
            directive = part.strip().lower()
            if for_us and directive in OPT_OUTS:
                return directive
    return None


def shown_url(url: str | URL) -> str:
    """The URL as an error message may show it: credentials and query masked (they often carry
    tokens or signatures), the fragment dropped."""
    try:
        parsed = url if isinstance(url, URL) else URL(url)
    except (TypeError, ValueError):
        return "<an unreadable URL>"
    if parsed.user is not None or parsed.password is not None:
        parsed = parsed.with_user(None).with_password(None)
        host = f"***@{parsed.raw_host or ''}"
    else:
        host = parsed.raw_host or ""
    port = f":{parsed.explicit_port}" if parsed.explicit_port is not None else ""
    if ":" in host and not host.startswith("***"):
        host = f"[{host}]"
    return f"{parsed.scheme}://{host}{port}{parsed.raw_path}" + ("?***" if parsed.raw_query_string else "")


# ------------------------------------------------------------------------------------ downloads


@dataclass(frozen=True)
class ImageHead:
    """What ``capstream estimate`` reads of an image URL: its first bytes (all of them when the file
    is small or the server ignores ranges), its last bytes and its length."""

    start: bytes
    end: bytes
    size: int

    @property
    def whole(self) -> bool:
        return len(self.start) >= self.size


@dataclass(frozen=True)
class _Body:
    data: bytes
    status: int
    total: int | None  # the whole file's length, from a 206's Content-Range


class ImageDownloads:
    """The downloads of one event loop; see the module's docstring. ``resolver``: the resolver under
    the public-address check (tests give a stub); ``allowed``: that check (``is_public_address``)."""

    def __init__(self, image: "ImageConfig", *, resolver: AbstractResolver | None = None,
                 allowed: Callable[[str], bool] = is_public_address):
        self.attempts = image.download_attempts
        self.timeout_s = image.download_timeout_s
        self.concurrency, self.per_host = image.download_concurrency, image.download_per_host
        self.respect_opt_outs = image.respect_opt_outs
        self.user_agent = image.user_agent or f"capstream/{__version__}"
        self.allowed: Callable[[str], bool] = (lambda address: True) if image.allow_private_urls else allowed
        self.resolver = resolver
        self._session: aiohttp.ClientSession | None = None
        self._resolver: PublicOnlyResolver | None = None
        self._slots: asyncio.Semaphore | None = None
        self._in_flight: dict[str, asyncio.Future] = {}

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._resolver = PublicOnlyResolver(self.resolver, self.allowed)
            connector = aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=self.per_host,
                                             resolver=self._resolver)
            # No cookie jar: cookies of millions of hosts would be kept for the whole run, for nothing.
            self._session = aiohttp.ClientSession(
                connector=connector, headers={"User-Agent": self.user_agent},
                timeout=aiohttp.ClientTimeout(total=self.timeout_s), cookie_jar=aiohttp.DummyCookieJar())
            self._slots = asyncio.Semaphore(self.concurrency)
        return self._session

    async def fetch(self, url: str) -> bytes:
        """The image's bytes; ``ImageError`` (status and URL) when it cannot be had."""
        shared = self._in_flight.get(url)
        if shared is None:  # the same URL in flight for another row: one download for both
            shared = self._in_flight[url] = asyncio.ensure_future(self._download(url))
            shared.add_done_callback(lambda done: self._forget(url, done))
        return (await asyncio.shield(shared)).data

    def _forget(self, url: str, done: asyncio.Future) -> None:
        self._in_flight.pop(url, None)
        if not done.cancelled():
            done.exception()  # retrieved: no warning when every row waiting for it was cancelled

    async def head(self, url: str) -> ImageHead:
        """The image's first ``HEAD_BYTES`` and last ``TAIL_BYTES`` (two ranged requests at most, one
        when it is small), with the same rules as ``fetch``; the whole file from a server that
        ignores ranges."""
        first = await self._download(url, f"bytes=0-{HEAD_BYTES - 1}")
        if first.status == 206 and first.total is None:  # a part of a file of unknown length: read it all
            first = await self._download(url)
        if first.status != 206 or first.total <= len(first.data):  # the whole file
            return ImageHead(first.data, first.data[-TAIL_BYTES:], len(first.data))
        last = await self._download(url, f"bytes=-{TAIL_BYTES}")
        return ImageHead(first.data, last.data, first.total)

    async def _download(self, url: str, byte_range: str | None = None) -> _Body:
        shown = shown_url(url)
        try:
            async for attempt in request_retrying(max_attempts=self.attempts, max_wait_s=MAX_RETRY_WAIT_S,
                                                  initial_wait_s=0.25):
                with attempt:
                    client = self._client()
                    async with self._slots:
                        return await self._attempt(client, url, shown, byte_range)
        except RequestFailed as failed:  # still failing after every attempt
            tried = f" ({self.attempts} attempts)" if failed.failure is Failure.TRANSIENT and self.attempts > 1 else ""
            raise ImageError(f"download failed: {failed.message} for {shown}{tried}") from None
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def _attempt(self, client: aiohttp.ClientSession, url: str, shown: str, byte_range: str | None) -> _Body:
        """One attempt: ``RequestFailed`` (transient or not) for a status or a connection's failure,
        ``ImageError`` for what no attempt would change."""
        try:
            async with self._final_response(client, url, shown, byte_range) as response:
                return await self._read(response, shown)
        except aiohttp.ClientConnectorDNSError as err:
            if isinstance(err.os_error, RefusedAddress):
                refused = err.os_error
                raise ImageError(f"refused {shown}: {refused.host} is not a public address "
                                 f"({', '.join(refused.addresses)}); image.allow_private_urls: true allows it"
                                 ) from None
            raise RequestFailed(Failure.TRANSIENT, f"cannot resolve {err.host}") from None
        except aiohttp.InvalidURL:
            raise ImageError(f"not a valid URL: {shown}") from None
        except aiohttp.ClientSSLError as err:  # a certificate no attempt will change
            raise ImageError(f"download failed: TLS: {type(err).__name__} for {shown}") from None
        except asyncio.TimeoutError:
            raise RequestFailed(Failure.TRANSIENT, f"timed out after {self.timeout_s:g} s") from None
        except aiohttp.ClientError as err:  # refused or dropped connections, a body cut short
            raise RequestFailed(Failure.TRANSIENT, _connection_failure(err)) from None

    @asynccontextmanager
    async def _final_response(self, client: aiohttp.ClientSession, url: str, shown: str,
                              byte_range: str | None) -> AsyncIterator[aiohttp.ClientResponse]:
        """The response at the end of the redirects, each hop's URL checked before it is asked."""
        target = _checked(url, shown, self.allowed)
        headers = {"Range": byte_range} if byte_range else None
        for hop in range(MAX_REDIRECTS + 1):
            async with client.get(target, allow_redirects=False, headers=headers) as response:
                location = response.headers.get("Location")
                if response.status not in _REDIRECT_STATUSES or not location:
                    yield response
                    return
            if hop == MAX_REDIRECTS:
                raise ImageError(f"download failed: more than {MAX_REDIRECTS} redirects for {shown}")
            try:
                joined = response.url.join(URL(location))
            except ValueError:  # a port out of range, a bad host: the host's error, the row's
                raise ImageError(f"download failed: a bad redirect (Location not a URL) for {shown}") from None
            target = _checked(joined, shown, self.allowed)

    async def _read(self, response: aiohttp.ClientResponse, shown: str) -> _Body:
        status = response.status
        if status >= 400:
            failure = Failure.TRANSIENT if transient_status(status) else Failure.ROW
            raise RequestFailed(failure, f"HTTP {status}", status, retry_after_from_headers(response.headers))
        if self.respect_opt_outs and (directive := opted_out(response.headers.getall("X-Robots-Tag", ()))):
            raise ImageError(f"opted out: {shown} is served with X-Robots-Tag {directive!r} "
                             "(image.respect_opt_outs); not sent to the model")
        kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind == "text/html":  # a page (a soft 404, a login wall), never an image: not read
            raise ImageError(f"not an image: {shown} is served as {kind}")
        if response.content_length is not None and response.content_length > MAX_BYTES:
            raise ImageError(f"download too large: {response.content_length} bytes (limit {MAX_BYTES}) for {shown}")
        parts, size = [], 0
        async for part in response.content.iter_chunked(_READ_CHUNK):
            size += len(part)
            if size > MAX_BYTES:
                raise ImageError(f"download too large: more than {MAX_BYTES} bytes for {shown}")
            parts.append(part)
        if not size:
            raise ImageError(f"download failed: empty body for {shown}")
        total = _range_total(response.headers.get("Content-Range")) if status == 206 else None
        return _Body(b"".join(parts), status, total)

    async def aclose(self) -> None:
        """Stop the downloads in flight and close the connections; call on the loop that used it."""
        for shared in list(self._in_flight.values()):
            shared.cancel()
        if self._session is not None:
            await self._session.close()
            await self._resolver.close()  # aiohttp closes only a resolver it made itself
            self._session = None


def _checked(url: str | URL, shown: str, allowed: Callable[[str], bool]) -> URL:
    """The URL to ask: ``ImageError`` when it is not http(s), or names a refused address itself
    (an address in a URL is connected to without the resolver)."""
    try:
        parsed = url if isinstance(url, URL) else URL(url)
    except (TypeError, ValueError):
        raise ImageError(f"not a valid URL: {shown}") from None
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise ImageError(f"refused {shown_url(parsed)}: only http and https URLs with a host are fetched")
    host = parsed.raw_host
    literal = _literal_address(host)
    if literal is None:
        return parsed  # a name: checked by the resolver, on every address it finds
    if not allowed(literal):
        raise ImageError(f"refused {shown_url(parsed)}: {host} is not a public address; "
                         "image.allow_private_urls: true allows it")
    return parsed


def _literal_address(host: str) -> str | None:
    """The address a host written as one stands for, legacy IPv4 forms included ("127.1",
    "2130706433": older aiohttp releases connect to those without asking their resolver); None for a name."""
    try:
        return str(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        pass
    try:
        return str(ipaddress.IPv4Address(socket.inet_aton(host)))
    except OSError:  # not an IPv4 address in any form
        return None


def _range_total(content_range: str | None) -> int | None:
    """The file's length from ``Content-Range: bytes 0-65535/123456`` (None for ``*`` or none)."""
    total = (content_range or "").rpartition("/")[2].strip()
    return int(total) if total.isdigit() else None


def _connection_failure(err: aiohttp.ClientError) -> str:
    if isinstance(err, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(err, aiohttp.ClientPayloadError):
        return "the connection dropped during the body"
    if isinstance(err, aiohttp.ClientConnectorError):
        return f"cannot connect: {err.os_error.strerror or type(err.os_error).__name__}"
    return type(err).__name__


# ------------------------------------------------------------------------- rows ahead, embedding


class RowSlots:
    """How many rows a backend starts ahead of the ``max_concurrency`` request slots: twice that
    (their images prepared while earlier requests run), and for rows whose image is downloaded
    ``download_concurrency`` more, so that their downloads run ahead and an image is ready when a
    slot frees. Memory stays bounded by these counts (and the run's window of chunks).

        >>> slots = session.row_slots.for_image(row_image)   # an asyncio.Semaphore
        >>> async with slots: await session.caption(row_image, row)
    """

    def __init__(self, max_concurrency: int, download_concurrency: int):
        self.held = asyncio.Semaphore(2 * max_concurrency)
        self.downloaded = asyncio.Semaphore(2 * max_concurrency + download_concurrency)

    def for_image(self, value: Any) -> asyncio.Semaphore:
        return self.downloaded if url_of(value) is not None else self.held


def fetch_all(urls: Sequence[str], image: "ImageConfig") -> list[bytes | None]:
    """Download ``urls`` concurrently on a loop of its own (from a thread with none running): each
    one's bytes, or None where it failed."""
    async def all_of() -> list[bytes | None]:
        downloads = ImageDownloads(image)
        try:
            found = await asyncio.gather(*(downloads.fetch(url) for url in urls), return_exceptions=True)
        finally:
            await downloads.aclose()
        return [None if isinstance(data, BaseException) else data for data in found]

    return asyncio.run(all_of()) if urls else []


def embedded_images(values: Sequence[Any], usable: Sequence[bool], kept: KeptFiles | None, image: "ImageConfig",
                    *, in_place: bool) -> list[Any]:
    """A shard's embedded images (``output.embed_images``): for each row whose image is a URL and
    ``usable`` (its row has no ``ImageError``), ``{"bytes": ..., "path": ...}`` with the bytes the
    run downloaded (``kept``), or downloads them now (a row answered before a resume). Rows
    without: None, or (``in_place``: the image column itself) the value as it was."""
    urls = [url_of(value) if ok else None for value, ok in zip(values, usable)]
    # Each row takes what it put (two rows with one URL put it twice); None: not downloaded this run.
    datas = [kept.pop(url) if kept is not None and url is not None else None for url in urls]
    missing = sorted({url for url, data in zip(urls, datas) if url is not None and data is None})
    fetched = dict(zip(missing, fetch_all(missing, image)))
    column = []
    for value, url, data in zip(values, urls, datas):
        data = data if data is not None or url is None else fetched.get(url)
        if data is None:
            column.append(value if in_place else None)
        else:
            column.append({"bytes": data, "path": url if in_place else os.path.basename(URL(url).path) or None})
    return column
