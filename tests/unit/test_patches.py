"""The per-request speed-ups in sdk_speedups: the same payload and body, less CPU."""

import asyncio
from typing import Annotated

import pytest
from langchain_core.messages import content as lc_content
from langchain_openai import ChatOpenAI
from openai import Omit, omit
from openai._utils import _transform
from openai.types.chat.completion_create_params import (
    CompletionCreateParamsNonStreaming,
)
from typing_extensions import Required, TypedDict

from capstream.model.call import ModelCall
from capstream.model.chat_models import build_messages
from capstream.patches.openai_sdk import send_plain_bodies_untransformed
from capstream.row.prompts import AnswerSchema


def test_model_call_caches_block_types_without_changing_the_payload(monkeypatch):
    # Start from langchain-core's own, uncached function (another test may have cached it already).
    original = lc_content._get_data_content_block_types
    uncached = getattr(original, "__wrapped__", original)
    monkeypatch.setattr(lc_content, "_get_data_content_block_types", uncached)
    llm = ChatOpenAI(model="m", api_key="k", base_url="http://127.0.0.1:9/v1", max_retries=0)
    messages = build_messages("Describe.", "Be brief.", "data:image/jpeg;base64,AAAA", "low")
    before = llm._get_request_payload(messages)
    blocks = [{"type": "image", "url": "https://x/y.png"}, {"type": "text", "text": "t"},
              {"type": "image_url", "image_url": {"url": "u"}}, {"type": "file", "base64": "AA", "mime_type": "a/b"}]
    checks_before = [lc_content.is_data_content_block(b) for b in blocks]

    ModelCall(llm)
    cached = lc_content._get_data_content_block_types
    assert hasattr(cached, "cache_info") and cached.__wrapped__ is uncached
    ModelCall(llm)  # idempotent: not wrapped twice
    assert lc_content._get_data_content_block_types is cached

    assert llm._get_request_payload(messages) == before
    assert [lc_content.is_data_content_block(b) for b in blocks] == checks_before
    assert cached() == uncached()


@pytest.fixture
def sdk_transform(monkeypatch):
    """The SDK's own transform functions, and the module patched with capstream's shortcut."""
    own = (getattr(_transform.transform, "__wrapped__", _transform.transform),
           getattr(_transform.async_transform, "__wrapped__", _transform.async_transform))
    monkeypatch.setattr(_transform, "transform", own[0])
    monkeypatch.setattr(_transform, "async_transform", own[1])
    send_plain_bodies_untransformed()
    send_plain_bodies_untransformed()  # idempotent
    assert _transform.async_transform.__wrapped__ is own[1]
    return own


def chat_bodies():
    """Chat-completions bodies as ChatOpenAI hands them to the SDK: text and schema prompts."""
    llm = ChatOpenAI(model="m", api_key="k", base_url="http://127.0.0.1:9/v1", max_retries=0,
                     temperature=0.2, max_tokens=50)
    schema = AnswerSchema.from_spec({"caption": "string", "tags": "list[string]", "n": "integer?"}, "prompt.schema")
    messages = build_messages("Describe {x}.", "Be brief.", "data:image/jpeg;base64,AAAA", "high")
    payloads = [llm._get_request_payload(messages),
                llm._get_request_payload(messages, response_format=schema.response_format(), seed=3)]
    # The SDK's create() passes every parameter, with `omit` for those not given.
    return [{"frequency_penalty": omit, "metadata": omit, **payload} for payload in payloads]


def test_plain_chat_bodies_skip_the_walk_with_the_same_result(sdk_transform):
    sync_own, async_own = sdk_transform
    for body in chat_bodies():
        expected = sync_own(body, CompletionCreateParamsNonStreaming)
        assert asyncio.run(async_own(body, CompletionCreateParamsNonStreaming)) == expected
        assert _transform.transform(body, CompletionCreateParamsNonStreaming) == expected
        assert asyncio.run(_transform.async_transform(body, CompletionCreateParamsNonStreaming)) == expected
        assert not any(isinstance(value, Omit) for value in expected.values())


class Aliased(TypedDict, total=False):
    card_id: Required[Annotated[str, _transform.PropertyInfo(alias="cardID")]]
    note: str


def test_other_bodies_still_go_through_the_sdk(sdk_transform):
    # A declaration with an alias is renamed, as the SDK does.
    assert asyncio.run(_transform.async_transform({"card_id": "c", "note": omit}, Aliased)) == {"cardID": "c"}
    assert _transform.transform({"card_id": "c"}, Aliased) == {"cardID": "c"}
    # A value that is not plain JSON (an iterator, a nested omitted value) is left to the SDK.
    body = {"model": "m", "messages": iter([{"role": "user", "content": "hi", "name": omit}])}
    assert asyncio.run(_transform.async_transform(body, CompletionCreateParamsNonStreaming)) == {
        "model": "m", "messages": [{"role": "user", "content": "hi"}]}


# --- every patch: tested against the installed version, and changing no result --------------------

@pytest.mark.parametrize("patch", ["langchain_core", "openai_sdk", "datasets_parquet", "hf_hub_clients", "aiolimiter"])
def test_each_patch_was_tested_with_the_installed_library(patch):
    """Outside its tested versions a patch does nothing (the library's own behaviour stays); an
    upgrade past the range must be noticed here, checked again, and the range widened."""
    import importlib

    from capstream.patches import tested

    module = importlib.import_module(f"capstream.patches.{patch}")
    assert tested(*module.TESTED), f"{module.TESTED[0]} is outside {module.TESTED[1:]}: check {patch}.py again"


def test_a_retuned_limiter_admits_what_a_new_limiter_would():
    """patches/aiolimiter.retune changes the rate in place: from then on the limiter admits at the
    same times as a new AsyncLimiter at that rate holding the same level, waiters included."""
    from aiolimiter import AsyncLimiter
    from test_limits_and_retry import run_virtual

    from capstream.patches.aiolimiter import retune

    def admissions(limiter_at_new_rate):
        async def main(loop):
            limiter = limiter_at_new_rate()
            times = []

            async def take():
                await limiter.acquire()
                times.append(round(loop.time(), 6))

            waiting = [asyncio.ensure_future(take()) for _ in range(30)]
            await asyncio.gather(*waiting)
            return times

        return run_virtual(main)[0]

    def retuned():
        limiter = AsyncLimiter(5, 1)
        for _ in range(5):
            limiter._level += 1  # full at the old rate
        assert retune(limiter, 20, 1)
        return limiter

    def fresh():
        limiter = AsyncLimiter(20, 1)
        limiter._level = 5.0
        return limiter

    # Equal up to the virtual clock's tick (it moves a microsecond per loop iteration).
    assert admissions(retuned) == pytest.approx(admissions(fresh), abs=1e-5)
    assert admissions(retuned)[-1] == pytest.approx((30 - 15) / 20, abs=1e-3)  # 15 fit at once, then 20/s


def test_streamed_parquet_gets_the_row_group_reader(tmp_path):
    """patches/datasets_parquet applies to datasets' parquet builder (its rows are compared with
    datasets' own reader in test_source_streaming.py)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from capstream.patches.datasets_parquet import read_row_groups_one_at_a_time

    pq.write_table(pa.table({"id": [1, 2, 3]}), tmp_path / "a.parquet", row_group_size=1)
    builder = datasets.load_dataset_builder("parquet", data_files=str(tmp_path / "a.parquet"))
    own = builder._generate_tables
    assert read_row_groups_one_at_a_time(builder)
    assert builder._generate_tables is not own
    assert [r["id"] for r in builder.as_streaming_dataset(split="train")] == [1, 2, 3]
