"""Checks of the fake OpenAI server through the real openai SDK and ChatOpenAI."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import threading
import time
import urllib.request

import openai
import pytest
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from PIL import Image

from capstream.testing.openai_server import FakeOpenAI, image_tokens, lognormal_latency


def data_url(w: int = 64, h: int = 48, fmt: str = "PNG", truncate: bool = False) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, fmt)
    raw = buf.getvalue()
    if truncate:
        raw = raw[: len(raw) // 2]
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64," + base64.b64encode(raw).decode()


def image_messages(url: str, text: str = "Describe the image.") -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
    ]}]


def ask(server: FakeOpenAI, url: str | None = None, model: str = "fake", timeout: float = 5.0):
    """One request through the async openai SDK (run on a fresh loop)."""
    async def go():
        async with openai.AsyncOpenAI(base_url=server.url, api_key="test", max_retries=0,
                                      timeout=timeout) as client:
            messages = image_messages(url) if url else [{"role": "user", "content": "hi"}]
            return await client.chat.completions.create(model=model, messages=messages)
    return asyncio.run(go())


@pytest.fixture
def server():
    with FakeOpenAI(seed=1) as s:
        yield s


def test_chatopenai_answers_image_size(server):
    llm = ChatOpenAI(model="fake", base_url=server.url, api_key="test", max_retries=0, timeout=5)
    msg = HumanMessage(content=[
        {"type": "text", "text": "Caption this."},
        {"type": "image_url", "image_url": {"url": data_url(640, 480)}},
    ])
    out = llm.invoke([msg])
    assert out.content == "image 640x480"
    usage = out.response_metadata["token_usage"]
    assert usage["completion_tokens"] == 2
    assert usage["prompt_tokens"] == len("Caption this.") // 4 + 4 + image_tokens(640, 480)
    assert server.ok == 1 and server.by_status[200] == 1 and len(server.answered_images) == 1
    # async path, streaming path, and no-image path
    assert asyncio.run(llm.ainvoke([msg])).content == "image 640x480"
    assert "".join(c.content for c in llm.stream([msg])) == "image 640x480"
    assert llm.invoke("hello").content == "no image"
    assert server.image_requests[next(iter(server.answered_images))] == 3


def test_image_tokens_rule():
    assert image_tokens(4096, 8192, "low") == 85
    assert image_tokens(1024, 1024) == 765  # 768x768 -> 4 tiles
    assert image_tokens(2048, 4096) == 1105  # 1024x2048 -> 768x1536 -> 6 tiles
    assert image_tokens(100, 100) == 255


def test_reply_knob_and_bad_image(server):
    seen = []
    server.reply = lambda info: (seen.append(info), f"{info.text}|{info.system}|{info.detail}")[1]
    r = ask(server, data_url(10, 20, "JPEG"))
    assert r.choices[0].message.content == "Describe the image.|None|high"
    assert (seen[0].width, seen[0].height, len(seen[0].image_sha256)) == (10, 20, 64)
    with pytest.raises(openai.BadRequestError) as ei:
        ask(server, data_url(300, 300, "JPEG", truncate=True))
    assert ei.value.code == "invalid_image"
    assert server.by_status[400] == 1


def test_429_retry_after(server):
    server.p429, server.retry_after_ms = 1.0, 1500
    with pytest.raises(openai.RateLimitError) as ei:
        ask(server, data_url())
    headers = ei.value.response.headers
    assert headers["retry-after"] == "1" and headers["retry-after-ms"] == "1500"
    assert ei.value.body["type"] == "rate_limit_error"
    server.p429 = 0.0  # knobs flip mid-run
    assert ask(server, data_url()).choices[0].message.content == "image 64x48"
    assert server.by_status == {429: 1, 200: 1}
    assert [s for _, s in server.log] == [429, 200]


def test_500_drop_status_for_and_api_key(server):
    server.p500 = 1.0
    with pytest.raises(openai.InternalServerError):
        ask(server, data_url())
    server.p500, server.pdrop = 0.0, 1.0
    with pytest.raises(openai.APIConnectionError) as ei:
        ask(server, data_url())
    assert not isinstance(ei.value, openai.APITimeoutError)
    server.pdrop = 0.0
    server.status_for = lambda info: 404 if info.model == "missing" else None
    with pytest.raises(openai.NotFoundError) as ei:
        ask(server, data_url(), model="missing")
    assert ei.value.code == "model_not_found"
    server.status_for, server.api_key = None, "sk-right"
    with pytest.raises(openai.AuthenticationError) as ei:
        ask(server, data_url())
    assert ei.value.code == "invalid_api_key"
    assert server.by_status == {500: 1, "drop": 1, 404: 1, 401: 1}
    assert server.ok == 0 and server.requests == 4


def test_hang_times_out_and_stop_is_prompt():
    server = FakeOpenAI(phang=1.0).start()
    try:
        llm = ChatOpenAI(model="fake", base_url=server.url, api_key="test", max_retries=0,
                         timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            llm.invoke("hello")
        assert time.monotonic() - t0 < 2.0
        # a second hung request, still outstanding when we stop
        t = threading.Thread(target=lambda: pytest.raises(Exception, ask, server, timeout=30))
        t.start()
        while server.by_status["hang"] < 2:
            time.sleep(0.01)
        assert server.in_flight >= 1
    finally:
        t0 = time.monotonic()
        server.stop()
        assert time.monotonic() - t0 < 2.0
    t.join(5)
    assert not t.is_alive()


def test_max_in_flight(server):
    server.latency = 0.2

    async def go():
        async with openai.AsyncOpenAI(base_url=server.url, api_key="test", max_retries=0) as c:
            return await asyncio.gather(*(c.chat.completions.create(
                model="fake", messages=image_messages(data_url(8 + i, 8))) for i in range(5)))

    t0 = time.monotonic()
    results = asyncio.run(go())
    assert time.monotonic() - t0 < 1.0
    assert sorted(r.choices[0].message.content for r in results) == sorted([
        f"image {8 + i}x8" for i in range(5)])
    assert server.max_in_flight == 5 and server.in_flight == 0
    assert len(server.image_requests) == 5
    server.reset_counters()
    assert server.requests == 0 and server.max_in_flight == 0


def test_rpm_limit(server):
    server.rpm_limit = 3
    ok = [ask(server).choices[0].message.content for _ in range(3)]
    assert ok == ["no image"] * 3
    with pytest.raises(openai.RateLimitError) as ei:
        ask(server)
    h = ei.value.response.headers
    assert int(h["retry-after"]) >= 1
    assert h["x-ratelimit-limit-requests"] == "3" and h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-ratelimit-reset-requests"].endswith("s")
    assert server.by_status == {200: 3, 429: 1}


def test_latency_callable_is_seeded():
    import random
    f = lognormal_latency(0.5, 0.5, straggler_p=0.5, straggler_factor=10)
    a = [f(random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2] > 0
    xs = [f(r) for r in [random.Random(3)] for _ in range(200)]
    assert max(xs) > 3 and min(xs) < 1


def test_script_mode_and_stats():
    proc = subprocess.Popen([sys.executable, "-m", "capstream.testing.openai_server", "--port", "0", "--p500", "0",
                             "--latency-lognormal", "0.01", "0.5", "--stragglers", "0.02", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        with urllib.request.urlopen(url + "/models", timeout=5) as r:
            assert json.load(r)["data"][0]["id"]
        client = openai.OpenAI(base_url=url, api_key="test", max_retries=0)
        r = client.chat.completions.create(model="m", messages=image_messages(data_url(5, 7)))
        assert r.choices[0].message.content == "image 5x7"
        with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=5) as r:
            stats = json.load(r)
        assert stats["requests"] == 1 and stats["ok"] == 1 and stats["by_status"] == {"200": 1}
        assert list(stats["image_requests"].values()) == [1]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=5)
    assert json.loads(err.strip().splitlines()[-1])["ok"] == 1
