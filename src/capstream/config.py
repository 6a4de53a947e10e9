"""The run configuration: pydantic models mirroring the YAML file.

Sections: ``dataset``, ``model``, ``prompt``, ``image``, ``limits``, ``retry``, ``run``, ``batch``, ``output``
(``model`` is defined with the chat-model builders, ``model/settings.py``: worker processes rebuild it
alone). Unknown keys are refused. ``${VAR}`` in string values is read from the environment, and
``--set section.key=value`` overrides any key before validation, so the schema types it. A config is
checked once, when it is made (``Config``'s validators); ``setup.py`` then turns it into a run's parts.

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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from .cost.pricing import check_cost_settings
from .errors import ConfigError
from .model.settings import OPENAI_COMPATIBLE, ModelConfig, redact_url
from .row.prompts import compile_prompts
from .row.results import metadata_features


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetConfig(_Section):
    """Where the images come from: a Hugging Face dataset, from the Hub or from local files."""

    path: str | None = Field(default=None, description=(
        "Hub dataset id (`user/name`), local folder, or a builder (`parquet`, `imagefolder`, `csv`, `json`, "
        "`webdataset`, ...) used with `data_files` / `data_dir`. Required, unless the Python API is given a dataset."))
    name: str | None = Field(default=None, description="The dataset's config name.")
    data_dir: str | None = Field(default=None, description="Folder inside the Hub repo or on disk.")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(default=None, description=(
        "A file, a glob, a list of them, or a `{split: files}` mapping."))
    split: str = Field(default="train", description="The split to caption; also the output's split name.")
    revision: str | None = Field(default=None, description="Hub branch, tag or commit to read.")
    streaming: bool = Field(default=False, description=(
        "Read the dataset as it goes, with no full download first; a resumed run skips the finished chunks."))
    image_column: str = Field(default="image", description="The column holding the images.")
    key_column: str | None = Field(default=None, description=(
        "A column with a unique id per row; a resumed run matches answers to rows by it instead of by position."))
    limit: int | None = Field(default=None, ge=0, description="Caption only the first N rows (null: every row).")


class PromptConfig(_Section):
    """One prompt. ``{column}`` in ``text``/``system`` is filled from the row; ``schema`` asks for a
    JSON answer of that shape (a mapping of field to type, or a pydantic model class in Python)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    text: str = Field(default="Describe this image in one detailed paragraph.", description=(
        "The instruction sent with every image; `{column}` is replaced by the row's value of that column."))
    system: str | None = Field(default=None, description=(
        "An optional system message (`{column}` placeholders work here too)."))
    schema_: Any = Field(default=None, alias="schema", description=(  # checked by row.prompts.AnswerSchema.from_spec
        "Ask for a JSON answer of this shape: a mapping of field to type (in Python, also a pydantic model "
        "class); each field becomes a typed column."))
    temperature: float | None = Field(default=None, ge=0, le=2, description=(
        "This prompt's sampling temperature (null: `model.temperature`)."))
    max_tokens: int | None = Field(default=None, ge=1, description=(
        "This prompt's answer length cap (null: `model.max_tokens`)."))

    @field_serializer("schema_")
    def _schema_as_data(self, schema: Any) -> Any:
        if isinstance(schema, type):  # a pydantic model: saved and fingerprinted as its JSON schema
            return {"pydantic_model": schema.__name__, "json_schema": schema.model_json_schema()}
        return schema


class ImageConfig(_Section):
    """How each image is prepared before it is sent."""

    max_side: int = Field(default=1024, ge=16, description=(
        "Longest side sent, in pixels; larger images are shrunk (JPEGs decoded at reduced size)."))
    detail: Literal["low", "high", "auto"] = Field(default="auto", description=(
        "OpenAI's image detail: `low` (85 tokens), `high` or `auto` (85 + 170 per 512 px tile)."))
    quality: int = Field(default=90, ge=1, le=100, description="JPEG quality when an image is re-encoded.")
    # Shrink each image further until it counts at most this many input tokens under the model's
    # image rule (cost/pricing.py); a budget no image can meet is refused by pricing.check_cost_settings.
    max_tokens_per_image: int | None = Field(default=None, ge=1, description=(
        "Input tokens one image may count: each image is sent at the largest size (aspect ratio kept, never "
        "enlarged, never above `max_side`) that counts at most this many under the model's image rule at `detail`. "
        "A budget no image can meet stops with exit 2."))
    # Images named by URL (row/downloads.py): downloaded on the event loop, ahead of the requests.
    download_concurrency: int = Field(default=64, ge=1, description=(
        "Image URLs downloaded at once; their downloads start ahead of the requests, so an image is ready when a "
        "request slot frees."))
    download_per_host: int = Field(default=32, ge=1, description=(
        "Image URLs downloaded at once from one host (connections to it are reused)."))
    download_attempts: int = Field(default=3, ge=1, description=(
        "Attempts per image URL for 408, 429, 5xx, timeouts and dropped connections (jittered backoff, "
        "`Retry-After` honoured up to 10 s); a 404, 403, 410, an HTML page or a body over 50 MiB fails "
        "at once. A URL still failing is an error row (`ImageError`, with the status and the URL)."))
    download_timeout_s: float = Field(default=30.0, gt=0, description="Timeout of one download attempt, in seconds.")
    allow_private_urls: bool = Field(default=False, description=(
        "Fetch image URLs whose host is a loopback, private, link-local (the cloud metadata address included), "
        "multicast, reserved or unspecified address; by default they are refused without connecting (an error "
        "row: `ImageError: refused ...`), on the resolved address and again on every redirect."))
    respect_opt_outs: bool = Field(default=True, description=(
        "Honour `X-Robots-Tag: noai`, `noimageai` and `noml` on an image URL's response: the row becomes an "
        "error saying it opted out and the image is never sent to the model."))
    user_agent: str | None = Field(default=None, description=(
        "The `User-Agent` of image downloads (null: `capstream/<version>`)."))


class LimitsConfig(_Section):
    """How fast requests go out: requests in flight, and the provider's rate limits."""

    max_concurrency: int = Field(default=16, ge=1, description="Requests in flight at most.")
    requests_per_minute: float | None = Field(default=None, gt=0, description=(
        "Requests per minute (null: no configured limit; the limit adapts to what the endpoint announces)."))
    tokens_per_minute: float | None = Field(default=None, gt=0, description=(
        "Tokens per minute, counted as the image's tokens by the model's image rule (the one `capstream estimate` "
        "uses) + the prompt + `max_tokens` (null: no configured limit)."))


class RetryConfig(_Section):
    """How failed requests are tried again."""

    max_attempts: int = Field(default=6, ge=1, description=(
        "Attempts per request for 429, 5xx, timeouts and dropped connections; a request still failing after them "
        "stops the run (exit 1, resumable)."))
    max_wait_s: float = Field(default=60.0, gt=0, description=(
        "Longest wait between attempts, in seconds; `Retry-After` / `retry-after-ms` are honoured up to it."))
    invalid_answer_attempts: int = Field(default=3, ge=1, description=(
        "Requests per prompt while the answer does not match `prompt.schema` (each one is paid)."))


class RunConfig(_Section):
    """How the run is carried out: chunks, processes, the response cache, the budget and the backend."""

    chunk_size: int = Field(default=1000, ge=1, description="Rows per output shard.")
    window_chunks: int = Field(default=8, ge=1, description=(
        "Chunks in memory at once; requests flow across them without waiting for a chunk to finish."))
    prep_threads: int = Field(default=2, ge=1, description="Threads preparing images.")
    workers: int = Field(default=1, ge=1, description=(
        "Processes sending requests: 2 or more adds worker processes that share the request work with the main "
        "process, which keeps the rate limits global (needs the model from `model.*`, not `llm=` in code). "
        "With `backend: ray`: the number of caption actors on the cluster."))
    cache: bool = Field(default=True, description=(
        "Re-use answers any earlier run on this machine bought for the same request (any `output.dir`)."))
    cache_dir: str | None = Field(default=None, description=(
        "Where the response cache lives (null: `$CAPSTREAM_CACHE_DIR`, else `$XDG_CACHE_HOME/capstream`, "
        "else `~/.cache/capstream`)."))
    # Stop (resumable) once the USD spent into output.dir, all runs together, reaches this.
    max_cost_usd: float | None = Field(default=None, gt=0, description=(
        "Stop (exit 1, resumable) once the USD spent into `output.dir`, all runs together, reaches this; "
        "needs a known price (exit 2 otherwise)."))
    backend: Literal["local", "ray", "batch"] = Field(default="local", description=(
        "`local`: this process (and `workers`) does everything. `ray`: Ray Data reads the input and caption "
        "actors on a Ray cluster send the requests under one cluster-wide rate limit "
        "(needs `pip install 'capstream[ray]'`). `batch`: the requests go through the provider's Batch API "
        "(`/v1/files`, `/v1/batches`) at its batch price, answers within `batch.completion_window` (see `batch`)."))
    ray_address: str | None = Field(default=None, description=(
        "With `backend: ray`, the cluster to join (`auto`, `ray://head:10001`, ...); null: the `RAY_ADDRESS` "
        "variable, else a local Ray started for the run and stopped after it."))


class BatchConfig(_Section):
    """``run.backend: batch``: the provider's Batch API (OpenAI's, Azure OpenAI's, any server with the same
    ``/v1/files`` and ``/v1/batches``)."""

    max_requests: int = Field(default=50_000, ge=1, description=(
        "Requests per request file (one batch each); OpenAI takes at most 50,000."))
    max_bytes: int = Field(default=190_000_000, ge=1_000, description=(
        "Bytes per request file; OpenAI takes at most 200 MB. A single request larger than this stops the run "
        "(lower `image.max_side`)."))
    completion_window: str = Field(default="24h", description=(
        "How long the provider may take for a batch (OpenAI accepts only `24h`); lines not done by then expire "
        "and are submitted again (`max_resubmits`)."))
    poll_s: float = Field(default=15.0, gt=0, description=(
        "First wait between two looks at the batches in flight, in seconds; each wait is 1.5 times the last, up "
        "to 20 times this, and starts again from it when a batch changes state."))
    max_resubmits: int = Field(default=2, ge=0, description=(
        "How many later batches a request the server failed (5xx) or did not finish (expired, cancelled) is "
        "submitted in again; after that it is an error row (`--retry-errors` asks again)."))
    submit: bool = Field(default=True, description=(
        "`false`: write the request files (OpenAI batch format, under `.capstream/batch/`) and submit nothing; "
        "put the result files into `.capstream/batch/results/` and run again to read them in."))

    @field_validator("completion_window")
    @classmethod
    def _window(cls, v: str) -> str:
        if not re.fullmatch(r"[1-9]\d*h", v):
            raise ValueError("expected a number of hours such as 24h")
        return v


class OutputConfig(_Section):
    """Where the captioned dataset is written, and where on the Hub it is pushed."""

    dir: str | None = Field(default=None, description=(
        "The output folder (null: `<run.cache_dir>/outputs/<dataset>-<hash of the settings>`, named in the log, "
        "where the same call again resumes)."))
    caption_column: str = Field(default="caption", description="Name of the answer column.")
    error_column: str = Field(default="error", description="Name of the error column.")
    metadata: bool = Field(default=False, description=(
        "Add, per prompt, typed columns saying how its answer was bought: `<prompt>_model`, `_finish_reason`, "
        "`_input_tokens`, `_output_tokens`, `_latency_ms`, `_attempts`, `_answered_at` (UTC); "
        "null where a row has no answer."))
    # The Hub (io/hub.py): where the run's folder is pushed, and how. None: no push.
    push_to_hub: str | None = Field(default=None, description=(
        "A Hub dataset repo (`user/name`) to push the output folder to; created if missing (null: no push)."))
    private: bool = Field(default=True, description=(
        "Create that repo private (an existing repo keeps its visibility)."))
    config_name: str = Field(default="default", description=(
        "The dataset config the shards belong to on the Hub (`default`: under `data/`, else under `<config_name>/`)."))
    split: str | None = Field(default=None, description="The split name on the Hub (null: `dataset.split`).")
    commit_message: str | None = Field(default=None, description=(
        "Message of every commit (null: `capstream: N shard(s) of <split> (R rows)`)."))
    revision: str | None = Field(default=None, description=(
        "Branch to push to, created from `main` if missing (null: `main`)."))
    push_every: int | str | None = Field(default=None, description=(
        "Push while the run goes on, every N finished shards (`10`) or every period (`30s`, `10m`, `1h`); "
        "null: push once, at the end."))
    embed_images: bool = Field(default=False, description=(
        "Write the bytes of the images downloaded from URLs into the shards, so the output loads and displays "
        "without the original hosts: a datasets `Image` column (`embedded_image_column`) beside a column of URL "
        "strings, or the bytes in place in an `Image` column whose paths are URLs. A row whose image is unusable "
        "gets none."))
    embedded_image_column: str = Field(default="image", description=(
        "With `embed_images`, the name of the `Image` column added beside a column of URL strings."))
    hub_timeout_s: float = Field(default=30.0, gt=0, description=(
        "Timeout of every Hub request in seconds (the longest wait for the next byte, not a cap on an upload), "
        "reading the dataset included."))

    @field_validator("push_to_hub")
    @classmethod
    def _repo_id(cls, v: str | None) -> str | None:
        if v is not None and not _REPO_ID.fullmatch(v):
            raise ValueError("expected a Hub dataset id such as user/name")
        return v

    @field_validator("push_every")
    @classmethod
    def _push_every(cls, v: int | str | None) -> int | str | None:
        push_every_seconds(v)  # raises ValueError with the accepted forms
        return v

    @field_validator("error_column")
    @classmethod
    def _distinct(cls, v: str, info: Any) -> str:
        if v == info.data.get("caption_column"):
            raise ValueError("must differ from output.caption_column")
        return v


class Config(_Section):
    """A whole run's configuration: one YAML file, one key per section."""

    dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="The dataset to caption.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The chat model that writes the captions.")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="The one prompt asked of every image.")
    prompts: dict[str, PromptConfig] | None = Field(default=None, description=(
        "Several prompts per image instead of `prompt`: a mapping of output column to a prompt with the keys "
        "of `prompt`."))
    image: ImageConfig = Field(default_factory=ImageConfig, description="How images are prepared before sending.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Concurrency and rate limits.")
    retry: RetryConfig = Field(default_factory=RetryConfig, description="Retries of failed requests.")
    run: RunConfig = Field(default_factory=RunConfig, description="How the run is carried out.")
    batch: BatchConfig = Field(default_factory=BatchConfig, description=(
        "The provider's Batch API, for `run.backend: batch` (half the price, answers within a day)."))
    output: OutputConfig = Field(default_factory=OutputConfig, description="The output folder and the Hub push.")

    # Keys whose change changes the answers or which rows they belong to: a run directory made with
    # other values refuses to resume (io/store.RunStore.check).
    FINGERPRINT_KEYS: ClassVar[tuple[str, ...]] = (
        "dataset.path", "dataset.name", "dataset.data_dir", "dataset.data_files", "dataset.split",
        "dataset.revision", "dataset.image_column", "dataset.key_column", "dataset.limit",
        "model.provider", "model.name", "model.base_url", "model.api_version", "model.temperature",
        "model.max_tokens", "prompt", "prompts", "image.max_side", "image.detail", "image.quality",
        "image.max_tokens_per_image",
        "output.caption_column", "output.error_column", "output.metadata",
    )
    # Keys added to the fingerprint after folders were written without them: left out while they
    # hold these values (the behaviour before the key existed), so those folders still resume.
    FINGERPRINT_DEFAULTS: ClassVar[dict[str, Any]] = {"output.metadata": False}

    @model_validator(mode="after")
    def _one_kind_of_prompt(self) -> "Config":
        if self.prompts is not None:
            if "prompt" in self.model_fields_set:
                raise ValueError("give either 'prompt' (one prompt) or 'prompts' (several), not both")
            if not self.prompts:
                raise ValueError("'prompts' needs at least one entry: output column -> {text: ...}")
        return self

    # The one place a config is checked beyond its types, for every Config however it was made (a
    # file, a dict, or built in code): schemas and output columns, and cost settings that cannot
    # work. ConfigError passes through pydantic as it is; config_from_dict adds the file's name.
    @model_validator(mode="after")
    def _prompts_and_costs_can_work(self) -> "Config":
        prompts = compile_prompts(self.prompt_specs(), self.output.error_column)
        if self.output.metadata:
            metadata_features(prompts)  # no metadata column may be an answer column
        check_cost_settings(self.model, self.image, self.run.max_cost_usd)
        if self.run.backend == "batch" and self.model.provider not in OPENAI_COMPATIBLE:
            raise ConfigError(f"run.backend: batch sends through an OpenAI-compatible Batch API; model.provider "
                              f"{self.model.provider!r} has none (use openai, for any server with /v1/batches, "
                              "or azure)")
        return self

    def prompt_specs(self) -> list[tuple[str, "PromptConfig", str]]:
        """(output name, prompt, where in the config) for each prompt: ``prompts:``, else ``prompt``."""
        if self.prompts:
            return [(name, spec, f"prompts.{name}") for name, spec in self.prompts.items()]
        return [(self.output.caption_column, self.prompt, "prompt")]

    def fingerprint(self) -> dict[str, Any]:
        """The values of ``FINGERPRINT_KEYS`` (base_url without credentials); a key without a dot
        stands for each key of its section (so a refusal can name what changed)."""
        data = self.redacted()
        found: dict[str, Any] = {}
        for key in self.FINGERPRINT_KEYS:
            section, _, name = key.partition(".")
            if name:
                found[key] = data[section][name]
            elif isinstance(data[section], dict):
                found.update({f"{section}.{k}": v for k, v in data[section].items()})
            else:
                found[key] = data[section]
        for key, default in self.FINGERPRINT_DEFAULTS.items():
            if found.get(key) == default:
                del found[key]
        if self.output.embed_images:  # adds a column to the shards; recorded only when on, so older folders resume
            found["output.embed_images"] = self.output.embedded_image_column
        return found

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> "Config":
        """A config read back from ``redacted()``'s dict (``.capstream/config.json``), as it is: no
        ``${VAR}`` is read. The dict holds ``prompt`` (its defaults) beside ``prompts``; only the
        prompts a run asked count."""
        if isinstance(data, dict) and data.get("prompts"):
            data = {k: v for k, v in data.items() if k != "prompt"}
        return cls.model_validate(data)

    def redacted(self) -> dict[str, Any]:
        """The config as a plain dict, safe to save or print.

        No key is stored in the config itself (only the *name* of its variable), but a user may
        have written a secret into a URL; strip credentials from it.
        """
        data = self.model_dump(mode="json", by_alias=True)
        if data["model"].get("base_url"):
            data["model"]["base_url"] = redact_url(data["model"]["base_url"])
        return data


class ResumeChanges:
    """Which changes of the fingerprint a rerun into the same folder may make (the rest is refused):

    - ``dataset.limit`` may grow, or go (null): the rows done are a prefix of the rows to do;
    - with ``--retry-errors``, ``max_tokens`` (``model.`` or a prompt's) may change: only the rows
      with errors are asked again, so a ``TruncatedAnswer`` gets its longer answer.

    ``io/store.RunStore`` records each change it allows in the manifest (the card shows them).

        >>> ResumeChanges(retry_errors=True).allowed("model.max_tokens", 300, 1000)
        True
    """

    def __init__(self, *, retry_errors: bool):
        self.retry_errors = retry_errors

    def allowed(self, key: str, old: Any, new: Any) -> bool:
        if key == "dataset.limit":
            return old is not None and (new is None or new >= old)
        return self.retry_errors and _only_max_tokens_differ(key, old, new)

    def hint(self, key: str, old: Any, new: Any) -> str | None:
        """Why ``key`` may not change so, when a rule says more than "it changed"."""
        if key == "dataset.limit":
            return "dataset.limit may grow (or be removed) to go on with the same folder, never shrink"
        if _only_max_tokens_differ(key, old, new):
            name = f"{key}.max_tokens" if key.startswith("prompts.") else key
            return f"{name} may change with --retry-errors, which asks again only the rows with errors"
        return None


def _only_max_tokens_differ(key: str, old: Any, new: Any) -> bool:
    if key in ("model.max_tokens", "prompt.max_tokens"):
        return True
    if key.startswith("prompts.") and isinstance(old, dict) and isinstance(new, dict):  # a whole prompt's values
        return {k: v for k, v in old.items() if k != "max_tokens"} == {k: v for k, v in new.items() if k != "max_tokens"}
    return False


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h)\s*")


def push_every_seconds(value: int | str | None) -> tuple[int | None, float | None]:
    """``output.push_every`` as (shards, seconds): ``5`` -> (5, None), ``"10m"`` -> (None, 600.0)."""
    if value is None:
        return None, None
    if isinstance(value, bool):
        raise ValueError("expected a number of shards or a time such as 30s, 10m, 1h")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        shards = int(value)
        if shards < 1:
            raise ValueError("a number of shards must be at least 1")
        return shards, None
    match = _DURATION.fullmatch(value)
    if not match or float(match.group(1)) <= 0:
        raise ValueError("expected a number of shards or a time such as 30s, 10m, 1h")
    return None, float(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


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
    except ConfigError as err:  # a check across keys (Config's validators)
        raise ConfigError(f"{source}: {err}") from None


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
