"""Tests for capstream.row.images (and the size arithmetic in cost.pricing): every value form, pass-through, conversions, failures, estimates."""

from __future__ import annotations

import base64
import io
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from capstream.cost.pricing import image_size_after_prep, openai_image_tokens
from capstream.errors import ImageError
from capstream.row.images import KeptFiles, PreparedImage, load_image_bytes, prepare_image, url_of

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


# ----------------------------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def rgb(size=(64, 48), color=RED) -> Image.Image:
    return Image.new("RGB", size, color)


def decoded(prepared: PreparedImage) -> Image.Image:
    img = Image.open(io.BytesIO(prepared.data))
    img.load()
    return img


def assert_rgb_jpeg(prepared: PreparedImage, size: tuple[int, int]) -> Image.Image:
    assert prepared.reencoded is True
    assert prepared.mime == "image/jpeg"
    assert (prepared.width, prepared.height) == size
    img = decoded(prepared)
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", size)
    return img


def close_to(pixel, expected, tolerance=12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but that holds almost no data (a bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


# ------------------------------------------------------------------------------ value forms

JPEG = encode(rgb())


def test_datasets_dict_with_bytes_wins_over_path():
    prepared = prepare_image({"bytes": JPEG, "path": "does/not/exist.jpg"})
    assert prepared.data == JPEG


def test_datasets_dict_with_relative_path_uses_base_dir(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(JPEG)
    prepared = prepare_image({"bytes": None, "path": "imgs/a.jpg"}, base_dir=str(tmp_path))
    assert prepared.data == JPEG


def test_datasets_dict_with_absolute_path(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(JPEG)
    assert prepare_image({"bytes": None, "path": str(path)}).data == JPEG


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_raw_bytes_forms(wrap):
    assert load_image_bytes(wrap(JPEG)) == JPEG
    assert prepare_image(wrap(JPEG)).data == JPEG


def test_str_and_pathlike_paths(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(JPEG)
    assert prepare_image(str(path)).data == JPEG
    assert prepare_image(path).data == JPEG
    assert prepare_image(Path("a.jpg"), base_dir=str(tmp_path)).data == JPEG


def test_pil_image_small_keeps_size_and_becomes_jpeg():
    img = rgb((100, 60))
    assert_rgb_jpeg(prepare_image(img), (100, 60))
    assert img.size == (100, 60) and img.mode == "RGB"  # the caller's image is untouched


def test_pil_image_large_is_shrunk_and_loadable_as_png():
    img = Image.new("RGBA", (2000, 500), (0, 0, 255, 255))
    assert_rgb_jpeg(prepare_image(img, max_side=800), (800, 200))
    assert Image.open(io.BytesIO(load_image_bytes(img))).format == "PNG"


def test_data_url_round_trips():
    prepared = prepare_image(JPEG)
    head, payload = prepared.data_url().split(",", 1)
    assert head == "data:image/jpeg;base64"
    assert base64.b64decode(payload) == JPEG
    assert "data=" not in repr(prepared)


# --------------------------------------------------------------------------------- URL case


def test_urls_are_named_but_not_read_here():
    # row/downloads.py downloads them, on the event loop, with its safety rules (tests/unit/test_downloads.py).
    assert url_of("https://cdn.test/a.jpg") == "https://cdn.test/a.jpg"
    assert url_of({"bytes": None, "path": "HTTP://cdn.test/a.jpg"}) == "HTTP://cdn.test/a.jpg"
    assert url_of({"bytes": JPEG, "path": "https://cdn.test/a.jpg"}) is None  # the bytes are at hand
    assert url_of("images/a.jpg") is None and url_of(JPEG) is None and url_of(None) is None
    with pytest.raises(ValueError, match="downloaded by"):
        load_image_bytes("http://127.0.0.1:9/a.jpg")


def test_kept_files_are_taken_once_per_put():
    kept = KeptFiles()
    kept.put("a", b"1")
    kept.put("a", b"1")
    assert kept.pop("a") == b"1" and kept.pop("a") == b"1" and kept.pop("a") is None and len(kept) == 0


# ------------------------------------------------------------------------------ pass-through


@pytest.mark.parametrize(
    ("fmt", "mime"), [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")]
)
def test_pass_through_keeps_bytes_identical(fmt, mime):
    data = encode(rgb((300, 200)), fmt)
    prepared = prepare_image(data, max_side=300)
    assert prepared.data == data  # identical, not re-encoded
    assert (prepared.mime, prepared.width, prepared.height) == (mime, 300, 200)
    assert prepared.reencoded is False


def test_pass_through_does_not_decode_pixels(monkeypatch):
    def no_load(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_load)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_load)
    assert prepare_image(JPEG).reencoded is False


def test_jpeg_with_trailing_padding_still_passes_through():
    data = JPEG + b"\x00" * 100 + b"\r\n"
    assert prepare_image(data).data == data


def test_exif_orientation_1_passes_through():
    exif = Image.Exif()
    exif[0x0112] = 1
    data = encode(rgb(), exif=exif.tobytes())
    assert prepare_image(data).data == data


def test_multi_picture_jpeg_is_a_jpeg():
    mpo = encode(rgb((50, 40)), "MPO", save_all=True, append_images=[rgb((50, 40), BLUE)])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    prepared = prepare_image(mpo)
    assert (prepared.data, prepared.mime, prepared.reencoded) == (mpo, "image/jpeg", False)
    shrunk = assert_rgb_jpeg(prepare_image(mpo, max_side=25), (25, 20))
    assert close_to(shrunk.getpixel((5, 5)), RED)


def test_one_by_one_rgb_passes_through_and_gray_is_prepared():
    data = encode(rgb((1, 1)), "PNG")
    assert prepare_image(data).data == data
    assert_rgb_jpeg(prepare_image(encode(Image.new("L", (1, 1), 7), "PNG")), (1, 1))


# ------------------------------------------------------------------------------- bad values


def test_bad_values_raise_image_error(tmp_path):
    cases = {
        "no image in this row": [None, {}, {"bytes": None, "path": None}, ""],
        "empty image bytes": [b"", bytearray()],
        "file not found: ": [str(tmp_path / "x.jpg"), {"bytes": None, "path": "x.jpg"}],
        "empty file": [tmp_path / "empty.jpg"],
        "unsupported image value": [42],
    }
    (tmp_path / "empty.jpg").write_bytes(b"")
    for message, values in cases.items():
        for value in values:
            with pytest.raises(ImageError, match=message) as info:
                prepare_image(value)
            assert info.value.kind == "ImageError"


def test_missing_file_message_names_the_path():
    with pytest.raises(ImageError, match="^file not found: x.jpg$"):
        load_image_bytes("x.jpg")


def test_corrupt_bytes():
    with pytest.raises(ImageError, match="not an image"):
        prepare_image(b"this is not an image at all")
    png = encode(rgb((64, 64)), "PNG")
    idat = png.index(b"IDAT") + 4
    damaged = png[:idat] + b"\x12\x34" * 20 + png[idat + 40 :]
    with pytest.raises(ImageError, match="truncated or corrupt image"):
        prepare_image(damaged, max_side=32)  # too big to pass through, so it is decoded


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_fails_integrity_check_and_decode(fmt):
    noisy = Image.effect_noise((256, 256), 64).convert("RGB")
    data = encode(noisy, fmt)
    with pytest.raises(ImageError, match="truncated or corrupt image"):
        prepare_image(data[: len(data) // 2])


def test_zero_size_image():
    with pytest.raises(ImageError):
        prepare_image(png_with_header(0, 10))


# ----------------------------------------------------------------------------- conversions


def test_cmyk_jpeg():
    data = encode(Image.new("CMYK", (60, 40), (0, 255, 255, 0)))
    img = assert_rgb_jpeg(prepare_image(data), (60, 40))
    assert close_to(img.getpixel((30, 20)), RED)


def test_16_bit_png_is_scaled_not_clipped():
    gray16 = Image.new("I;16", (40, 30), 30000)
    data = encode(gray16, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    img = assert_rgb_jpeg(prepare_image(data), (40, 30))
    assert close_to(img.getpixel((20, 15)), (117, 117, 117), tolerance=3)


def test_32_bit_gray_pil_image_with_16_bit_values():
    img = assert_rgb_jpeg(prepare_image(Image.new("I", (20, 20), 40000)), (20, 20))
    assert close_to(img.getpixel((10, 10)), (156, 156, 156), tolerance=3)


def test_palette_png_with_transparency_goes_onto_white():
    pal = Image.new("P", (40, 40), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0])
    pal.paste(1, (20, 0, 40, 40))
    img = assert_rgb_jpeg(prepare_image(encode(pal, "PNG", transparency=0)), (40, 40))
    assert close_to(img.getpixel((5, 20)), WHITE)
    assert close_to(img.getpixel((35, 20)), RED)


def test_rgba_png_goes_onto_white():
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (20, 0, 40, 40))
    img = assert_rgb_jpeg(prepare_image(encode(rgba, "PNG")), (40, 40))
    assert close_to(img.getpixel((5, 20)), WHITE)
    assert close_to(img.getpixel((35, 20)), BLUE)


@pytest.mark.parametrize(
    ("mode", "fmt"), [("L", "JPEG"), ("L", "PNG"), ("1", "PNG"), ("LA", "PNG")]
)
def test_grayscale_becomes_rgb(mode, fmt):
    assert_rgb_jpeg(prepare_image(encode(Image.new(mode, (30, 20), 255), fmt)), (30, 20))


def test_exif_rotated_jpeg_comes_out_upright():
    img = Image.new("RGB", (80, 40), RED)
    img.paste(BLUE, (40, 0, 80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    data = encode(img, exif=exif.tobytes())
    out = assert_rgb_jpeg(prepare_image(data), (40, 80))
    assert close_to(out.getpixel((20, 10)), RED)
    assert close_to(out.getpixel((20, 70)), BLUE)
    out = assert_rgb_jpeg(prepare_image(data, max_side=40), (20, 40))


@pytest.mark.parametrize(
    ("size", "fmt", "expected"),
    [((3000, 1000), "JPEG", (1024, 341)), ((600, 1500), "PNG", (410, 1024))],
)
def test_large_image_is_shrunk_to_max_side(size, fmt, expected):
    data = encode(rgb(size), fmt)
    assert image_size_after_prep(*size, 1024) == expected
    assert_rgb_jpeg(prepare_image(data, max_side=1024), expected)


def test_quality_changes_the_encoding():
    noisy = encode(Image.effect_noise((200, 200), 64).convert("L"), "PNG")
    low, high = prepare_image(noisy, quality=20), prepare_image(noisy, quality=95)
    assert len(low.data) < len(high.data)


# ------------------------------------------------------------------------- decompression bombs


def test_bomb_declared_in_header_is_refused():
    with pytest.raises(ImageError, match="^image too large"):
        prepare_image(png_with_header(20000, 20000))


def test_max_pixels_is_checked_from_the_header():
    with pytest.raises(ImageError, match=r"^image too large: 100x80 pixels$"):
        prepare_image(encode(rgb((100, 80))), max_pixels=5000)
    with pytest.raises(ImageError, match=r"^image too large: 100x80 pixels$"):
        prepare_image(rgb((100, 80)), max_pixels=5000)


def test_no_global_side_effects():
    filters_before, limit_before = list(warnings.filters), Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not escape
        with pytest.raises(ImageError, match="truncated or corrupt"):
            prepare_image(png_with_header(12000, 9000))  # above Pillow's warning limit only
    with pytest.raises(ImageError):
        prepare_image(png_with_header(20000, 20000))
    prepare_image(encode(Image.new("L", (10, 10))))
    with ThreadPoolExecutor(8) as pool:  # the captioner prepares images in a thread pool
        assert all(not p.reencoded for p in pool.map(prepare_image, [JPEG] * 200))
    assert warnings.filters == filters_before
    assert Image.MAX_IMAGE_PIXELS == limit_before


# -------------------------------------------------------------------------- size and tokens


@pytest.mark.parametrize(
    ("w", "h", "detail", "tokens"),
    [
        (1024, 1024, "high", 765),
        (2048, 4096, "high", 1105),
        (2048, 4096, "auto", 1105),
        (4096, 4096, "low", 85),
        (512, 512, "high", 255),
        (100, 100, "high", 255),
    ],
)
def test_openai_image_tokens(w, h, detail, tokens):
    assert openai_image_tokens(w, h, detail) == tokens


def test_openai_image_tokens_rejects_unknown_detail():
    with pytest.raises(ValueError):
        openai_image_tokens(10, 10, "ultra")


@pytest.mark.parametrize(
    ("w", "h", "max_side", "expected"),
    [(800, 600, 1024, (800, 600)), (4000, 3000, 1024, (1024, 768)), (5000, 1, 1000, (1000, 1))],
)
def test_image_size_after_prep(w, h, max_side, expected):
    assert image_size_after_prep(w, h, max_side) == expected
