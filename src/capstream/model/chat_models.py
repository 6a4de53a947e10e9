"""Building the LangChain chat model for a provider, the messages sent to it, and the mock provider.

``openai`` -> ``ChatOpenAI`` (``base_url`` reaches vLLM, Ollama, LM Studio, TGI, OpenRouter);
``azure`` -> ``AzureChatOpenAI``; ``mock`` -> ``MockVisionModel`` (offline, no model at all); any
other name -> ``langchain.chat_models.init_chat_model`` when that provider's package is installed.

The SDK's own retries are off (``max_retries=0``: tenacity in ``retry.py`` is the only retry loop)
and a timeout is always set. Build the model inside the event loop that will use it: an OpenAI
client binds its connection pool to the loop it first runs on.
"""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from ..errors import ConfigError
from .settings import OPENAI_COMPATIBLE, ModelConfig


def async_http_client(timeout_s: float) -> Any:
    """An HTTP client for the OpenAI SDK, to be owned (and closed) by the caller's event loop.

    The aiohttp transport when the SDK has it: httpx's connection pool scans every pooled
    connection on each request and response, which at 64 requests in flight cost more CPU than
    everything else together (the zero-latency scenario of scripts/bench.py went from 45 to 158
    rows/s with this change).
    """
    import openai

    aiohttp_client = getattr(openai, "DefaultAioHttpClient", None)
    if aiohttp_client is not None:
        try:
            return aiohttp_client(timeout=timeout_s)
        except (ImportError, RuntimeError):  # openai's aiohttp extra is not installed
            pass
    return openai.DefaultAsyncHttpxClient(timeout=timeout_s)


def build_chat_model(cfg: ModelConfig, http_async_client: Any = None) -> BaseChatModel:
    """The chat model for ``cfg``; call inside the event loop that will use it.

    For OpenAI-compatible providers, pass ``http_async_client`` (see ``async_http_client``) and
    close it when the loop's work is done; without one, the SDK's process-wide client is used.
    """
    key = cfg.api_key()
    if cfg.provider == "mock":
        return MockVisionModel()
    common: dict[str, Any] = {"max_retries": 0, "timeout": cfg.timeout_s}
    if cfg.temperature is not None:
        common["temperature"] = cfg.temperature
    if cfg.max_tokens is not None:
        common["max_tokens"] = cfg.max_tokens
    if cfg.provider in OPENAI_COMPATIBLE:
        if http_async_client is not None:
            common["http_async_client"] = http_async_client
        common["api_key"] = key or "not-needed"
        common["include_response_headers"] = True  # x-ratelimit-* for the adaptive limiter
    if cfg.provider == "openai":
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(model=cfg.name, base_url=cfg.base_url, **common)
    if cfg.provider == "azure":
        from langchain_openai import AzureChatOpenAI

        return AzureChatOpenAI(
            azure_deployment=cfg.name, azure_endpoint=cfg.base_url, api_version=cfg.api_version, **common
        )
    try:
        from langchain.chat_models import init_chat_model
    except ImportError:
        raise ConfigError(
            f"model.provider: {cfg.provider!r} needs the 'langchain' package and that provider's "
            f"integration package (pip install langchain langchain-{cfg.provider})"
        ) from None
    if key:
        common["api_key"] = key
    if cfg.base_url:
        common["base_url"] = cfg.base_url
    try:
        return init_chat_model(cfg.name, model_provider=cfg.provider, **common)
    except (ImportError, ValueError) as err:
        raise ConfigError(f"model.provider: cannot build {cfg.provider!r} model {cfg.name!r}: {err}") from None


def shares_default_http_client(llm: BaseChatModel) -> bool:
    """Whether a chat model given in code sends through langchain-openai's process-wide client.

    langchain-openai caches that client, and its connections belong to the event loop that first
    used it: a second run in the same process (a notebook running a cell again) would fail every
    request with "Event loop is closed". Such a model gets a client per run (``with_http_client``);
    a model given its own ``http_async_client`` keeps it.
    """
    root = getattr(llm, "root_async_client", None)
    return root is not None and hasattr(root, "with_options") and getattr(llm, "http_async_client", None) is None


def with_http_client(llm: BaseChatModel, http_async_client: Any) -> BaseChatModel:
    """A copy of an OpenAI-family chat model that sends through ``http_async_client``, every other
    setting of its SDK client kept (``with_options``)."""
    root = llm.root_async_client.with_options(http_client=http_async_client)
    return llm.model_copy(update={"root_async_client": root, "async_client": root.chat.completions})


def build_messages(text: str, system: str | None, data_url: str, detail: str) -> list[BaseMessage]:
    """The chat messages for one image: optional system message, then text + image."""
    messages: list[BaseMessage] = [SystemMessage(content=system)] if system else []
    messages.append(
        HumanMessage(
            content=[
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": data_url, "detail": detail}},
            ]
        )
    )
    return messages


# -- the Batch API: the body a request would have, and the answer read from a body --------------
#
# langchain-openai has no public name for either step (its own batch support, proposed upstream,
# calls the same two methods), so they are called here and nowhere else; the tests compare a batch
# line's body with what the same row sends over HTTP, and a batch answer with the online one.


def can_build_bodies(llm: BaseChatModel) -> bool:
    """Whether ``llm`` (an OpenAI-family chat model) can build request bodies and read answers."""
    return hasattr(llm, "_get_request_payload") and hasattr(llm, "_create_chat_result")


def request_body(llm: BaseChatModel, messages: list[BaseMessage], options: dict[str, Any]) -> dict[str, Any]:
    """The JSON body ``llm.ainvoke(messages, **options)`` sends to ``/chat/completions``."""
    return llm._get_request_payload(messages, **options)


def response_message(llm: BaseChatModel, body: dict[str, Any]) -> BaseMessage:
    """The message ``llm.ainvoke`` returns for the chat completion ``body``: the chat model's own
    reading, with the response metadata LangChain's ``ainvoke`` adds (the generation's info over
    the model's output: ``finish_reason``, ``model_name``)."""
    result = llm._create_chat_result(body)
    generation = result.generations[0]
    metadata = {**(result.llm_output or {}), **(generation.generation_info or {}),
                **generation.message.response_metadata}
    return generation.message.model_copy(update={"response_metadata": metadata})


def answer_text(message: BaseMessage) -> str:
    """The text of a model's answer, whether its content is a string or a list of parts."""
    content = message.content
    if isinstance(content, str):
        return content.strip()
    parts = [p.get("text", "") if isinstance(p, dict) else str(p) for p in content]
    return "".join(parts).strip()


# --- the mock provider ---------------------------------------------------------------------------

_COLOUR_NAMES = {
    "black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128), "red": (220, 40, 40),
    "orange": (240, 140, 30), "yellow": (240, 220, 40), "green": (50, 170, 60), "blue": (40, 80, 220),
    "purple": (130, 60, 170), "pink": (240, 150, 190), "brown": (120, 80, 40), "teal": (30, 150, 150),
}


def _nearest_colour(rgb: tuple[int, int, int]) -> str:
    return min(_COLOUR_NAMES, key=lambda n: sum((a - b) ** 2 for a, b in zip(rgb, _COLOUR_NAMES[n])))


def describe_image_offline(data: bytes) -> str:
    """A plain description of an image's size and main colours, made without any model."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        small = img.convert("RGB")
        small.thumbnail((32, 32))
        counts = Counter(_nearest_colour(px) for px in small.getdata())
    main = [name for name, _ in counts.most_common(2)]
    colours = main[0] if len(main) == 1 else f"{main[0]} and {main[1]}"
    return f"A {width}x{height} image, mostly {colours}. (mock caption: no model was called)"


def _image_bytes(messages: list[BaseMessage]) -> bytes | None:
    for message in messages:
        if isinstance(message.content, list):
            for part in message.content:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
                    return base64.b64decode(url.split(",", 1)[1])
    return None


def _mock_value(spec: dict, text: str) -> Any:
    """A value of the JSON-schema type ``spec`` for the mock's structured answers."""
    spec = spec["anyOf"][0] if "anyOf" in spec else spec
    if spec.get("enum"):
        return spec["enum"][0]
    kind = spec.get("type")
    if kind == "array":
        return [_mock_value(spec["items"], text)]
    return {"string": text, "integer": 0, "number": 0.0, "boolean": False}.get(kind, text)


class MockVisionModel(BaseChatModel):
    """An offline stand-in for demos and dry runs: describes size and colours; it is not a model."""

    @property
    def _llm_type(self) -> str:
        return "capstream-mock"

    def _generate(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> ChatResult:
        data = _image_bytes(messages)
        text = describe_image_offline(data) if data else "No image was given. (mock caption: no model was called)"
        if isinstance(kwargs.get("response_format"), dict):  # a prompt with a schema: fill it in
            schema = kwargs["response_format"]["json_schema"]["schema"]
            text = json.dumps({name: _mock_value(spec, text) for name, spec in schema["properties"].items()})
        message = AIMessage(
            content=text,
            usage_metadata={"input_tokens": 0, "output_tokens": len(text.split()), "total_tokens": len(text.split())},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> ChatResult:
        return self._generate(messages, stop=stop, **kwargs)
