"""What OpenAI bills for a few well-known vision models: USD per million tokens, and how many input
tokens one image counts as. This is capstream's one image-token rule: ``capstream estimate``, the
tokens-per-minute limiter, ``image.max_tokens_per_image`` and the live cost all count with
``image_rule(model)``.

Prices are OpenAI's standard-tier list prices as published on 2025-04-14 (the GPT-4.1 launch;
https://openai.com/api/pricing), and its Batch API prices of the same page (half the list price
for every model listed). Prices change: override them with ``model.price_input_per_mtok`` and
``model.price_output_per_mtok`` rather than trusting this table.

Image tokens differ by model (OpenAI's vision guide, "Calculating costs"): GPT-4o and GPT-4.1
count 85 + 170 per 512 px tile (capstream's ``openai_image_tokens``, also used for every model not
listed); GPT-4o-mini counts the same tiles at 2833 + 5667 per tile (its price per token is lower);
GPT-4.1-mini and GPT-4.1-nano count 32 px patches (at most 1536) times a multiplier.

    >>> billing = model_billing("gpt-4.1-mini-2025-04-14")
    >>> billing.input_per_mtok, billing.image.tokens(1024, 1024, "high")
    (0.4, 1659)
    >>> image_tokens("gpt-4o", 1600, 1200, "high"), image_tokens("my-local-vlm", 1600, 1200, "high")
    (765, 765)
    >>> size_within_budget(image_rule("gpt-4o"), 1600, 1200, max_side=1024, detail="high", budget=500)
    (683, 512)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from math import ceil, floor, sqrt
from typing import TYPE_CHECKING, Callable

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import ImageConfig
    from ..model.settings import ModelConfig

PRICES_AS_OF = "2025-04-14"


@dataclass(frozen=True)
class Tiles:
    """``base`` + ``per_tile`` per 512 px tile after OpenAI's resizing; ``base`` alone for ``low``."""

    base: int = 85
    per_tile: int = 170

    def tokens(self, width: int, height: int, detail: str) -> int:
        if detail == "low":
            return self.base
        tiles = (openai_image_tokens(width, height, detail) - 85) // 170
        return self.base + self.per_tile * tiles

    def describe(self) -> str:
        return f"{self.base} + {self.per_tile} per 512 px tile ({self.base} for detail low)"


@dataclass(frozen=True)
class Patches:
    """32 px patches covering the image (shrunk to at most ``cap`` patches), times ``multiplier``.

    The ``detail`` setting does not change the count for these models.
    """

    multiplier: float
    cap: int = 1536

    def tokens(self, width: int, height: int, detail: str) -> int:
        patches = ceil(width / 32) * ceil(height / 32)
        if patches > self.cap:
            scale = sqrt(32 * 32 * self.cap / (width * height))
            w, h = width * scale / 32, height * scale / 32
            scale *= min(floor(w) / w, floor(h) / h)  # whole patches along the tighter side
            # the tighter side is a whole number of patches by construction: no float ceil-up
            patches = ceil(width * scale / 32 - 1e-9) * ceil(height * scale / 32 - 1e-9)
        return ceil(min(patches, self.cap) * self.multiplier)

    def describe(self) -> str:
        return f"32 px patches (at most {self.cap}) x {self.multiplier}"


@dataclass(frozen=True)
class ModelBilling:
    input_per_mtok: float | None
    output_per_mtok: float | None
    image: Tiles | Patches
    batch_input_per_mtok: float | None = None  # the Batch API's price (run.backend: batch)
    batch_output_per_mtok: float | None = None


DEFAULT_IMAGE_RULE = Tiles()  # capstream's openai_image_tokens: models not in the table

# USD per million input / output tokens (standard tier, no cache discount), then the Batch API's
# (half of them), taken on PRICES_AS_OF. Users should override with model.price_input_per_mtok /
# model.price_output_per_mtok.
PRICES: dict[str, ModelBilling] = {
    "gpt-4o": ModelBilling(2.50, 10.00, Tiles(), 1.25, 5.00),
    "gpt-4o-mini": ModelBilling(0.15, 0.60, Tiles(2833, 5667), 0.075, 0.30),
    "gpt-4.1": ModelBilling(2.00, 8.00, Tiles(), 1.00, 4.00),
    "gpt-4.1-mini": ModelBilling(0.40, 1.60, Patches(1.62), 0.20, 0.80),
    "gpt-4.1-nano": ModelBilling(0.10, 0.40, Patches(2.46), 0.05, 0.20),
}

_DATED = re.compile(r"-\d{4}-\d{2}-\d{2}$")  # gpt-4o-2024-08-06 is gpt-4o


def model_billing(name: str) -> ModelBilling | None:
    """The table's entry for ``name`` (a dated snapshot name counts as its model), or None."""
    key = name.strip().lower()
    return PRICES.get(key) or PRICES.get(_DATED.sub("", key))


# ------------------------------------------------------------------------- the one image-token rule


def image_rule(model: str) -> Tiles | Patches:
    """How ``model`` counts an image: the table's rule, OpenAI's 85 + 170 per tile for any other model."""
    billing = model_billing(model)
    return billing.image if billing else DEFAULT_IMAGE_RULE


def image_tokens(model: str, width: int, height: int, detail: str) -> int:
    """Input tokens one ``width`` x ``height`` image (as sent) counts for ``model`` at ``detail``."""
    return image_rule(model).tokens(width, height, detail)


def min_image_tokens(rule: Tiles | Patches, detail: str) -> int:
    """The fewest tokens any image can count under ``rule`` (a 1 x 1 image: every rule grows with size)."""
    return rule.tokens(1, 1, detail)


def size_within_budget(rule: Tiles | Patches, width: int, height: int, *, max_side: int, detail: str,
                       budget: int) -> tuple[int, int]:
    """The largest size of a ``width`` x ``height`` image (aspect ratio kept, never upscaled, longest
    side at most ``max_side``) that counts at most ``budget`` tokens under ``rule``.

    Sizes are those ``image_size_after_prep`` gives for each longest side, so a resize reproduces them
    exactly. The counts grow with the size up to where the rule stops growing (OpenAI shrinks large
    images itself): a binary search over the longest side finds the largest that fits.
    ValueError when even a 1 px image does not fit (``check_cost_settings`` refuses such budgets).
    """
    full = image_size_after_prep(width, height, max_side)
    if rule.tokens(*full, detail) <= budget:
        return full
    low, high = 0, max(full)  # the longest side that fits is in [low, high): ``high`` does not fit
    while high - low > 1:
        mid = (low + high) // 2
        if rule.tokens(*image_size_after_prep(width, height, mid), detail) <= budget:
            low = mid
        else:
            high = mid
    if low == 0:
        raise ValueError(f"no image size counts at most {budget} tokens ({rule.describe()})")
    return image_size_after_prep(width, height, low)


def sent_size(image: "ImageConfig", model: str) -> Callable[[int, int], tuple[int, int]]:
    """``(width, height) -> size sent`` for these image settings: shrunk to ``image.max_side``, then
    to ``image.max_tokens_per_image`` under ``model``'s rule when that is set. Used by a run's image
    preparation and by ``capstream estimate`` alike.
    """
    if image.max_tokens_per_image is None:
        return lambda width, height: image_size_after_prep(width, height, image.max_side)
    rule, max_side, detail, budget = image_rule(model), image.max_side, image.detail, image.max_tokens_per_image
    return lambda width, height: size_within_budget(rule, width, height, max_side=max_side, detail=detail, budget=budget)


# ------------------------------------------------------------------------------------ USD


def prices(model: "ModelConfig", *, batch: bool = False) -> tuple[float | None, float | None, str]:
    """USD per million input and output tokens, and where they come from (``config``,
    ``table:<date>``, ``config+table:<date>``, ``mock``: free, or ``unknown``). ``batch``: the
    table's Batch API prices (``run.backend: batch``); prices in the config are taken as given."""
    if model.provider == "mock":
        return 0.0, 0.0, "mock"
    billing = model_billing(model.name)
    table_in = (billing.batch_input_per_mtok if batch else billing.input_per_mtok) if billing else None
    table_out = (billing.batch_output_per_mtok if batch else billing.output_per_mtok) if billing else None
    price_in = model.price_input_per_mtok if model.price_input_per_mtok is not None else table_in
    price_out = model.price_output_per_mtok if model.price_output_per_mtok is not None else table_out
    from_config = [model.price_input_per_mtok is not None, model.price_output_per_mtok is not None]
    if price_in is None or price_out is None:
        source = "unknown"
    elif all(from_config):
        source = "config"
    else:
        source = f"{'config+' if any(from_config) else ''}table:{PRICES_AS_OF}"
    return price_in, price_out, source


def cost_usd(input_tokens: int, output_tokens: int | None, price_in: float | None, price_out: float | None) -> float | None:
    """USD for these tokens; None when a price (or the output count) is unknown."""
    if price_in is None or price_out is None or output_tokens is None:
        return None
    return (input_tokens * price_in + output_tokens * price_out) / 1e6


def check_cost_settings(model: "ModelConfig", image: "ImageConfig", max_cost_usd: float | None) -> None:
    """ConfigError for cost settings that cannot work, found before anything is read or sent:
    an ``image.max_tokens_per_image`` no image can fit, a ``run.max_cost_usd`` with no known price."""
    budget = image.max_tokens_per_image
    if budget is not None:
        rule = image_rule(model.name)
        smallest = min_image_tokens(rule, image.detail)
        if budget < smallest:
            raise ConfigError(
                f"image.max_tokens_per_image: {budget} is below the fewest tokens an image counts for "
                f"{model.name!r} at image.detail {image.detail!r} ({smallest}: {rule.describe()})")
    if max_cost_usd is not None and None in prices(model)[:2]:
        raise ConfigError(
            f"run.max_cost_usd: the price of {model.name!r} is unknown, so the money spent cannot be "
            "counted; set model.price_input_per_mtok and model.price_output_per_mtok (USD per million tokens)")


# ---------------------------------------------------------------------------------- sizes


def image_size_after_prep(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size ``prepare_image`` produces for a ``width`` x ``height`` image, before rotation."""
    if width < 1 or height < 1 or max_side < 1:
        raise ValueError(f"sizes must be positive, got {width}x{height}, max_side={max_side}")
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    return _scaled(width, max_side, longest), _scaled(height, max_side, longest)


def _scaled(side: int, numerator: int, denominator: int) -> int:
    """``side * numerator / denominator`` rounded half up, at least 1 (integer maths, exact)."""
    return max(1, (side * numerator + denominator // 2) // denominator)


def openai_image_tokens(width: int, height: int, detail: str = "auto") -> int:
    """Input tokens OpenAI bills for one image (the published tile rule for GPT-4o-class models).

    ``"low"``: 85. ``"high"``/``"auto"``: fit in 2048x2048, shrink so the short side is at most
    768, then 85 + 170 per 512-pixel tile.
    """
    if detail == "low":
        return 85
    if detail not in ("high", "auto"):
        raise ValueError(f"detail must be 'low', 'high' or 'auto', got {detail!r}")
    if width < 1 or height < 1:
        raise ValueError(f"sizes must be positive, got {width}x{height}")
    w, h = Fraction(width), Fraction(height)  # exact, so a side of exactly 512*n is n tiles
    fit = min(Fraction(1), Fraction(2048) / max(w, h))
    w, h = w * fit, h * fit
    short = min(Fraction(1), Fraction(768) / min(w, h))
    w, h = w * short, h * short
    return 85 + 170 * ceil(w / 512) * ceil(h / 512)
