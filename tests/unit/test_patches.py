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
