"""Streamed parquet is read a row group at a time: same rows as datasets' reader, bounded memory."""

import gc
import os
import time

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capstream.config import DatasetConfig
from capstream.io.source import open_source

ROW_BYTES = 100_000


def _file(path, rows=600, group=20):
    """``rows`` rows of ~100 KB of incompressible bytes, ``group`` rows per row group."""
    features = datasets.Features({"id": datasets.Value("int64"), "blob": datasets.Value("binary")})
    table = pa.table({"id": list(range(rows)), "blob": [os.urandom(ROW_BYTES) for _ in range(rows)]},
                     schema=features.arrow_schema)
    pq.write_table(table, path, row_group_size=group, compression="none")
    return path


def _config(path):
    return DatasetConfig(path="parquet", data_files=str(path), streaming=True, image_column="blob")


def test_streamed_rows_match_datasets_own_reader(tmp_path):
    path = _file(tmp_path / "a.parquet", rows=130, group=20)
    source = open_source(_config(path))
    ours = [(i, b) for c in source.chunks(32) for i, b in zip(c.columns["id"], c.columns["blob"])]
    theirs = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
    assert ours == [(r["id"], r["blob"]) for r in theirs]
    assert source.chunk_count == 5
    assert [c.start for c in source.chunks(32, skip={0, 1, 3})] == [64, 128]
    assert [r["id"] for r in source.data.skip(45).take(3)] == [45, 46, 47]


@pytest.mark.parametrize("named_by", ["parquet builder", "folder"])
def test_a_slow_consumer_does_not_make_arrow_read_ahead(tmp_path, named_by):
    # datasets' own reader (Fragment.to_batches) reads ahead about a third of the file in pyarrow's
    # threads while the consumer waits; a row group at a time holds one group (2 MB here). A folder
    # (or a Hub repo) of parquet files is read by the same builder, found by datasets itself.
    (tmp_path / "folder").mkdir()
    path = _file(tmp_path / "folder" / "b.parquet", rows=600, group=20)  # 60 MB, 30 row groups
    config = (_config(path) if named_by == "parquet builder"
              else DatasetConfig(path=str(tmp_path / "folder"), streaming=True, image_column="blob"))
    chunks = open_source(config).chunks(20)
    peak = 0
    for index, chunk in enumerate(chunks):
        if index < 3:
            time.sleep(0.5)  # a consumer slower than the disk: time for a read-ahead to happen
        gc.collect()  # earlier chunks left in reference cycles are not what is measured (they made it noisy)
        peak = max(peak, pa.total_allocated_bytes())
    assert index == 29
    assert peak < 4 * 20 * ROW_BYTES, f"{peak / 2**20:.0f} MB of Arrow memory held"
