"""The run configuration: pydantic models mirroring the YAML file.

Sections: ``dataset``, ``model``, ``prompt``, ``image``, ``limits``, ``retry``, ``run``, ``output``.
Unknown keys are refused. ``${VAR}`` in string values is read from the environment, and
``--set section.key=value`` overrides any key before validation, so the schema types it.

    >>> cfg = load_config("configs/demo.yaml", overrides=["limits.max_concurrency=3"])
    >>> cfg.limits.max_concurrency
    3
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetConfig(_Section):
    path: str | None = None
    name: str | None = None
    data_dir: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    split: str = "train"
    revision: str | None = None
    streaming: bool = False
    image_column: str = "image"
    key_column: str | None = None
    limit: int | None = Field(default=None, ge=0)


class ModelConfig(_Section):
    provider: str = "openai"
    name: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key_env: str | None = "OPENAI_API_KEY"
    api_version: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=300, ge=1)
    timeout_s: float = Field(default=60.0, gt=0)
    # USD per million tokens, for `capstream estimate` only (null: prices.py's table); not part of
    # the resume fingerprint, since prices do not change the answers.
    price_input_per_mtok: float | None = Field(default=None, ge=0)
    price_output_per_mtok: float | None = Field(default=None, ge=0)


class PromptConfig(_Section):
    text: str = "Describe this image in one detailed paragraph."
    system: str | None = None


class ImageConfig(_Section):
    max_side: int = Field(default=1024, ge=16)
    detail: Literal["low", "high", "auto"] = "auto"
    quality: int = Field(default=90, ge=1, le=100)


class LimitsConfig(_Section):
    max_concurrency: int = Field(default=16, ge=1)
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)


class RetryConfig(_Section):
    max_attempts: int = Field(default=6, ge=1)
    max_wait_s: float = Field(default=60.0, gt=0)


class RunConfig(_Section):
    chunk_size: int = Field(default=1000, ge=1)
    window_chunks: int = Field(default=8, ge=1)
    prep_threads: int = Field(default=2, ge=1)
    workers: int = Field(default=1, ge=1)
    backend: Literal["local", "ray"] = "local"  # ray: Ray Data reads, caption actors, one global limit
    ray_address: str | None = None  # the Ray cluster to join (null: RAY_ADDRESS, else a local Ray)


class OutputConfig(_Section):
    dir: str | None = None
    caption_column: str = "caption"
    error_column: str = "error"

    @field_validator("error_column")
    @classmethod
    def _distinct(cls, v: str, info: Any) -> str:
        if v == info.data.get("caption_column"):
            raise ValueError("must differ from output.caption_column")
        return v


class Config(_Section):
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    image: ImageConfig = Field(default_factory=ImageConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    # Keys whose change changes the answers or which rows they belong to: a run directory made with
    # other values refuses to resume (store.RunStore.open).
    FINGERPRINT_KEYS: ClassVar[tuple[str, ...]] = (
        "dataset.path", "dataset.name", "dataset.data_dir", "dataset.data_files", "dataset.split",
        "dataset.revision", "dataset.image_column", "dataset.key_column", "dataset.limit",
        "model.provider", "model.name", "model.base_url", "model.api_version", "model.temperature",
        "model.max_tokens", "prompt.text", "prompt.system", "image.max_side", "image.detail", "image.quality",
        "output.caption_column", "output.error_column",
    )

    def fingerprint(self) -> dict[str, Any]:
        """The values of ``FINGERPRINT_KEYS`` (base_url without credentials)."""
        data = self.redacted()
        return {key: data[key.split(".")[0]][key.split(".")[1]] for key in self.FINGERPRINT_KEYS}

    def redacted(self) -> dict[str, Any]:
        """The config as a plain dict, safe to save or print.

        No key is stored in the config itself (only the *name* of its variable), but a user may
        have written a secret into a URL; strip credentials from it.
        """
        data = self.model_dump(mode="json")
        if data["model"].get("base_url"):
            data["model"]["base_url"] = redact_url(data["model"]["base_url"])
        return data


_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def redact_url(url: str) -> str:
    """``https://user:pw@host/x`` -> ``https://***@host/x``."""
    return _URL_CREDENTIALS.sub("***@", url)


def _interpolate(value: Any, where: str, source: str) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a loaded YAML tree."""
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{where}.{k}" if where else str(k), source) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{source}: {where}: environment variable {name} is not set")

    return _ENV_REF.sub(sub, value)


def _apply_override(data: dict, assignment: str, source: str) -> None:
    """``section.key=value``: value parsed as YAML so ``3``, ``true``, ``null`` get their types."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    if _is_text_field(parts) and raw.strip() not in ("null", "~"):
        value = raw  # "prompt.text=Say: hi" stays text; YAML would make it a mapping
    else:
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _is_text_field(parts: list[str]) -> bool:
    """Whether the schema types ``section.key`` as plain text (``str`` or ``str | None``)."""
    model: Any = Config
    for part in parts[:-1]:
        field = model.model_fields.get(part)
        model = field.annotation if field else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return False
    field = model.model_fields.get(parts[-1])
    return field is not None and field.annotation in (str, str | None)


def _describe(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            lines.append(f"{source}: {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def config_from_dict(data: dict | None, *, source: str = "<config>", overrides: list[str] = ()) -> Config:
    """Validate a dict with the YAML's structure (after ``${VAR}`` and ``--set``)."""
    if not isinstance(data or {}, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    data = _interpolate(dict(data or {}), "", source)
    for assignment in overrides:
        _apply_override(data, assignment, source)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def load_config(path: str | os.PathLike, *, overrides: list[str] = ()) -> Config:
    """Read and validate a YAML config file; any problem is a ConfigError naming the file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{source}: cannot read config: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    return config_from_dict(data, source=source, overrides=overrides)


def resolve_config(config: "Config | dict | str | os.PathLike | None") -> Config:
    """Accept what ``caption_dataset(config=...)`` accepts: a Config, a dict, a path, or None."""
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    raise ConfigError(f"config must be a path, a dict or a capstream Config, not {type(config).__name__}")
