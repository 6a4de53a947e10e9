"""The batched map function through datasets' own ``Dataset.map`` and ``IterableDataset.map``, whole
batches and ``input_columns``, with a batch size that does not divide the rows."""

from __future__ import annotations

import datasets
import pytest

from capstream import Captioner, ConfigError

from conftest import FEATURES, expected_caption, make_rows

N, BATCH = 23, 8  # 8 + 8 + 7


@pytest.fixture
def rows():
    return make_rows(N, broken_every=7)


def _dataset(rows, streaming: bool):
    # Images kept as bytes: datasets' own decoding would fail on the broken ones before the map function sees them.
    ds = datasets.Dataset.from_list(rows, features=FEATURES).cast_column("image", datasets.Image(decode=False))
    return ds.to_iterable_dataset() if streaming else ds


def _captioner(server, monkeypatch, text: str) -> Captioner:
    monkeypatch.setenv("FAKE_KEY", "k")
    server.reply = lambda info: f"image {info.width}x{info.height} | {info.text}"
    return Captioner({"model": {"base_url": server.url, "name": "fake-vlm", "api_key_env": "FAKE_KEY"},
                      "prompt": {"text": text}})


def _check(out_rows, broken, text_of):
    assert len(out_rows) == N
    for i, row in enumerate(out_rows):
        if i in broken:
            assert row["caption"] is None and row["error"].startswith("ImageError"), row
        else:
            assert row["error"] is None and row["caption"] == f"{expected_caption(i)} | {text_of(i)}", row


@pytest.mark.parametrize("streaming", [False, True])
def test_whole_batches_fill_placeholders_from_the_row(server, monkeypatch, rows, streaming):
    """No input_columns: Dataset.map passes a LazyBatch (not a dict), IterableDataset.map a dict;
    both give every column, and {alt} is filled from each row."""
    source, broken = rows
    captioner = _captioner(server, monkeypatch, "Caption it. Alt text: {alt}")
    out = _dataset(source, streaming).map(captioner, batched=True, batch_size=BATCH)
    _check(list(out), broken, lambda i: f"Caption it. Alt text: row {i}")
    assert server.requests == N - len(broken)
    captioner.close()


@pytest.mark.parametrize("streaming", [False, True])
def test_the_image_column_alone_is_enough_without_placeholders(server, monkeypatch, rows, streaming):
    source, broken = rows
    captioner = _captioner(server, monkeypatch, "Caption it.")
    out = _dataset(source, streaming).map(captioner, batched=True, batch_size=BATCH, input_columns=["image"])
    _check(list(out), broken, lambda i: "Caption it.")
    captioner.close()


@pytest.mark.parametrize("streaming", [False, True])
def test_a_placeholder_the_batch_lacks_is_refused_naming_it(server, monkeypatch, rows, streaming):
    """With input_columns=["image"], {alt} cannot be filled: refused, nothing sent with empty text."""
    source, _ = rows
    captioner = _captioner(server, monkeypatch, "Caption it. Alt text: {alt}")
    with pytest.raises(ConfigError, match=r"\{alt\}.*input_columns"):
        list(_dataset(source, streaming).map(captioner, batched=True, batch_size=BATCH, input_columns=["image"]))
    without_alt = _dataset(source, streaming).remove_columns(["alt"])
    with pytest.raises(ConfigError, match=r"\{alt\}: no column 'alt' in the batch"):
        list(without_alt.map(captioner, batched=True, batch_size=BATCH))
    assert server.requests == 0
    captioner.close()
