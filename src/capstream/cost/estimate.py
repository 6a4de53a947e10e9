"""What a run will cost, estimated before it starts: rows, requests, tokens, USD. Sends no request.

Every image is read up to its header only (its pixel size, no decode), shrunk as ``prepare_image``
would (``image.max_side``, ``image.max_tokens_per_image``) and counted by the model's image rule
(``pricing.py``; OpenAI's tile rule for models it does not list). Image URLs are read concurrently
with a run's rules (``row/downloads.py``: safety, opt-outs, retries), and only their first bytes and
their end (``ImageDownloads.head``: two ranged requests at most). A row whose image a run could not
send is counted as unusable, and the first of them are listed with the reason. The prompt is counted with tiktoken when it is installed and knows the
model, else as ``ceil(characters / 4) + 4`` per message (``CAPSTREAM_NO_TIKTOKEN=1`` forces that:
tiktoken downloads its encoding files on first use). Output tokens are ``model.max_tokens`` per
request, an upper bound.

    $ capstream estimate configs/openai.yaml --sample 500 --json

    >>> from capstream.config import load_config
    >>> est = estimate(load_config("configs/openai.yaml"), sample=500)
    >>> est.requests, est.input_tokens, est.cost_usd
"""

from __future__ import annotations

import asyncio
import heapq
import io
import os
from dataclasses import asdict, dataclass, field
from math import ceil
from typing import Any, Callable, Iterator

from PIL import Image

from ..backends.local import run_on_own_loop
from ..config import Config
from ..errors import ConfigError, ImageError, RunStopped
from ..io.source import Source, open_source
from ..row.downloads import ImageDownloads
from ..row.images import ends_as_it_should, load_image_bytes, url_of
from ..row.prompts import compile_prompts
from .meter import usd
from .pricing import cost_usd, image_rule, prices, sent_size

_MAX_PIXELS = 128_000_000  # prepare_image's default: larger images are error rows in a run
_BATCH = 256
SHOWN_UNUSABLE = 10  # unusable rows listed by key
APPROXIMATION = "approximation: ceil(characters / 4) + 4 per message"


@dataclass(frozen=True)
class UnusableRow:
    """A row whose image a run could not send: its key (``dataset.key_column``, else its position)
    and why (``"ImageError: ..."``, as the run's error column would say it)."""

    key: Any
    error: str


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
    unusable_rows: list[UnusableRow] = field(default_factory=list)  # the first SHOWN_UNUSABLE read, by key
    priced_for_batch: bool = False  # run.backend: batch: the Batch API's prices

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """Human-readable lines."""
        lines = [f"model             {self.model}", f"rows              {self._rows_text()}",
                 f"requests          {self.requests:,} ({self.unusable_images:,} rows with unusable images: no request)",
                 *self._unusable_lines(),
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

    def _unusable_lines(self) -> list[str]:
        if not self.unusable_rows:
            return []
        shown = "" if len(self.unusable_rows) == self.unusable_images else f"; the first {len(self.unusable_rows)}"
        return [f"unusable rows     {self.unusable_images:,}{shown}, by key:",
                *(f"                  {row.key}: {row.error}" for row in self.unusable_rows)]

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
    found = ImagesRead(lambda width, height: rule.tokens(width, height, config.image.detail))
    run_on_own_loop(found.read(_image_values(source, sample, _named(config), config.dataset.key_column), to_send,
                               source.base_dir, config.image))
    rows_read, usable, image_tokens = found.rows, found.usable, found.image_tokens

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
        cost_usd=cost_usd(input_tokens, output_tokens, price_in, price_out), unusable_rows=found.first_unusable(),
        priced_for_batch=batch,
    )


# ------------------------------------------------------------------------------------ the rows


def _open(config: Config, data: Any) -> Source:
    try:
        return open_source(config.dataset, data)
    except (ConfigError, RunStopped):
        raise
    except Exception as err:  # datasets raises many kinds (DatasetGenerationError, ArrowInvalid, ...)
        raise RunStopped(f"dataset: cannot read {_named(config)}: {type(err).__name__}: {err}") from None


def _image_values(source: Source, sample: int | None, name: str, key_column: str | None) -> Iterator[list[tuple[Any, Any]]]:
    """Batches of (key, image value) in source order (only those columns are read; the key is the
    row's position without ``key_column``), the first ``sample`` rows only."""
    data = source.data
    if sample is not None:
        data = data.take(sample) if source.streaming else data.select(range(min(sample, len(data))))
    try:
        data = data.select_columns([source.image_column] + ([key_column] if key_column else []))
        position = 0
        for batch in data.iter(batch_size=_BATCH):
            images = batch[source.image_column]
            keys = batch[key_column] if key_column else range(position, position + len(images))
            position += len(images)
            yield list(zip(keys, images))
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


class ImagesRead:
    """The images of the rows read: how many, how many a run could send and the tokens they count
    (``tokens_of(width, height)``), and the first unusable ones. ``await read(...)`` reads them:
    bytes and files in turn, URLs concurrently (``ImageDownloads.head``)."""

    def __init__(self, tokens_of: Callable[[int, int], int]):
        self.tokens_of = tokens_of
        self.rows = self.usable = self.image_tokens = 0
        self._unusable: list[tuple[int, int, UnusableRow]] = []  # a max-heap by position (negated), bounded

    def add(self, position: int, key: Any, size: tuple[int, int] | ImageError) -> None:
        if isinstance(size, ImageError):
            entry = (-position, position, UnusableRow(key, size.as_text()))
            (heapq.heappush if len(self._unusable) < SHOWN_UNUSABLE else heapq.heappushpop)(self._unusable, entry)
        else:
            self.usable += 1
            self.image_tokens += self.tokens_of(*size)

    def first_unusable(self) -> list[UnusableRow]:
        return [row for _, _, row in sorted(self._unusable, key=lambda entry: entry[1])]

    async def read(self, batches: Iterator[list[tuple[Any, Any]]], to_send: Callable[[int, int], tuple[int, int]],
                   base_dir: str | None, image: Any) -> None:
        downloads = ImageDownloads(image)
        ahead = asyncio.Semaphore(4 * image.download_concurrency)  # URLs read ahead of the slowest: bounded
        tasks: set[asyncio.Task] = set()

        async def from_url(position: int, key: Any, url: str) -> None:
            try:
                head = await downloads.head(url)
                try:
                    size: tuple[int, int] | ImageError = size_from_parts(head.start, head.end, head.size, to_send)
                except ImageError:
                    if head.whole:
                        raise
                    size = image_size(await downloads.fetch(url), to_send)  # a header beyond the first bytes
            except ImageError as err:
                size = err
            finally:
                ahead.release()
            self.add(position, key, size)

        try:
            while (batch := await asyncio.to_thread(next, batches, None)) is not None:
                for key, value in batch:
                    position, self.rows = self.rows, self.rows + 1
                    url = url_of(value)
                    if url is None:
                        self.add(position, key, _size_or_error(value, to_send, base_dir))
                        continue
                    await ahead.acquire()
                    task = asyncio.create_task(from_url(position, key, url))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await downloads.aclose()


def _size_or_error(value: Any, to_send: Callable[[int, int], tuple[int, int]], base_dir: str | None
                   ) -> tuple[int, int] | ImageError:
    try:
        return image_size(value, to_send, base_dir)
    except ImageError as err:
        return err


def image_size(value: Any, to_send: Callable[[int, int], tuple[int, int]], base_dir: str | None = None) -> tuple[int, int]:
    """The size the image is sent at, from its header only; ``ImageError`` when a run would make it
    an error row. ``value``: any image value but a URL (``ImagesRead`` reads those).

    ``to_send``: the run's sizing, ``pricing.sent_size(config.image, model)`` (``image.max_side``, then
    ``image.max_tokens_per_image``).

    EXIF rotation is not applied: every rule in pricing.py, and ``image_size_after_prep``, give the same
    count for a width x height image and its transpose, so a rotated image costs the same.
    """
    data = load_image_bytes(value, base_dir=base_dir)
    return size_from_parts(data, data, len(data), to_send)


def size_from_parts(start: bytes, end: bytes, length: int, to_send: Callable[[int, int], tuple[int, int]]
                    ) -> tuple[int, int]:
    """``image_size`` from a file's first bytes (enough for its header), its last 4096 bytes and its
    length; ``ImageError`` as there."""
    try:
        with Image.open(io.BytesIO(start)) as img:
            width, height = img.size
            fmt = "JPEG" if img.format == "MPO" else img.format
    except Image.DecompressionBombError:
        raise ImageError("image too large") from None
    except Exception:  # not an image, an unknown format, a header cut short
        raise ImageError("not an image or an unsupported format") from None
    if width < 1 or height < 1 or width * height > _MAX_PIXELS:
        raise ImageError(f"image too large or empty: {width}x{height} pixels")
    # A truncated file fails to decode in a run; its header alone looks fine, its end does not.
    if fmt in ("JPEG", "PNG", "WEBP") and not ends_as_it_should(start, end, length, fmt):
        raise ImageError("truncated or corrupt image")
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
