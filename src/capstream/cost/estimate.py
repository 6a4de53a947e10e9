"""What a run will cost, estimated before it starts: rows, requests, tokens, USD. Sends no request.

Every image is read up to its header only (its pixel size, no decode), shrunk as ``prepare_image``
would (``image.max_side``, ``image.max_tokens_per_image``) and counted by the model's image rule
(``pricing.py``; OpenAI's tile rule for models it does not list). The prompt is counted with tiktoken when it is installed and knows the
model, else as ``ceil(characters / 4) + 4`` per message (``CAPSTREAM_NO_TIKTOKEN=1`` forces that:
tiktoken downloads its encoding files on first use). Output tokens are ``model.max_tokens`` per
request, an upper bound.

    $ capstream estimate configs/openai.yaml --sample 500 --json

    >>> from capstream.config import load_config
    >>> est = estimate(load_config("configs/openai.yaml"), sample=500)
    >>> est.requests, est.input_tokens, est.cost_usd
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from math import ceil
from typing import Any, Callable, Iterator

from PIL import Image

from ..config import Config
from ..errors import ConfigError, RunStopped
from ..io.source import Source, open_source
from ..row.images import load_image_bytes, looks_complete
from ..row.prompts import compile_prompts
from .meter import usd
from .pricing import cost_usd, image_rule, prices, sent_size

_MAX_PIXELS = 128_000_000  # prepare_image's default: larger images are error rows in a run
_BATCH = 256
APPROXIMATION = "approximation: ceil(characters / 4) + 4 per message"


@dataclass
class Estimate:
    """The figures ``capstream estimate`` prints; ``as_dict()`` is its ``--json`` object."""

    rows: int
    rows_exact: bool  # False: a stream with no row count in its metadata, read only up to --sample
    rows_source: str  # "counted" (every row read), "metadata" (scaled from --sample), "sample"
    rows_read: int
    requests: int
    unusable_images: int
    image_tokens: int
    prompt_tokens_per_request: int
    prompt_token_method: str
    image_token_rule: str
    input_tokens: int
    max_tokens: int | None
    output_tokens: int | None  # upper bound: max_tokens per request; None when max_tokens is null
    model: str
    price_input_per_mtok: float | None
    price_output_per_mtok: float | None
    price_source: str  # "config", "table:<date>", "config+table:<date>", "mock" (free), "unknown"
    cost_usd: float | None
    priced_for_batch: bool = False  # run.backend: batch: the Batch API's prices

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """Human-readable lines."""
        lines = [f"model             {self.model}", f"rows              {self._rows_text()}",
                 f"requests          {self.requests:,} ({self.unusable_images:,} rows with unusable images: no request)",
                 f"input tokens      {self.input_tokens:,} (images {self.image_tokens:,}: {self.image_token_rule}; "
                 f"prompt {self.prompt_tokens_per_request:,} per request: {self.prompt_token_method})"]
        if self.output_tokens is None:
            lines.append("output tokens     unknown (model.max_tokens is null: no cap)")
        else:
            lines.append(f"output tokens     at most {self.output_tokens:,} (model.max_tokens {self.max_tokens:,} per request)")
        if self.price_input_per_mtok is None or self.price_output_per_mtok is None:
            lines.append(f"price             unknown for {self.model!r}: set model.price_input_per_mtok and "
                         "model.price_output_per_mtok (USD per million tokens)")
        else:
            lines.append(f"price             ${self.price_input_per_mtok:g} input, ${self.price_output_per_mtok:g} output "
                         f"per million tokens ({self._price_text()})")
        if self.cost_usd is None:
            lines.append("cost              unknown")
        else:
            lines.append(f"cost              at most ${usd(self.cost_usd)} (output counted at its cap)")
        return "\n".join(lines)

    def _price_text(self) -> str:
        mode = "; priced for run.backend batch" if self.priced_for_batch else ""
        if self.price_source.startswith(("table", "config+table")):
            kind = "Batch API price" if self.priced_for_batch else "list price"
            return (f"OpenAI's {kind} of {self.price_source.rsplit(':', 1)[1]}; override with "
                    f"model.price_input_per_mtok / model.price_output_per_mtok{mode}")
        source = {"config": "from the config", "mock": "the mock provider is free"}.get(self.price_source,
                                                                                        self.price_source)
        return source + mode

    def _rows_text(self) -> str:
        if not self.rows_exact:
            return (f"at least {self.rows:,} (a stream with no row count in its metadata; only the first "
                    f"{self.rows_read:,} were read, and the figures below cover those rows only)")
        if self.rows_source == "metadata":
            return f"{self.rows:,} (from the metadata; figures scaled from the first {self.rows_read:,} rows)"
        return f"{self.rows:,} (every image header read)"


def estimate(config: Config, *, sample: int | None = None, data: Any = None) -> Estimate:
    """Estimate the run ``config`` describes (``data``: a Dataset / IterableDataset given in code).

    ``sample``: read only the first ``sample`` rows and scale to the row count in the metadata.
    ConfigError for a bad config; RunStopped when the dataset cannot be read.
    """
    if sample is not None and sample < 1:
        raise ConfigError(f"--sample: must be at least 1, got {sample}")
    source = _open(config, data)
    rule = image_rule(config.model.name)
    to_send = sent_size(config.image, config.model.name)
    rows_read = usable = image_tokens = 0
    for value in _image_values(source, sample, _named(config)):
        rows_read += 1
        size = image_size(value, to_send, source.base_dir)
        if size is not None:
            usable += 1
            image_tokens += rule.tokens(*size, config.image.detail)

    rows, rows_exact, rows_source = rows_read, True, "counted"
    if sample is not None and rows_read == sample:  # stopped early: the end was not reached
        known = known_row_count(source, config)
        if known is None or known < rows_read:  # no count, or one the data contradicts
            rows_exact, rows_source = False, "sample"
        elif known > rows_read:
            rows, rows_source = known, "metadata"
            usable = round(usable * known / rows_read)
            image_tokens = round(image_tokens * known / rows_read)

    # One request per usable image and prompt (prompts: several); each sends the image again.
    prompts = compile_prompts(config.prompt_specs(), config.output.error_column)
    requests = usable * len(prompts)
    image_tokens *= len(prompts)
    counted = [prompt_tokens(p.text, p.system, config.model.name) for p in prompts]
    per_request, method = round(sum(n for n, _ in counted) / len(prompts)), counted[0][1]
    input_tokens = image_tokens + usable * sum(n for n, _ in counted)
    max_tokens = config.model.max_tokens
    caps = [dict(p.options).get("max_tokens") or max_tokens for p in prompts]
    output_tokens = usable * sum(caps) if None not in caps else None
    batch = config.run.backend == "batch"
    price_in, price_out, price_source = prices(config.model, batch=batch)
    return Estimate(
        rows=rows, rows_exact=rows_exact, rows_source=rows_source, rows_read=rows_read, requests=requests,
        unusable_images=rows - usable, image_tokens=image_tokens, prompt_tokens_per_request=per_request,
        prompt_token_method=method, image_token_rule=rule.describe(), input_tokens=input_tokens,
        max_tokens=max_tokens, output_tokens=output_tokens, model=config.model.name,
        price_input_per_mtok=price_in, price_output_per_mtok=price_out, price_source=price_source,
        cost_usd=cost_usd(input_tokens, output_tokens, price_in, price_out), priced_for_batch=batch,
    )


# ------------------------------------------------------------------------------------ the rows


def _open(config: Config, data: Any) -> Source:
    try:
        return open_source(config.dataset, data)
    except (ConfigError, RunStopped):
        raise
    except Exception as err:  # datasets raises many kinds (DatasetGenerationError, ArrowInvalid, ...)
        raise RunStopped(f"dataset: cannot read {_named(config)}: {type(err).__name__}: {err}") from None


def _image_values(source: Source, sample: int | None, name: str) -> Iterator[Any]:
    """The image column's values in source order (only that column is read), the first ``sample`` only."""
    data = source.data
    if sample is not None:
        data = data.take(sample) if source.streaming else data.select(range(min(sample, len(data))))
    try:
        data = data.select_columns([source.image_column])
        for batch in data.iter(batch_size=_BATCH):
            yield from batch[source.image_column]
    except Exception as err:  # a damaged file or a lost connection part-way: not a config problem
        raise RunStopped(f"dataset: cannot read {name}: {type(err).__name__}: {err}") from None


def _named(config: Config) -> str:
    """The dataset as the user named it: its files when a builder (parquet, ...) reads them."""
    cfg = config.dataset
    return repr(cfg.data_files or cfg.data_dir or cfg.path)


def known_row_count(source: Source, config: Config) -> int | None:
    """Rows the dataset's metadata announces (``dataset.limit`` applied), or None when it does not say."""
    if not source.streaming:
        return len(source.data)
    splits = source.data.info.splits if source.data.info else None
    info = splits.get(config.dataset.split) if splits else None
    if not info or not info.num_examples:  # 0 in metadata means "not recorded" in practice
        return None
    limit = config.dataset.limit
    return info.num_examples if limit is None else min(limit, info.num_examples)


# ---------------------------------------------------------------------------------- the images


def image_size(value: Any, to_send: Callable[[int, int], tuple[int, int]], base_dir: str | None = None) -> tuple[int, int] | None:
    """The size the image is sent at, from its header only; None when a run would make it an error row.

    ``to_send``: the run's sizing, ``pricing.sent_size(config.image, model)`` (``image.max_side``, then
    ``image.max_tokens_per_image``).

    EXIF rotation is not applied: every rule in pricing.py, and ``image_size_after_prep``, give the same
    count for a width x height image and its transpose, so a rotated image costs the same.
    """
    try:
        data = load_image_bytes(value, base_dir=base_dir)
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            fmt = "JPEG" if img.format == "MPO" else img.format
    except Exception:  # ImageError (missing, unreadable), not an image, unknown format, decompression bomb
        return None
    if width < 1 or height < 1 or width * height > _MAX_PIXELS:
        return None
    # A truncated file fails to decode in a run; its header alone looks fine, its end does not.
    if fmt in ("JPEG", "PNG", "WEBP") and not looks_complete(data, fmt):
        return None
    return to_send(width, height)


# ------------------------------------------------------------------------------ prompt and cost


def prompt_tokens(text: str, system: str | None, model: str) -> tuple[int, str]:
    """Text tokens of one request's messages, and how they were counted (a ``{column}`` placeholder
    counts as its own text: the row's values are not read)."""
    texts = [t for t in (system, text) if t]
    encoding = _tiktoken_encoding(model)
    if encoding is None:
        return sum(ceil(len(t) / 4) + 4 for t in texts), APPROXIMATION
    # OpenAI's cookbook count for chat messages: 3 per message, 3 to prime the reply.
    return sum(len(encoding.encode(t)) + 3 for t in texts) + 3, f"tiktoken ({encoding.name})"


def _tiktoken_encoding(model: str) -> Any:
    """tiktoken's encoding for ``model``, or None (not installed, unknown model, files not obtainable)."""
    if os.environ.get("CAPSTREAM_NO_TIKTOKEN", "").strip() not in ("", "0"):
        return None
    try:
        import tiktoken
    except ImportError:
        return None
    try:
        return tiktoken.encoding_for_model(model)  # KeyError for a model it does not know
    except Exception:  # offline and the encoding not cached yet, ...
        return None
