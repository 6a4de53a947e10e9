"""``capstream preview``: ask the model about a few rows before paying for all of them.

It opens the dataset as a run would, asks about the first ``rows`` rows (or ``rows`` rows picked at
random), and says for each its key or image path, its answers, tokens and cost, then the cost of
the whole dataset at that rate. It writes nothing into ``output.dir``; the answers it bought are
in the response cache (``run.cache``), so the run does not pay for them again.

    $ capstream preview configs/openai.yaml -n 5 --sample

    >>> result = preview(load_config("configs/openai.yaml"), rows=5)
    >>> print(result.format())
    >>> result.projected_usd
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from .backends.local import run_on_own_loop
from .config import Config
from .core.run import RowShape
from .cost.meter import Prices, usd
from .errors import ConfigError, RunStopped
from .io.source import Source, open_source
from .model.sending import Usage
from .row.results import RowResult
from .setup import session_spec

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

SAMPLE_BUFFER = 1000  # --sample on a stream: drawn from a shuffle buffer of this many rows (at least 10 x N)
_POSITION = "__capstream_position"  # a stream's rows numbered before they are shuffled


@dataclass(frozen=True)
class PreviewRow:
    """One row asked about: how it is named (its position, and its key or image path), and its result."""

    label: str
    result: RowResult
    tokens: tuple[int, int]  # input, output: what its answers counted when bought (now or before)
    cost_usd: float | None
    from_cache: int  # answers the response cache gave (not paid again)


@dataclass(frozen=True)
class Preview:
    """What ``capstream preview`` prints (``format()``)."""

    rows: list[PreviewRow]
    total_rows: int | None  # the dataset's rows (dataset.limit applied); None: a stream that does not say
    model: str
    prices: Prices
    requests: int
    paid: tuple[int, int]  # tokens this preview paid
    cached: bool  # the answers bought are kept in the response cache (run.cache, a provider that costs)

    @property
    def cost_usd(self) -> float | None:
        return self.prices.usd(*self.paid)

    @property
    def projected_usd(self) -> float | None:
        """The whole dataset's cost at the rate of the rows previewed (what their answers counted)."""
        costs = [row.cost_usd for row in self.rows]
        if not costs or None in costs or not self.total_rows:
            return None
        return sum(costs) / len(costs) * self.total_rows

    def format(self) -> str:
        lines = []
        for row in self.rows:
            lines.append(row.label)
            for name, answer in row.result.answers.items():
                text = f"error: {answer.error}" if answer.error else str(answer.value)
                lines.append(f"  {name}: {text}")
            cost = f", ${usd(row.cost_usd)}" if row.cost_usd is not None else ""
            cached = " (from the response cache: not paid again)" if row.from_cache else ""
            lines.append(f"  tokens {row.tokens[0]}+{row.tokens[1]}{cost}{cached}")
        n = len(self.rows)
        lines.append("")
        paid = f"${usd(self.cost_usd)}" if self.cost_usd is not None else "price unknown"
        lines.append(f"{n} rows: {self.requests} requests, {self.paid[0]}+{self.paid[1]} tokens paid now ({paid})")
        if self.total_rows is None:
            lines.append("whole dataset: its row count is unknown (a stream whose metadata does not say)")
        elif self.projected_usd is None:
            lines.append(f"whole dataset: {self.total_rows} rows; its cost is unknown without a price "
                         "(set model.price_input_per_mtok and model.price_output_per_mtok)")
        else:
            per_row = self.projected_usd / self.total_rows
            lines.append(f"whole dataset: {self.total_rows} rows, ~${usd(self.projected_usd)} at the rate of these "
                         f"{n} (${per_row:.6f} a row; ${self.prices.input_per_mtok:g} in / "
                         f"${self.prices.output_per_mtok:g} out per million tokens, {self.prices.source})")
        lines.append("nothing was written to output.dir" + ("; the answers are in the response cache, so the run "
                                                            "will not pay for them again" if self.cached else ""))
        return "\n".join(lines)


def preview(config: Config, *, rows: int = 5, sample: bool = False, seed: int | None = None, data: Any = None,
            llm: "BaseChatModel | None" = None) -> Preview:
    """Ask about ``rows`` rows of ``config.dataset`` (or ``data``): the first ones, or with
    ``sample`` ones picked at random (``seed``: the same ones again). ConfigError before anything is
    sent; RunStopped when the endpoint refuses or is down."""
    if rows < 1:
        raise ConfigError("preview: -n must be at least 1")
    spec = session_spec(config, llm)
    source = _open(config, data)
    shape = RowShape.of(spec.prompts, source.features, image_column=config.dataset.image_column,
                        key_column=config.dataset.key_column, error_column=config.output.error_column,
                        base_dir=source.base_dir)
    picked = _pick(source, rows, sample, seed)
    usage = Usage()
    prices = Prices.of(config.model)

    async def ask() -> list[RowResult]:
        import asyncio

        with ThreadPoolExecutor(config.run.prep_threads, thread_name_prefix="capstream-prep") as pool:
            session = spec.open(prep_pool=pool, llm=llm, usage=usage, base_dir=source.base_dir)
            try:
                return list(await asyncio.gather(*(
                    session.caption(row[shape.image_column], {c: row.get(c) for c in shape.template_columns})
                    for _, row in picked)))
            finally:
                await session.aclose()

    results = run_on_own_loop(ask())
    previewed = [_row(position, row, result, shape, prices) for (position, row), result in zip(picked, results)]
    return Preview(previewed, source.announced_rows(config.dataset.split, config.dataset.limit), config.model.name,
                   prices, usage.requests, (usage.input_tokens, usage.output_tokens), spec.cache_dir is not None
                   and config.model.provider != "mock")


def _open(config: Config, data: Any) -> Source:
    try:
        return open_source(config.dataset, data, hub_timeout_s=config.output.hub_timeout_s)
    except (ConfigError, RunStopped):
        raise
    except Exception as err:  # datasets raises many kinds (DatasetGenerationError, ArrowInvalid, ...)
        raise RunStopped(f"dataset: cannot read it: {type(err).__name__}: {err}") from None


def _pick(source: Source, n: int, sample: bool, seed: int | None) -> list[tuple[int, dict]]:
    """(position in the source, row) for the rows to ask about."""
    data = source.data
    if not source.streaming:
        count = min(n, len(data))
        positions = sorted(random.Random(seed).sample(range(len(data)), count)) if sample else list(range(count))
        return list(zip(positions, data.select(positions)))
    if sample:  # a stream has no random access: drawn from a shuffle buffer (and shuffled shards)
        numbered = data.map(lambda _, i: {_POSITION: i}, with_indices=True)
        drawn = numbered.shuffle(seed=seed, buffer_size=max(SAMPLE_BUFFER, 10 * n)).take(n)
        return [(row.pop(_POSITION), row) for row in drawn]
    return list(enumerate(data.take(n)))


def _row(position: int, row: dict, result: RowResult, shape: RowShape, prices: Prices) -> PreviewRow:
    label = f"row {position}"
    image = row.get(shape.image_column)
    if shape.key_column:
        label += f" ({shape.key_column} {row.get(shape.key_column)!r})"
    elif isinstance(image, Mapping) and image.get("path"):
        label += f" ({image['path']})"
    bought = [a.provenance for a in result.answers.values() if a.provenance is not None]
    tokens = (sum(p.input_tokens or 0 for p in bought) or result.input_tokens,
              sum(p.output_tokens or 0 for p in bought) or result.output_tokens)
    from_cache = sum(a.source == "cache" for a in result.answers.values())
    return PreviewRow(label, result, tokens, prices.usd(*tokens), from_cache)


__all__ = ["preview", "Preview", "PreviewRow"]
