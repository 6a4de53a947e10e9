"""Thumbnails for the viewer: a small JPEG per row, and a larger one to open, made once per shard.

The image comes from the shard (its bytes, as the output folder embeds them), or from a local file
the row names by path; a URL is never fetched (the viewer works offline and reads nothing it was not
given). A row whose image cannot be decoded gets no thumbnail but a note saying why, and the
gallery shows the row's error instead. Made in threads (PIL decodes and encodes without the GIL)::

    view/thumbs/000003/17.jpg    row 17 of chunk 3, at most THUMB_SIDE px
    view/large/000003/17.jpg     at most LARGE_SIDE px; only when the image is larger than its thumbnail
    view/thumbs/000003.json      what each row of the chunk got; written last, with the shard's size
                                 and modification time: a rerun re-uses the chunk while its shard is unchanged

    >>> thumbs = Thumbnails(layout.view, "image", base_dirs=["my_images"])
    >>> images = thumbs.chunk(3, layout.shard_path(3))      # one RowImage per row of the shard
    >>> thumbs.close(keep={0, 1, 2, 3})                      # thumbnails of other chunks are removed
"""

from __future__ import annotations

import io
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pyarrow.parquet as pq
from PIL import Image, ImageOps

from ..model.settings import redact_url

THUMB_SIDE = 256
LARGE_SIDE = 768
_VERSION = 1  # of the cache's layout and the sizes: a change remakes every thumbnail
_URL_PREFIXES = ("http://", "https://", "hf://", "s3://", "gs://")


@dataclass(frozen=True)
class RowImage:
    """What a row's image became: paths relative to the view folder, or a note saying why there is none."""

    thumb: str | None = None
    large: str | None = None
    note: str | None = None
    name: str | None = None  # the image's file name, when the row has one

    def to_json(self) -> list:
        return [self.thumb, self.large, self.note, self.name]

    @classmethod
    def from_json(cls, data: list) -> "RowImage":
        return cls(*data)


class Thumbnails:
    """The thumbnails of one view folder; ``chunk()`` makes (or re-uses) those of a shard."""

    def __init__(self, view_dir: Path, image_column: str, *, base_dirs: Iterable[str] = (), threads: int | None = None):
        self.dir = Path(view_dir)
        self.image_column = image_column
        self.base_dirs = [d for d in base_dirs if d and os.path.isdir(d)]
        self.pool = ThreadPoolExecutor(threads or os.cpu_count() or 1, thread_name_prefix="capstream-thumbs")
        self.made = 0  # thumbnails made by this object (the rest were re-used)

    def chunk(self, chunk: int, shard: Path) -> list[RowImage]:
        """One ``RowImage`` per row of ``shard``, in order."""
        index = self.dir / "thumbs" / f"{chunk:06d}.json"
        stat = shard.stat()
        stamp = [stat.st_size, stat.st_mtime_ns, _VERSION, THUMB_SIDE, LARGE_SIDE]
        cached = _read_index(index, stamp)
        if cached is not None and all(self._exists(image) for image in cached[:1]):
            return cached
        for folder in (self.dir / "thumbs" / f"{chunk:06d}", self.dir / "large" / f"{chunk:06d}"):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        images: list[RowImage] = []
        offset = 0
        file = pq.ParquetFile(shard)
        if self.image_column in file.schema_arrow.names:
            for batch in file.iter_batches(columns=[self.image_column], batch_size=64):
                values = batch.column(0).to_pylist()
                images += self.pool.map(self._make, [chunk] * len(values), range(offset, offset + len(values)), values)
                offset += len(values)
        else:
            images = [RowImage(note=f"no column {self.image_column!r} in the shard")] * file.metadata.num_rows
        self.made += sum(1 for image in images if image.thumb)
        index.write_text(json.dumps({"stamp": stamp, "rows": [image.to_json() for image in images]}))
        return images

    def _exists(self, image: RowImage) -> bool:
        return image.thumb is None or (self.dir / image.thumb).is_file()

    def _make(self, chunk: int, offset: int, value: Any) -> RowImage:
        name = _name_of(value)
        data = self._bytes_of(value)
        if isinstance(data, str):
            return RowImage(note=data, name=name)
        try:
            with Image.open(io.BytesIO(data)) as opened:
                opened.draft("RGB", (LARGE_SIDE, LARGE_SIDE))  # JPEG: decoded at a reduced size, much faster
                image = _rgb(ImageOps.exif_transpose(opened))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            return RowImage(note=f"the image cannot be shown: {err}", name=name)
        thumb = f"thumbs/{chunk:06d}/{offset}.jpg"
        large = None
        if max(image.size) > THUMB_SIDE:
            big = image.copy()
            big.thumbnail((LARGE_SIDE, LARGE_SIDE), Image.Resampling.BICUBIC)
            large = f"large/{chunk:06d}/{offset}.jpg"
            big.save(self.dir / large, "JPEG", quality=85)
            image.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BICUBIC)
        image.save(self.dir / thumb, "JPEG", quality=80)
        return RowImage(thumb, large, None, name)

    def _bytes_of(self, value: Any) -> bytes | str:
        """The image's bytes, or a note saying why there are none (a URL is not fetched)."""
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)) and value:
            return bytes(value)
        if not value or not isinstance(value, str):
            return "no image in this row"
        if value.lower().startswith(_URL_PREFIXES):
            return f"the image is not in the output folder (it is at {redact_url(value)})"
        for candidate in [value] + [os.path.join(base, value) for base in self.base_dirs]:
            if os.path.isfile(candidate):
                with open(candidate, "rb") as f:
                    return f.read()
        return f"the image file is not found: {value}"

    def close(self, keep: set[int]) -> None:
        """Stop the threads; remove the thumbnails of chunks not in ``keep`` (a run started again)."""
        self.pool.shutdown()
        for kind in ("thumbs", "large"):
            folder = self.dir / kind
            for entry in folder.iterdir() if folder.is_dir() else ():
                stem = entry.name.split(".", 1)[0]
                if not (stem.isdigit() and int(stem) in keep):
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _read_index(index: Path, stamp: list) -> list[RowImage] | None:
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("stamp") != stamp:
        return None
    return [RowImage.from_json(row) for row in data.get("rows", [])]


def _name_of(value: Any) -> str | None:
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    return os.path.basename(path.rstrip("/")) or path if path else None


def _rgb(image: Image.Image) -> Image.Image:
    """RGB for a JPEG; transparency onto white."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


__all__ = ["Thumbnails", "RowImage", "THUMB_SIDE", "LARGE_SIDE"]
