#!/usr/bin/env python
"""Client CPU per request through capstream's ModelCall (LangChain's ChatOpenAI and the OpenAI SDK)
against the fake OpenAI server with no latency, 64 requests in flight: the per-request cost that
limits a run against a fast local endpoint.

    python scripts/request_cpu.py                    # with capstream's patches (as a run)
    python scripts/request_cpu.py --sdk-transform    # with the SDK's own request-body transform
"""

import argparse
import asyncio
import base64
import time

from bench import (  # the sibling script's server and JPEGs (python puts scripts/ on sys.path)
    Server,
    _base_jpeg,
    _unique_jpeg,
)

from capstream.model.call import ImageRequest, ModelCall
from capstream.model.chat_models import async_http_client, build_chat_model
from capstream.model.settings import ModelConfig


async def measure(url: str, requests: int, sdk_transform: bool) -> float:
    http = async_http_client(60)
    call = ModelCall(build_chat_model(ModelConfig(provider="openai", name="fake-vlm", base_url=url, api_key_env=None),
                                      http), owns=http)
    if sdk_transform:  # undo patches/openai_sdk.send_plain_bodies_untransformed
        from openai._utils import _transform

        _transform.transform = _transform.transform.__wrapped__
        _transform.async_transform = _transform.async_transform.__wrapped__
    base = _base_jpeg()
    urls = ["data:image/jpeg;base64," + base64.b64encode(_unique_jpeg(base, i)).decode() for i in range(requests)]
    slots = asyncio.Semaphore(64)

    async def one(data_url: str) -> None:
        async with slots:
            await call(ImageRequest("Caption this image.", None, data_url, "auto"))

    await asyncio.gather(*(one(u) for u in urls[:200]))  # warm up: connections, caches
    started = time.process_time()
    await asyncio.gather(*(one(u) for u in urls))
    cpu = time.process_time() - started
    await call.aclose()
    return cpu / requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--sdk-transform", action="store_true", help="use the SDK's own request-body transform")
    args = ap.parse_args()
    server = Server(["--latency", "0"])
    try:
        per_request = asyncio.run(measure(server.url, args.requests, args.sdk_transform))
    finally:
        server.stop()
    which = "the SDK's own transform" if args.sdk_transform else "capstream's patches"
    print(f"{per_request * 1000:.2f} ms of client CPU per request ({args.requests} requests, {which})")


if __name__ == "__main__":
    main()
