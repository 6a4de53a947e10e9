"""Turn whatever image value a dataset row holds into the payload sent to a vision model.

Accepted values: a ``datasets`` Image dict (``{"bytes": ..., "path": ...}``), raw bytes
(``bytes``/``bytearray``/``memoryview``), a local path (``str`` or ``os.PathLike``), a file of a Hub
repo (``hf://``), or a ``PIL.Image.Image``. An ``http(s)://`` URL (``url_of`` tells) is downloaded
first, on the event loop, by ``row/downloads.py``; its bytes are then prepared here. Every failure
is raised as :class:`~capstream.errors.ImageError` with a short message meant for the row's error
column.

Small JPEG/PNG/WEBP files in RGB without an EXIF rotation are sent as they are; everything else is
decoded, rotated upright, converted to RGB (transparency onto white), shrunk so its longest side is
``max_side`` and re-encoded as JPEG.

Usage::

    from capstream.row.images import prepare_image

    img = prepare_image(row["image"], max_side=1024, base_dir="/data/my_dataset")
    content = {"type": "image_url", "image_url": {"url": img.data_url()}}
"""

from __future__ import annotations

import base64
import io
import os
import re
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageOps

from ..cost.pricing import image_size_after_prep
from ..errors import ImageError

__all__ = [
    "KeptFiles",
    "PreparedImage",
    "ends_as_it_should",
    "load_image_bytes",
    "looks_complete",
    "prepare_image",
    "url_of",
]

_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
_PADDING = b"\x00 \t\r\n"
_JPEG_EOI = b"\xff\xd9"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_ORIENTATION_TAG = 0x0112
_TAIL = 4096  # how much of a file's end looks_complete reads
_WARNINGS_LOCK = threading.Lock()


@dataclass(frozen=True)
class PreparedImage:
    """The image as it is sent: bytes, their MIME type and the pixel size they decode to."""

    data: bytes = field(repr=False)
    mime: str
    width: int
    height: int
    reencoded: bool

    def data_url(self) -> str:
        """``data:<mime>;base64,...`` for an OpenAI-style ``image_url`` content part."""
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


class KeptFiles:
    """Image bytes a session read (files named by path, downloads) kept for the shard writer, which
    embeds them in the output instead of reading them again. Each ``put`` is taken by one ``pop``
    (two rows naming the same file both find it); safe across threads (the preparation pool puts,
    the shard writer's thread pops)."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._puts: Counter = Counter()
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            self._data[key] = data
            self._puts[key] += 1

    def pop(self, key: str, default: bytes | None = None) -> bytes | None:
        """The bytes kept under ``key`` (``default`` when none); forgotten once taken as often as put."""
        with self._lock:
            if key not in self._data:
                return default
            self._puts[key] -= 1
            if self._puts[key] > 0:
                return self._data[key]
            del self._puts[key]
            return self._data.pop(key)

    def __len__(self) -> int:
        return len(self._data)

    def __getstate__(self) -> dict:  # crosses to a Ray driver: without its lock
        with self._lock:
            return {"data": dict(self._data), "puts": Counter(self._puts)}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self._data, self._puts = state["data"], state["puts"]


# --------------------------------------------------------------------------------------- loading


def url_of(value: Any) -> str | None:
    """The ``http(s)://`` URL ``value`` names (a string, or an Image dict with a URL path and no
    bytes), or None when its bytes are at hand or it names a file."""
    if isinstance(value, Mapping) and not value.get("bytes"):
        value = value.get("path")
    return value if isinstance(value, str) and _is_url(value) else None


def load_image_bytes(
    value: Any,
    *,
    base_dir: str | None = None,
    max_bytes: int = 50 * 2**20,
) -> bytes:
    """The encoded image bytes of ``value`` (any accepted form); ``ImageError`` when there are none.

    ``max_bytes`` caps files. A ``PIL.Image.Image`` is encoded as PNG. A URL is not read here
    (``row/downloads.py`` downloads it, with its safety rules): ValueError.
    """
    if value is None:
        raise ImageError("no image in this row")
    if isinstance(value, Image.Image):
        return _pil_to_png(value)
    if url_of(value) is not None:
        raise ValueError("an image URL is downloaded by capstream.row.downloads.ImageDownloads, not read here")
    if isinstance(value, Mapping):
        return _load_from_dict(value, base_dir, max_bytes)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if not data:
            raise ImageError("empty image bytes")
        return data
    if isinstance(value, (str, os.PathLike)):
        return _read_file(value, base_dir, max_bytes)
    raise ImageError(f"unsupported image value of type {type(value).__name__}")


def _load_from_dict(value: Mapping, base_dir: str | None, max_bytes: int) -> bytes:
    if value and "bytes" not in value and "path" not in value:
        raise ImageError(f"unsupported image dict with keys {sorted(map(str, value))}")
    data, path = value.get("bytes"), value.get("path")
    if data:  # bytes win over path, as in datasets' Image feature
        return load_image_bytes(data)
    if path:
        return load_image_bytes(path, base_dir=base_dir, max_bytes=max_bytes)
    raise ImageError("no image in this row")


def _is_url(text: str) -> bool:
    return text[:8].lower().startswith(("http://", "https://"))


def _read_file(path: str | os.PathLike, base_dir: str | None, max_bytes: int) -> bytes:
    name = os.fsdecode(path)
    if not name:
        raise ImageError("no image in this row")
    if base_dir and not os.path.isabs(name) and not name.startswith("hf://"):
        name = f"{base_dir.rstrip('/')}/{name}" if base_dir.startswith("hf://") else os.path.join(base_dir, name)
    if name.startswith("hf://"):
        return _read_hub_file(name, max_bytes)
    try:
        with open(name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise ImageError(f"file too large: {name} ({size} bytes, limit {max_bytes})")
            data = f.read()
    except FileNotFoundError:
        raise ImageError(f"file not found: {name}") from None
    except IsADirectoryError:
        raise ImageError(f"not a file: {name}") from None
    except PermissionError:
        raise ImageError(f"permission denied: {name}") from None
    except OSError as e:
        raise ImageError(f"cannot read {name}: {e.strerror or e}") from None
    if not data:
        raise ImageError(f"empty file: {name}")
    return data


def _read_hub_file(name: str, max_bytes: int) -> bytes:
    """A file in a Hub repo (``hf://datasets/user/name@rev/path``), read with the user's token."""
    from huggingface_hub import HfFileSystem

    try:
        with HfFileSystem().open(name, "rb") as f:
            if f.size is not None and f.size > max_bytes:
                raise ImageError(f"file too large: {name} ({f.size} bytes, limit {max_bytes})")
            data = f.read()
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"file not found: {name}") from None
    except Exception as e:  # the Hub client's errors (HTTP, timeouts): the row's, the run goes on
        raise ImageError(f"cannot read {name}: {type(e).__name__}") from None
    if not data:
        raise ImageError(f"empty file: {name}")
    return data


def _pil_to_png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    with _pillow_errors():
        if img.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
            img = _to_rgb(img)
        img.save(buffer, "PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------- preparation


def prepare_image(
    value: Any,
    *,
    max_side: int = 1024,
    quality: int = 90,
    base_dir: str | None = None,
    max_pixels: int = 128_000_000,
    target_size: Callable[[int, int], tuple[int, int]] | None = None,
) -> PreparedImage:
    """The payload for ``value``: its own bytes when they can be sent as they are, else a JPEG.

    ``target_size``: ``(width, height) -> size to send`` (before EXIF rotation; e.g.
    ``prices.sent_size(config.image, model)`` for a token budget), instead of shrinking to ``max_side``.
    Raises ``ImageError`` for a missing, unreadable, corrupt, empty or too large image.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}")
    if target_size is None:
        target_size = lambda width, height: image_size_after_prep(width, height, max_side)  # noqa: E731
    if isinstance(value, Image.Image):
        with _pillow_errors():
            _check_size(value.size, max_pixels)
            with _quiet_bomb_warning(value.size):
                return _reencode(value, target_size(*value.size), quality, owned=False)

    data = load_image_bytes(value, base_dir=base_dir)
    with _pillow_errors():
        with _quiet_bomb_warning():
            img = Image.open(io.BytesIO(data))
        _check_size(img.size, max_pixels)
        target = target_size(*img.size)
        if _can_pass_through(img, data, target):
            width, height = img.size
            return PreparedImage(data, _MIME[_format(img)], width, height, reencoded=False)
        with _quiet_bomb_warning(img.size):
            return _reencode(img, target, quality, owned=True)


@contextmanager
def _pillow_errors() -> Iterator[None]:
    """Translate whatever Pillow raises while opening or decoding into ``ImageError``."""
    try:
        yield
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = f": {found.group(1)} pixels" if found else ""
        raise ImageError(f"image too large{pixels}") from e
    except Image.UnidentifiedImageError:
        raise ImageError("not an image or an unsupported format") from None
    except MemoryError:
        raise ImageError("image too large to decode") from None
    # Pillow's plugins raise OSError, SyntaxError, ValueError, struct.error, EOFError... on
    # damaged files; any of them means the same thing for the row.
    except Exception as e:
        raise ImageError("truncated or corrupt image") from e


def _quiet_bomb_warning(size: tuple[int, int] | None = None) -> Any:
    """Silence Pillow's DecompressionBombWarning here only: our own max_pixels check decides.

    Image.open always runs Pillow's check; decoding only re-runs it (GIF, TIFF...) for an image
    above Pillow's limit, so ``size`` lets the common case skip the lock.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or (size is not None and size[0] * size[1] <= limit):
        return nullcontext()
    return _ignoring_bomb_warning()


@contextmanager
def _ignoring_bomb_warning() -> Iterator[None]:
    # catch_warnings swaps the process-wide filter list and restores it on exit, so two threads of
    # the preparation pool interleaving here could leave a filter behind; the lock prevents that.
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"zero-size image: {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(f"image too large: {width}x{height} pixels")


def _format(img: Image.Image) -> str | None:
    # Pillow calls a JPEG with a multi-picture (MPF) trailer "MPO"; it is still a plain JPEG.
    return "JPEG" if img.format == "MPO" else img.format


def _can_pass_through(img: Image.Image, data: bytes, target: tuple[int, int]) -> bool:
    """Whether the source bytes can be sent as they are, judged from the header only."""
    return (
        _format(img) in _MIME
        and img.mode == "RGB"
        and img.size == target
        and "transparency" not in img.info
        and (img.format == "MPO" or getattr(img, "n_frames", 1) == 1)
        and _header_orientation(img) == 1
        and looks_complete(data, _format(img))
    )


def _header_orientation(img: Image.Image) -> int:
    """EXIF orientation read from the header (1 when absent, 0 when unreadable)."""
    if "Raw profile type exif" in img.info:
        return 0
    raw = img.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(_ORIENTATION_TAG, 1))
    except Exception:
        return 0


def looks_complete(data: bytes, fmt: str | None) -> bool:
    """Cheap integrity check instead of a full decode: does the file end as it should?"""
    return ends_as_it_should(data[:12], data[-_TAIL:], len(data), fmt)


def ends_as_it_should(start: bytes, end: bytes, size: int, fmt: str | None) -> bool:
    """``looks_complete`` from a file's first 12 bytes, its last 4096 and its length (what
    ``capstream estimate`` reads of an image URL), without the rest."""
    tail = end[-_TAIL:].rstrip(_PADDING)
    if fmt == "JPEG":
        return tail.endswith(_JPEG_EOI)
    if fmt == "PNG":
        return tail.endswith(_PNG_IEND)
    if fmt == "WEBP":
        declared = int.from_bytes(start[4:8], "little") + 8
        return start[:4] == b"RIFF" and start[8:12] == b"WEBP" and declared <= size
    return False


def _reencode(img: Image.Image, target: tuple[int, int], quality: int, *, owned: bool) -> PreparedImage:
    """Decode, rotate upright, convert to RGB, shrink to ``target`` (the size before rotation) and
    encode as JPEG.

    ``owned`` is False for a caller's PIL image, which must not be modified (no draft, no in-place
    transpose).
    """
    if owned and _format(img) == "JPEG" and target != img.size:
        img.draft("RGB", target)  # let libjpeg decode at 1/2, 1/4 or 1/8 scale
    img.load()
    if _exif_orientation(img) in (5, 6, 7, 8):
        target = (target[1], target[0])
    img = _upright(img, owned)
    icc = img.info.get("icc_profile") if img.mode in ("RGB", "RGBA") else None
    img = _to_rgb(img)
    if img.size != target:
        img = img.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    data = _encode_jpeg(img, quality, icc)
    return PreparedImage(data, "image/jpeg", img.width, img.height, reencoded=True)


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:
        return 1


def _upright(img: Image.Image, owned: bool) -> Image.Image:
    try:
        if owned:
            ImageOps.exif_transpose(img, in_place=True)
            return img
        return ImageOps.exif_transpose(img)
    except Exception:  # unreadable EXIF: the pixels are fine, keep them as stored
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with 16/32-bit gray scaled to 8 bits and transparent areas composited onto white."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit_gray(img)
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError:
        raise ImageError(f"unsupported image mode: {img.mode}") from None


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16"):
        factor = 1 / 256
        img = img.convert("I")
    else:  # "I" (32-bit) or "F": guess the range from the data
        high = img.getextrema()[1]
        factor = 1.0 if high <= 255 else 1 / 256 if high <= 65535 else 255 / high
    gray = img.point(lambda v: v * factor).convert("L")
    gray.info.clear()  # a 16-bit transparency key means nothing after scaling
    return gray


def _encode_jpeg(img: Image.Image, quality: int, icc: bytes | None) -> bytes:
    buffer = io.BytesIO()
    options: dict[str, Any] = {"quality": quality}
    if icc:
        options["icc_profile"] = icc
    img.save(buffer, "JPEG", **options)
    return buffer.getvalue()
