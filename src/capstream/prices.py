"""What OpenAI bills for a few well-known vision models: USD per million tokens, and how many input
tokens one image counts as. Used by ``capstream estimate`` only; nothing here changes a run.

Prices are OpenAI's standard-tier list prices as published on 2025-04-14 (the GPT-4.1 launch;
https://openai.com/api/pricing). Prices change: override them with ``model.price_input_per_mtok``
and ``model.price_output_per_mtok`` rather than trusting this table.

Image tokens differ by model (OpenAI's vision guide, "Calculating costs"): GPT-4o and GPT-4.1
count 85 + 170 per 512 px tile (capstream's ``openai_image_tokens``, also used for every model not
listed); GPT-4o-mini counts the same tiles at 2833 + 5667 per tile (its price per token is lower);
GPT-4.1-mini and GPT-4.1-nano count 32 px patches (at most 1536) times a multiplier.

    >>> billing = model_billing("gpt-4.1-mini-2025-04-14")
    >>> billing.input_per_mtok, billing.image.tokens(1024, 1024, "high")
    (0.4, 1659)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import ceil, floor, sqrt

from .images import openai_image_tokens

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


DEFAULT_IMAGE_RULE = Tiles()  # capstream's openai_image_tokens: models not in the table

# USD per million input / output tokens (standard tier, no batch or cache discount), taken on
# PRICES_AS_OF. Users should override with model.price_input_per_mtok / model.price_output_per_mtok.
PRICES: dict[str, ModelBilling] = {
    "gpt-4o": ModelBilling(2.50, 10.00, Tiles()),
    "gpt-4o-mini": ModelBilling(0.15, 0.60, Tiles(2833, 5667)),
    "gpt-4.1": ModelBilling(2.00, 8.00, Tiles()),
    "gpt-4.1-mini": ModelBilling(0.40, 1.60, Patches(1.62)),
    "gpt-4.1-nano": ModelBilling(0.10, 0.40, Patches(2.46)),
}

_DATED = re.compile(r"-\d{4}-\d{2}-\d{2}$")  # gpt-4o-2024-08-06 is gpt-4o


def model_billing(name: str) -> ModelBilling | None:
    """The table's entry for ``name`` (a dated snapshot name counts as its model), or None."""
    key = name.strip().lower()
    return PRICES.get(key) or PRICES.get(_DATED.sub("", key))
