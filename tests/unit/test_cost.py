"""Cost arithmetic in-process: the image-token rules, the size search for image.max_tokens_per_image, the meter."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from capstream.config import Config, config_from_dict
from capstream.core.progress import ProgressBar
from capstream.cost.meter import CostMeter, Prices
from capstream.cost.pricing import (
    DEFAULT_IMAGE_RULE,
    Patches,
    Tiles,
    image_rule,
    image_size_after_prep,
    image_tokens,
    min_image_tokens,
    sent_size,
    size_within_budget,
)
from capstream.model.sending import Usage
from capstream.row.images import prepare_image
from capstream.row.results import RowCounts

from conftest import jpeg

RULES = {"tiles 85+170": DEFAULT_IMAGE_RULE, "tiles 2833+5667": Tiles(2833, 5667),
         "patches x1.62": Patches(1.62), "patches x2.46": Patches(2.46)}
SIZES = [(1600, 1200), (4000, 1474), (513, 2049), (3000, 17), (800, 801), (5000, 5000), (640, 480)]


@pytest.fixture(autouse=True)
def no_tiktoken(monkeypatch):
    monkeypatch.setenv("CAPSTREAM_NO_TIKTOKEN", "1")


def _largest_by_brute_force(rule, w, h, max_side, detail, budget):
    longest = max(image_size_after_prep(w, h, max_side))
    fits = [side for side in range(1, longest + 1)
            if rule.tokens(*image_size_after_prep(w, h, side), detail) <= budget]
    return image_size_after_prep(w, h, max(fits))


@pytest.mark.parametrize("name", list(RULES))
def test_size_search_finds_the_largest_size_within_the_budget(name):
    rule = RULES[name]
    for w, h in SIZES:
        for max_side in (512, 2048):
            full = image_size_after_prep(w, h, max_side)
            most = rule.tokens(*full, "high")
            smallest = min_image_tokens(rule, "high")
            budgets = {smallest, smallest + 1, (smallest + most) // 2, most - 1, most, most + 1000}
            for budget in sorted(b for b in budgets if b >= smallest):
                got = size_within_budget(rule, w, h, max_side=max_side, detail="high", budget=budget)
                assert rule.tokens(*got, "high") <= budget
                assert got == _largest_by_brute_force(rule, w, h, max_side, "high", budget), (w, h, max_side, budget)
                assert max(got) <= max_side and got[0] <= w and got[1] <= h  # never upscaled
                # aspect ratio kept: the other side is the source's ratio rounded to the pixel
                assert got == image_size_after_prep(w, h, max(got))
                assert abs(min(got) - min(w, h) * max(got) / max(w, h)) <= 0.5 or min(got) == 1
                if budget >= most:
                    assert got == full  # already within the budget: not shrunk


def test_size_search_examples():
    # 1024x768 counts 85 + 170 x 4 = 765; 500 tokens allow 2 tiles: the long side at 683 keeps the short at 512.
    assert size_within_budget(DEFAULT_IMAGE_RULE, 1600, 1200, max_side=1024, detail="high", budget=500) == (683, 512)
    assert size_within_budget(DEFAULT_IMAGE_RULE, 1600, 1200, max_side=1024, detail="high", budget=255) == (512, 384)
    # detail low: 85 whatever the size, so nothing is shrunk for the budget
    assert size_within_budget(DEFAULT_IMAGE_RULE, 1600, 1200, max_side=1024, detail="low", budget=85) == (1024, 768)
    # gpt-4.1-mini: 1024x1024 is 1024 patches x 1.62 = 1659; 400 tokens allow 246 patches: 15 x 15 of 32 px
    got = size_within_budget(image_rule("gpt-4.1-mini"), 1024, 1024, max_side=2048, detail="high", budget=400)
    assert got == (480, 480) and image_tokens("gpt-4.1-mini", *got, "high") == 365
    with pytest.raises(ValueError):
        size_within_budget(DEFAULT_IMAGE_RULE, 100, 100, max_side=1024, detail="high", budget=254)


def test_the_token_budget_is_part_of_the_resume_fingerprint():
    a = config_from_dict({"image": {"max_tokens_per_image": 9000}}).fingerprint()
    assert a["image.max_tokens_per_image"] == 9000 != Config().fingerprint()["image.max_tokens_per_image"]


def test_prepare_image_passes_through_what_fits_and_shrinks_the_rest():
    to_send = sent_size(config_from_dict({"model": {"name": "gpt-4o"}, "image": {"detail": "high", "max_tokens_per_image": 255}}).image, "gpt-4o")
    small = jpeg(500, 300)
    assert prepare_image(small, target_size=to_send).data == small  # one tile already: sent as it is
    big = prepare_image(jpeg(1600, 1200), target_size=to_send)
    assert (big.width, big.height) == (512, 384) and big.reencoded
    # EXIF-rotated: shrunk to the same budget, then turned upright
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (1600, 1200), (9, 9, 9)).save(buf, "JPEG", exif=exif)
    rotated = prepare_image(buf.getvalue(), target_size=to_send)
    assert (rotated.width, rotated.height) == (384, 512)


def test_progress_bar_shows_money_spent_and_projected():
    usage = Usage(input_tokens=400_000, output_tokens=50_000)
    meter = CostMeter(Prices(2.0, 10.0, "config"), usage, before=(100_000, 0))
    bar = ProgressBar(1000, RowCounts(), meter, enabled=False, initial=250)
    # (500k x $2 + 50k x $10) / 1M = $1.50 spent over 250 rows of 1000: ~$6.00
    assert bar.money() == " $1.50 of ~$6.00"
    assert ProgressBar(None, RowCounts(), meter, enabled=False, initial=250).money() == " $1.50"
    unknown = CostMeter(Prices(None, None, "unknown"), usage)
    assert ProgressBar(1000, RowCounts(), unknown, enabled=False).money() == ""
    assert meter.projected_usd(0, 1000) is None
