"""The config's ``model`` section: which chat model, where, and how to reach it.

It is defined here, with the code that builds chat models from it, rather than in ``config.py``:
worker processes (``processes.py``) rebuild it from JSON and must not import the rest of the
config. ``config.Config`` uses it as its ``model`` section.

    >>> model = ModelConfig(name="Qwen/Qwen2.5-VL-7B-Instruct", base_url="http://localhost:8000/v1", api_key_env=None)
    >>> model.endpoint_label()
    'openai at localhost:8000'
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import ConfigError

OPENAI_COMPATIBLE = {"openai", "azure"}

_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def redact_url(url: str) -> str:
    """``https://user:pw@host/x`` -> ``https://***@host/x``."""
    return _URL_CREDENTIALS.sub("***@", url)


class ModelConfig(BaseModel):
    """The chat model every image is sent to."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    provider: str = Field(default="openai", description=(
        "`openai` (also every OpenAI-compatible server, with `base_url`), `azure`, `mock` (offline demo: "
        "describes size and colours, says it is not a model), or any provider LangChain's `init_chat_model` "
        "knows (`anthropic`, `google_genai`, ...; needs `langchain` and that provider's package)."))
    name: str = Field(default="gpt-4o-mini", description="Model name (Azure: the deployment name).")
    base_url: str | None = Field(default=None, description=(
        "The server's OpenAI-compatible URL, e.g. `http://localhost:8000/v1` (Azure: the resource endpoint)."))
    api_key_env: str | None = Field(default="OPENAI_API_KEY", description=(
        "Name of the environment variable holding the key (the key itself is never in the config); "
        "`null` for a server that needs none."))
    api_version: str | None = Field(default=None, description="Azure API version (required for `azure`).")
    temperature: float | None = Field(default=None, ge=0, le=2, description=(
        "Sampling temperature (null: the server's default)."))
    max_tokens: int | None = Field(default=300, ge=1, description="Answer length cap.")
    timeout_s: float = Field(default=60.0, gt=0, description=(
        "Per-request timeout in seconds; a hung request fails after it and is retried."))
    # Not part of the resume fingerprint: prices do not change the answers.
    price_input_per_mtok: float | None = Field(default=None, ge=0, description=(
        "USD per million input tokens, for `capstream estimate`, the live cost and `run.max_cost_usd` "
        "(null: the price table); not part of the resume fingerprint."))
    price_output_per_mtok: float | None = Field(default=None, ge=0, description=(
        "USD per million output tokens, likewise (null: the price table)."))

    # Checks across fields raise ConfigError, which pydantic lets through as it is (config.py adds the file).
    @model_validator(mode="after")
    def _azure_needs_its_endpoint(self) -> "ModelConfig":
        if self.provider == "azure" and not self.base_url:
            raise ConfigError("model.base_url: required for provider azure (https://<resource>.openai.azure.com)")
        if self.provider == "azure" and not self.api_version:
            raise ConfigError("model.api_version: required for provider azure (for example 2024-10-21)")
        return self

    def api_key(self) -> str | None:
        """The API key from ``api_key_env``; ConfigError naming the variable when it is unset.

        ``api_key_env: null`` means the endpoint needs no key (a local vLLM or Ollama server).
        """
        if self.provider == "mock" or not self.api_key_env:
            return None
        value = os.environ.get(self.api_key_env, "").strip()
        if not value:
            if self.provider in OPENAI_COMPATIBLE:
                raise ConfigError(
                    f"model.api_key_env: environment variable {self.api_key_env} is not set "
                    f"(set it to the API key, or set model.api_key_env: null for an endpoint that needs none)")
            return None  # other providers' packages read their own variables
        return value

    def endpoint_label(self) -> str:
        """Provider and host, without credentials or path, for messages and the dataset card."""
        if not self.base_url:
            return self.provider
        parts = urlsplit(self.base_url)
        return f"{self.provider} at {parts.hostname or '?'}{f':{parts.port}' if parts.port else ''}"

    def endpoint_url(self) -> str | None:
        """The URL requests go to (credentials masked): ``base_url``, or OpenAI's own API."""
        if self.base_url:
            return redact_url(self.base_url)
        return "https://api.openai.com/v1" if self.provider == "openai" else None

    def identity(self) -> dict[str, object]:
        """What decides this model's answers, for the response cache's keys (no secret in it)."""
        return {"provider": self.provider, "model": self.name,
                "endpoint": redact_url(self.base_url) if self.base_url else None,
                "api_version": self.api_version, "temperature": self.temperature, "max_tokens": self.max_tokens}


__all__ = ["ModelConfig", "OPENAI_COMPATIBLE", "redact_url"]
