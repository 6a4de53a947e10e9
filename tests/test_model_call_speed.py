"""The per-request speed-up in model_call/models: caching langchain-core's content-block types."""

from langchain_core.messages import content as lc_content
from langchain_openai import ChatOpenAI

from capstream.model_call import ModelCall
from capstream.models import build_messages


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
