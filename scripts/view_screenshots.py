#!/usr/bin/env python
"""The screenshots of ``capstream view`` in the docs, from a real run over a generated dataset.

Makes 600 pictures of coloured shapes (every 40th one broken), starts the fake OpenAI-compatible
server (lognormal latency, 2% random 429s, a 1,800 requests/minute limit it announces in its
headers) answering two prompts (a caption and a tags schema) from what each picture shows, runs
``capstream run`` and ``capstream view`` as a user would, and photographs the gallery, a row opened
and the run report in headless Chromium (``capstream.testing.browser``):

    python scripts/view_screenshots.py                  # writes docs/images/view-*.png
    python scripts/view_screenshots.py --rows 200 --out /tmp/shots --work /tmp/view-demo
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import datasets
import yaml
from PIL import Image, ImageDraw

from capstream.testing.browser import ConsoleWatch, chromium, missing
from capstream.testing.openai_server import FakeOpenAI, RequestInfo, lognormal_latency

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (214, 48, 49), "blue": (41, 98, 255), "green": (46, 160, 67), "yellow": (241, 196, 15),
           "purple": (142, 68, 173), "orange": (230, 126, 34), "teal": (22, 160, 133), "pink": (232, 67, 147)}
SHAPES = ("circle", "square", "triangle")


def picture(rng: random.Random) -> tuple[bytes, dict]:
    """A 320x240 JPEG of two or three shapes on a background, and what it shows."""
    background, *colours = rng.sample(sorted(COLOURS), 4)
    image = Image.new("RGB", (320, 240), COLOURS[background])
    draw = ImageDraw.Draw(image)
    shown = []
    for colour in colours[: rng.randint(2, 3)]:
        shape = rng.choice(SHAPES)
        x, y, size = rng.randint(10, 220), rng.randint(10, 140), rng.randint(40, 90)
        box = [x, y, x + size, y + size]
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(x + size // 2, y), (x, y + size), (x + size, y + size)], fill=COLOURS[colour])
        shown.append((colour, shape))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=88)
    described = ", ".join(f"a {c} {s}" for c, s in shown[:-1]) + f" and a {shown[-1][0]} {shown[-1][1]}"
    return buf.getvalue(), {"caption": f"{described.capitalize()} on a {background} background.",
                            "tags": sorted({c for c, _ in shown} | {s for _, s in shown} | {background}),
                            "shapes": len(shown)}


def make_dataset(rows: int, folder: Path) -> tuple[Path, dict[str, dict]]:
    rng = random.Random(7)
    records, truth = [], {}
    for i in range(rows):
        if i % 40 == 39:
            image = {"bytes": b"not an image", "path": f"broken_{i:04d}.jpg"}
        else:
            data, shows = picture(rng)
            truth[hashlib.sha256(data).hexdigest()] = shows
            image = {"bytes": data, "path": f"shapes_{i:04d}.jpg"}
        records.append({"id": i, "image": image})
    features = datasets.Features({"id": datasets.Value("int64"), "image": datasets.Image()})
    path = folder / "shapes.parquet"
    datasets.Dataset.from_list(records, features=features).to_parquet(str(path))
    return path, truth


def replies(truth: dict[str, dict]):
    def reply(info: RequestInfo) -> str:
        shows = truth.get(info.image_sha256 or "")
        if shows is None:
            return "I cannot see this image."
        if (info.body or {}).get("response_format"):
            return json.dumps({"tags": shows["tags"], "shapes": shows["shapes"]})
        return shows["caption"]

    return reply


def run(rows: int, work: Path) -> Path:
    data, truth = make_dataset(rows, work)
    out = work / "shapes"  # the gallery's title
    server = FakeOpenAI(latency=lognormal_latency(0.15, 0.5), p429=0.02, rpm_limit=1800, reply=replies(truth), seed=3)
    with server:
        config = {
            "dataset": {"path": "parquet", "data_files": str(data)},
            "model": {"provider": "openai", "name": "fake-vlm", "base_url": server.url, "api_key_env": None,
                      "price_input_per_mtok": 0.15, "price_output_per_mtok": 0.60},
            "prompts": {"caption": {"text": "Describe this image in one sentence."},
                        "tags": {"text": "Tag the colours and shapes in this image.",
                                 "schema": {"tags": "list[string]", "shapes": "integer"}}},
            "limits": {"max_concurrency": 16, "requests_per_minute": 2400},
            "run": {"chunk_size": 100, "cache": False},
            "output": {"dir": str(out)},
        }
        path = work / "shapes.yaml"
        path.write_text(yaml.safe_dump(config))
        subprocess.run([sys.executable, "-m", "capstream.cli", "run", str(path), "--no-progress", "--overwrite"],
                       check=True, cwd=work)
    subprocess.run([sys.executable, "-m", "capstream.cli", "view", str(out)], check=True, cwd=work)
    return out / "view"


def photograph(view: Path, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with chromium(width=1280, height=820) as context:
        page = context.new_page()
        watch = ConsoleWatch(page)
        page.goto((view / "index.html").as_uri())
        page.wait_for_selector(".card img.thumb")
        page.wait_for_function("[...document.images].every(i => i.complete)")
        shots.append(_shot(page, out / "view-gallery.png"))
        page.click(".card:not(.has-error) >> nth=3")
        page.wait_for_function("[...document.images].every(i => i.complete)")
        shots.append(_shot(page, out / "view-row.png"))
        page.keyboard.press("Escape")
        page.goto((view / "report.html").as_uri())
        page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        shots.append(_shot(page, out / "view-report.png", full_page=True))
        if watch.errors:
            raise SystemExit(f"the pages logged errors: {watch.errors}")
    return shots


def _shot(page, path: Path, full_page: bool = False) -> Path:
    """A screenshot, as a 256-colour PNG (the pictures are flat colours: small files)."""
    png = page.screenshot(full_page=full_page)
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(path, optimize=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--work", type=Path, help="where the dataset and the run go (default: a temporary folder)")
    args = parser.parse_args()
    if (reason := missing()) is not None:
        raise SystemExit(f"no browser: {reason}")
    work = args.work or Path(tempfile.mkdtemp(prefix="capstream-view-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    for shot in photograph(run(args.rows, work), args.out):
        print(f"{shot} ({shot.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
