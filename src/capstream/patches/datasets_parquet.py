"""datasets: stream a parquet builder's files a row group at a time.

datasets reads a streamed parquet file with ``Fragment.to_batches``, which reads ahead in pyarrow's
threads whenever the consumer is slower than the disk, whatever its readahead arguments
(apache/arrow#39808), so memory grew with the file (``python scripts/bench.py --only stream``:
chunked LCEL ``abatch`` on datasets' reader peaks at 395 MB for 4,000 rows and 770 MB for 16,000;
capstream, reading a row group at a time with ``ParquetFile``, at 377 and 382 MB). The builder stays
datasets' own (file resolution, features, splits, remote files); only its table generator is
replaced, on that one builder instance.

    >>> builder = datasets.load_dataset_builder("parquet", data_files="data/*.parquet")
    >>> read_row_groups_one_at_a_time(builder)   # False: datasets' own generator is kept
    True
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

from . import tested

TESTED = ("datasets", "4.0", "6.0")


def read_row_groups_one_at_a_time(builder: Any) -> bool:
    """Give ``builder`` a table generator reading one row group at a time; False (and the builder
    untouched) outside the tested versions, or when its generator is not the one this replaces."""
    import datasets
    import pyarrow.parquet as pq

    key = getattr(datasets.builder, "Key", None)
    original = getattr(builder, "_generate_tables", None)
    config = builder.config
    if (not tested(*TESTED) or key is None or original is None or getattr(config, "filters", None) is not None
            or list(inspect.signature(original).parameters) != ["files", "row_groups_list"]):
        return False
    # datasets points the builder module's ``open`` at its streaming opener (remote files, auth).
    open_file = getattr(sys.modules[type(builder).__module__], "open", open)

    def generate_tables(files, row_groups_list=None):
        for file_idx, (file, row_groups) in enumerate(zip(files, row_groups_list or [None] * len(files))):
            with open_file(file, "rb") as f:
                parquet = pq.ParquetFile(f)
                groups = range(parquet.num_row_groups) if row_groups is None else row_groups
                for batch_idx, group in enumerate(groups):
                    table = parquet.read_row_group(group, columns=getattr(config, "columns", None))
                    yield key(file_idx, batch_idx), builder._cast_table(table)

    builder._generate_tables = generate_tables
    return True
