"""row/downloads.py against the fake image host on 127.0.0.1: retries, safety, opt-outs, ranges.

Test traffic goes to 127.0.0.1 only. Names that would point elsewhere (``*.test``) are answered by
a stub resolver and never connected to; tests that must connect to the host either allow private
addresses (``image.allow_private_urls``) or give a policy that accepts 127.0.0.1 alone.
"""

from __future__ import annotations

import asyncio
import io
import socket
import time

import pytest
from aiohttp.abc import AbstractResolver
from PIL import Image

from capstream import __version__
from capstream.config import ImageConfig
from capstream.errors import ImageError
from capstream.row import downloads as downloads_module
from capstream.row.downloads import ImageDownloads, is_public_address, opted_out, shown_url
from capstream.testing.image_host import FakeImageHost


def jpeg(width=64, height=48, **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(buf, "JPEG", **save)
    return buf.getvalue()


JPEG = jpeg()
BIG = jpeg(2000, 1500, quality=100, comment=b"x" * 60_000)  # well over HEAD_BYTES


class StubResolver(AbstractResolver):
    """Answers names from a table (never the network)."""

    def __init__(self, table: dict[str, list[str]]):
        self.table = table
        self.asked: list[str] = []

    async def resolve(self, host, port=0, family=socket.AF_INET):
        self.asked.append(host)
        return [{"hostname": host, "host": address, "port": port, "proto": 0, "flags": socket.AI_NUMERICHOST,
                 "family": socket.AF_INET6 if ":" in address else socket.AF_INET} for address in self.table[host]]

    async def close(self):
        pass


def only_loopback_one(address: str) -> bool:
    """A policy for tests that must connect: 127.0.0.1 (the host) stands in for a public address."""
    return address == "127.0.0.1"


def fetch(url: str, resolver=None, allowed=None, **image) -> bytes:
    return asyncio.run(_many([url], resolver, allowed, image))[0]


async def _many(urls, resolver, allowed, image, method="fetch"):
    kwargs = {"resolver": resolver} | ({"allowed": allowed} if allowed else {})
    downloads = ImageDownloads(ImageConfig(**image), **kwargs)
    try:
        found = await asyncio.gather(*(getattr(downloads, method)(u) for u in urls), return_exceptions=True)
    finally:
        await downloads.aclose()
    for item in found:
        if isinstance(item, BaseException):
            raise item
    return found


@pytest.fixture
def host():
    with FakeImageHost({"/a.jpg": JPEG, "/big.jpg": BIG}) as server:
        yield server


PRIVATE = {"allow_private_urls": True}


# ------------------------------------------------------------------------------------------ safety


def test_a_loopback_url_is_refused_by_default_and_the_host_sees_nothing(host):
    with pytest.raises(ImageError, match=r"^refused http://127\.0\.0\.1:\d+/a\.jpg: 127\.0\.0\.1 is not a public"):
        fetch(host.url("/a.jpg"))
    assert sum(host.requests.values()) == 0
    assert fetch(host.url("/a.jpg"), **PRIVATE) == JPEG
    assert host.requests["/a.jpg"] == 1


@pytest.mark.parametrize("address", ["169.254.169.254", "10.1.2.3", "192.168.0.7", "172.16.0.1", "100.64.0.1",
                                     "0.0.0.0", "224.0.0.1", "240.0.0.1", "::1", "fe80::1", "fc00::1", "ff02::1", "::",
                                     "::ffff:127.0.0.1", "2002:7f00:1::1"])
def test_a_name_resolving_inside_is_refused_without_connecting(address):
    resolver = StubResolver({"images.test": [address]})
    with pytest.raises(ImageError, match=r"^refused http://images\.test/a\.jpg: images\.test is not a public address"):
        fetch("http://images.test/a.jpg", resolver=resolver)
    assert resolver.asked == ["images.test"]


def test_addresses_written_in_the_url_are_checked_without_the_resolver():
    resolver = StubResolver({})
    for url in ("http://169.254.169.254/latest/meta-data/", "http://[::1]:8080/a.jpg", "http://10.0.0.1/a.jpg"):
        with pytest.raises(ImageError, match="^refused "):
            fetch(url, resolver=resolver)
    assert resolver.asked == []


def test_numeric_forms_of_an_address_are_refused(host):
    # 2130706433 and 127.1 are 127.0.0.1 to the system's resolver (aiohttp's newer releases refuse them outright).
    for url in (f"http://2130706433:{host.port}/a.jpg", f"http://127.1:{host.port}/a.jpg"):
        with pytest.raises(ImageError, match="^refused |^not a valid URL"):
            fetch(url)
    assert sum(host.requests.values()) == 0


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/a.jpg", "gopher://127.0.0.1/", "http:///a.jpg"])
def test_only_http_and_https_with_a_host(url):
    with pytest.raises(ImageError, match=r"^refused .*only http and https|^not a valid URL"):
        fetch(url, **PRIVATE)


def test_every_redirect_is_checked_again(host):
    resolver = StubResolver({"metadata.test": ["169.254.169.254"], "cdn.test": ["127.0.0.1"]})
    host.redirects.update({"/to-metadata": f"http://metadata.test:{host.port}/latest", "/to-a": "/a.jpg",
                           "/to-cdn": f"http://cdn.test:{host.port}/a.jpg"})
    with pytest.raises(ImageError, match="^refused .*metadata.test is not a public address"):
        fetch(host.url("/to-metadata"), resolver=resolver, allowed=only_loopback_one)
    assert host.requests == {"/to-metadata": 1}  # the first hop was asked, the second never
    assert fetch(host.url("/to-a"), resolver=resolver, allowed=only_loopback_one) == JPEG
    assert fetch(host.url("/to-cdn"), resolver=resolver, allowed=only_loopback_one) == JPEG
    with pytest.raises(ImageError, match="^refused"):  # with the default policy the redirect's target is refused too
        fetch(f"http://cdn.test:{host.port}/a.jpg", resolver=resolver)


def test_at_most_five_redirects(host):
    for hop in range(6):
        host.redirects[f"/hop{hop}"] = f"/hop{hop + 1}"
    host.images["/hop6"] = JPEG
    assert fetch(host.url("/hop1"), **PRIVATE) == JPEG  # five redirects
    with pytest.raises(ImageError, match="more than 5 redirects"):
        fetch(host.url("/hop0"), **PRIVATE)


def test_a_redirect_to_what_is_not_a_url_is_the_rows_error(host):
    host.redirects["/bad"] = "http://images.test:99999/a.jpg"  # a port out of range
    with pytest.raises(ImageError, match="^download failed: a bad redirect"):
        fetch(host.url("/bad"), **PRIVATE)


def test_which_addresses_are_public():
    assert is_public_address("93.184.215.14") and is_public_address("2606:2800:21f:cb07:6820:80da:af6b:8b2c")
    for address in ("127.0.0.1", "169.254.169.254", "10.0.0.1", "::1", "::ffff:10.0.0.1", "fe80::1%eth0", "64:ff9b::a00:1"):
        assert not is_public_address(address), address


# --------------------------------------------------------------------------------------- retries


def test_a_first_503_is_retried_once(host):
    host.fail_first.add("/a.jpg")
    assert fetch(host.url("/a.jpg"), **PRIVATE) == JPEG
    assert host.requests["/a.jpg"] == 2 and host.by_status[503] == 1


def test_a_connection_dropped_mid_body_is_retried(host):
    host.drop_first.add("/big.jpg")
    assert fetch(host.url("/big.jpg"), **PRIVATE) == BIG
    assert host.requests["/big.jpg"] == 2


def test_a_404_fails_at_once_with_its_status_and_the_url_masked(host):
    with pytest.raises(ImageError) as err:
        fetch(f"http://user:secret@127.0.0.1:{host.port}/nope.jpg?sig=abc#frag", **PRIVATE)
    assert err.value.message == f"download failed: HTTP 404 for http://***@127.0.0.1:{host.port}/nope.jpg?***"
    assert host.requests["/nope.jpg"] == 1


def test_a_host_still_failing_after_every_attempt(host):
    host.missing.add("/gone.jpg")
    host.images["/gone.jpg"] = JPEG
    host.fail_first.add("/a.jpg")
    with pytest.raises(ImageError, match=r"HTTP 503 for .*/a\.jpg$"):  # one attempt: nothing retried
        fetch(host.url("/a.jpg"), download_attempts=1, **PRIVATE)
    host.latency = 2.0
    started = time.monotonic()
    with pytest.raises(ImageError, match=r"timed out after 0\.3 s for .*/a\.jpg \(2 attempts\)$"):
        fetch(host.url("/a.jpg"), download_attempts=2, download_timeout_s=0.3, **PRIVATE)
    assert host.requests["/a.jpg"] == 3 and time.monotonic() - started < 1.9


def test_retry_after_is_honoured_up_to_the_cap(host, monkeypatch):
    host.fail_first.add("/a.jpg")
    host.retry_after = "1"
    started = time.monotonic()
    assert fetch(host.url("/a.jpg"), **PRIVATE) == JPEG
    assert time.monotonic() - started >= 0.95
    monkeypatch.setattr(downloads_module, "MAX_RETRY_WAIT_S", 0.1)
    host.reset_counters()
    host.retry_after = "3600"
    started = time.monotonic()
    assert fetch(host.url("/a.jpg"), **PRIVATE) == JPEG
    assert time.monotonic() - started < 5


def test_a_refused_connection_is_an_error_row_after_its_attempts():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ImageError, match=r"^download failed: cannot connect: .* \(2 attempts\)$"):
        fetch(f"http://127.0.0.1:{port}/a.jpg", download_attempts=2, **PRIVATE)


# ------------------------------------------------------------------------ opt-outs, what is read


@pytest.mark.parametrize(("tag", "refused"), [("noai", True), ("noimageai", True), ("noindex, NoML", True),
                                              ("capstream: noai", True), ("googlebot: noai", False),
                                              ("noindex", False)])
def test_opt_outs_are_honoured(host, tag, refused):
    host.opt_out["/a.jpg"] = tag
    if refused:
        with pytest.raises(ImageError, match="^opted out: .* X-Robots-Tag .*not sent to the model"):
            fetch(host.url("/a.jpg"), **PRIVATE)
        assert fetch(host.url("/a.jpg"), respect_opt_outs=False, **PRIVATE) == JPEG
    else:
        assert fetch(host.url("/a.jpg"), **PRIVATE) == JPEG


def test_opted_out_reads_every_header_value():
    assert opted_out(["noindex", "otherbot: noai", "noimageai"]) == "noimageai"
    assert opted_out(["otherbot: noai"]) is None and opted_out([]) is None


@pytest.mark.parametrize("value, found", [
    ("noai, googlebot: noindex", "noai"),  # for every agent, then one for another agent
    ("googlebot: noindex, capstream: noai", "noai"),  # one agent's, then ours
    ("capstream: noai, googlebot: noindex", "noai"),
    ("unavailable_after: 25 Jun 2030 15:00:00 PST, noai", "noai"),  # a directive with a value, not an agent
    ("googlebot: noindex, noai", None),  # still googlebot's
    ("otherbot: noml, noimageai", None),
    ("NoAI", "noai"),
])
def test_opted_out_reads_several_directives_and_agents_in_one_value(value, found):
    assert opted_out([value]) == found


def test_the_user_agent_says_who_asks(host):
    fetch(host.url("/a.jpg"), **PRIVATE)
    fetch(host.url("/a.jpg"), user_agent="my-crawler/2 (+https://example.org/bot)", **PRIVATE)
    assert host.user_agents == {f"capstream/{__version__}": 1, "my-crawler/2 (+https://example.org/bot)": 1}


def test_not_an_image_and_too_large(host, monkeypatch):
    host.images["/page"] = b"<html>soft 404</html>"
    host.content_types["/page"] = "text/html; charset=utf-8"
    with pytest.raises(ImageError, match=r"^not an image: .*/page is served as text/html$"):
        fetch(host.url("/page"), **PRIVATE)
    host.content_types["/a.jpg"] = "text/plain"  # a server's wrong type: the bytes decide (prepare_image)
    assert fetch(host.url("/a.jpg"), **PRIVATE) == JPEG
    monkeypatch.setattr(downloads_module, "MAX_BYTES", 10_000)
    with pytest.raises(ImageError, match="^download too large: .* bytes .*/big.jpg"):
        fetch(host.url("/big.jpg"), **PRIVATE)
    assert host.requests["/page"] == host.requests["/big.jpg"] == 1


def test_the_same_url_in_flight_is_downloaded_once(host):
    host.latency = 0.2
    found = asyncio.run(_many([host.url("/a.jpg")] * 5, None, None, PRIVATE))
    assert found == [JPEG] * 5 and host.requests["/a.jpg"] == 1


def test_concurrency_is_bounded_in_all_and_per_host(host):
    host.latency = 0.1
    for i in range(30):
        host.images[f"/{i}.jpg"] = JPEG
    urls = [host.url(f"/{i}.jpg") for i in range(30)]
    asyncio.run(_many(urls, None, None, {"download_concurrency": 8, "download_per_host": 3, **PRIVATE}))
    assert host.max_in_flight == 3
    host.reset_counters()
    asyncio.run(_many(urls, None, None, {"download_concurrency": 4, "download_per_host": 16, **PRIVATE}))
    assert host.max_in_flight == 4


# ------------------------------------------------------------------------------ estimate's reads


def test_head_reads_the_start_and_the_end_only(host):
    small, big = asyncio.run(_many([host.url("/a.jpg"), host.url("/big.jpg")], None, None, PRIVATE, "head"))
    assert small.start == JPEG and small.whole and small.size == len(JPEG)
    assert host.requests["/a.jpg"] == host.ranged["/a.jpg"] == 1
    assert big.start == BIG[:64 * 1024] and big.end == BIG[-4096:] and big.size == len(BIG) and not big.whole
    assert host.requests["/big.jpg"] == host.ranged["/big.jpg"] == 2


def test_head_from_a_server_without_ranges_reads_it_all(host):
    host.ranges = False
    (big,) = asyncio.run(_many([host.url("/big.jpg")], None, None, PRIVATE, "head"))
    assert big.start == BIG and big.whole and host.requests["/big.jpg"] == 1


def test_head_of_a_file_of_unknown_length_reads_it_all(host):
    host.hide_length = True
    (big,) = asyncio.run(_many([host.url("/big.jpg")], None, None, PRIVATE, "head"))
    assert big.start == BIG and big.end == BIG[-4096:] and big.size == len(BIG)
    assert host.requests["/big.jpg"] == 2 and host.ranged["/big.jpg"] == 1


def test_urls_as_messages_show_them():
    assert shown_url("https://u:p@cdn.test:8443/a/b.jpg?X-Amz-Signature=s#f") == "https://***@cdn.test:8443/a/b.jpg?***"
    assert shown_url("http://[::1]/a.jpg") == "http://[::1]/a.jpg"
