"""One attempt at one request: the boundary where the provider's answers and errors are translated.

``ModelCall(llm)`` sends an ``ImageRequest`` once and returns an ``Answer``, or raises
``RequestFailed``, a small picklable error that says what the failure means (``Failure``), the HTTP
status, and how long the server asked us to wait. Everything above this module (retry policy,
rate limits, error rows, worker processes) reads only these, never SDK exception types.

    >>> call = ModelCall(build_chat_model(cfg.model, http_client), owns=http_client)
    >>> answer = await call(ImageRequest("Caption this.", None, image.data_url(), "low"))
    >>> await call.aclose()   # closes the HTTP client it owns
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from langchain_core.language_models import BaseChatModel

from ..errors import Failure, RequestFailed
from ..patches.langchain_core import cache_content_block_types
from ..patches.openai_sdk import send_plain_bodies_untransformed
from .chat_models import answer_text, build_messages
from .retry import classify, retry_after_s, status_of

# Response headers the rate limiter learns from (lower-case).
RATE_LIMIT_HEADERS = (
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
)


@dataclass(frozen=True)
class ImageRequest:
    text: str
    system: str | None
    data_url: str
    detail: str
    options: dict[str, Any] = field(default_factory=dict)  # per-request model parameters (response_format, ...)


@dataclass(frozen=True)
class Answer:
    """One attempt's answer, and what the server said of it (``finish_reason``: "stop", "length",
    "content_filter"...; ``model``: the model that answered). ``Sender`` adds how long the attempt
    took and how many attempts the request needed."""

    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    finish_reason: str | None = None
    model: str | None = None
    latency_ms: int | None = None
    attempts: int = 1


def _rate_headers(headers: Any) -> dict[str, str]:
    if not headers:
        return {}
    return {name: str(headers[name]) for name in RATE_LIMIT_HEADERS if headers.get(name) is not None}


def translate(exc: BaseException) -> RequestFailed:
    """Any exception a chat model raised -> RequestFailed (done once, here)."""
    body = getattr(exc, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = body["error"].get("message") or message
    status = status_of(exc)
    failure = classify(exc)
    text = message or str(exc) or type(exc).__name__
    if failure is Failure.REFUSED:
        text = "connection refused"  # the SDK may call it "Request timed out."
    elif status is None and failure is not Failure.TRANSIENT:
        text = f"{type(exc).__name__}: {text}"
    headers = getattr(getattr(exc, "response", None), "headers", None)
    return RequestFailed(failure, text, status, retry_after_s(exc), _rate_headers(headers))


def answer_of(message: Any) -> Answer:
    """A chat model's answer message as an ``Answer`` (an online reply, or a batch's line read by
    ``chat_models.response_message``)."""
    usage = getattr(message, "usage_metadata", None) or {}
    metadata = getattr(message, "response_metadata", None) or {}
    return Answer(answer_text(message), int(usage.get("input_tokens") or 0),
                  int(usage.get("output_tokens") or 0), _rate_headers(metadata.get("headers")),
                  metadata.get("finish_reason"), metadata.get("model_name") or metadata.get("model"))


class ModelCall:
    """Send one request through a LangChain chat model, in this process. ``owns``: an HTTP client
    made for this call (and this event loop), closed by ``aclose``."""

    def __init__(self, llm: BaseChatModel, owns: Any = None):
        self.llm = llm
        self._http = owns
        cache_content_block_types()  # less CPU per request, the same bytes sent (capstream/patches)
        send_plain_bodies_untransformed()

    async def __call__(self, request: ImageRequest) -> Answer:
        messages = build_messages(request.text, request.system, request.data_url, request.detail)
        try:
            message = await self.llm.ainvoke(messages, **request.options)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise translate(exc) from None
        return answer_of(message)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
