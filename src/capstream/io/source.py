"""Opening the input dataset and reading it in chunks, images kept as bytes.

``open_source`` turns ``dataset.*`` (or a Dataset / IterableDataset given in code) into a ``Source``;
``Source.chunks(chunk_size, skip)`` yields ``Chunk`` objects of consecutive rows in source order,
columnar, without the chunks listed in ``skip`` being requested again where the format allows.

The image column is cast to ``Image(decode=False)``: decoding inside ``datasets`` kills a stream on the
first corrupt image and would make us re-encode every image when writing the output.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import quote

import datasets

from ..errors import ConfigError, RunStopped
from ..patches.datasets_parquet import read_row_groups_one_at_a_time

if TYPE_CHECKING:
    from ..config import DatasetConfig


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class Chunk:
    """``columns`` holds rows ``start .. start+len-1`` (positions in source order)."""

    index: int
    start: int
    columns: dict[str, list]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


@dataclass
class Source:
    data: datasets.Dataset | datasets.IterableDataset
    image_column: str
    base_dir: str | None = None  # where relative image paths point (local folders)
    chunk_count: int = 0  # how many chunks the source has: known once chunks() is exhausted

    @property
    def streaming(self) -> bool:
        return isinstance(self.data, datasets.IterableDataset)

    @property
    def features(self) -> datasets.Features | None:
        return self.data.features

    @property
    def num_rows(self) -> int | None:
        return None if self.streaming else len(self.data)

    def announced_rows(self, split: str, limit: int | None) -> int | None:
        """The rows to caption: counted when loaded; for a stream, as its metadata announces them
        (``limit`` applied), or None when it does not say."""
        if not self.streaming:
            return len(self.data)
        splits = self.data.info.splits if self.data.info else None
        info = splits.get(split) if splits else None
        if not info or not info.num_examples:  # 0 in metadata means "not recorded" in practice
            return None
        return info.num_examples if limit is None else min(limit, info.num_examples)

    def chunks(self, chunk_size: int, skip: set[int] = frozenset()) -> Iterator[Chunk]:
        """Consecutive chunks of ``chunk_size`` rows; chunks whose index is in ``skip`` are not yielded."""
        if not self.streaming:
            n = len(self.data)
            self.chunk_count = (n + chunk_size - 1) // chunk_size
            for index in range(self.chunk_count):
                if index in skip:
                    continue
                start = index * chunk_size
                yield Chunk(index, start, self.data[start : min(n, start + chunk_size)])
            return
        # Streaming: skip the finished prefix cheaply, then read on (finished chunks past it are read
        # and dropped, which costs reading but no request).
        first = 0
        while first in skip:
            first += 1
        stream = self.data.skip(first * chunk_size) if first else self.data
        index = first - 1
        for index, batch in enumerate(stream.iter(batch_size=chunk_size), start=first):
            if index not in skip:
                yield Chunk(index, index * chunk_size, batch)
        self.chunk_count = index + 1


def _cast_images(ds: datasets.Dataset | datasets.IterableDataset, column: str):
    features = ds.features
    if features is None:
        return ds  # unknown until read (some streams): values are handled in any form by images.py
    if column not in features:
        raise ConfigError(
            f"dataset.image_column: no column {column!r} in the dataset (columns: {', '.join(features)})"
        )
    if isinstance(features[column], datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    # Any other image column in the row would be decoded just to be written back: keep them as bytes too.
    for name, feature in features.items():
        if name != column and isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return ds


def check_local_paths(cfg: DatasetConfig) -> None:
    """ConfigError naming the key when ``dataset.data_dir`` or ``dataset.data_files`` name local
    files that are not there (checked without reading any data). Paths inside a Hub repo, and URLs,
    are left to the load: they cannot be checked offline."""
    if not cfg.path:
        raise ConfigError("dataset.path: required (a Hub dataset id, a local folder, or a builder such as parquet)")
    local_folder = os.path.isdir(cfg.path)
    if not local_folder and (os.path.exists(cfg.path) or _HUB_ID.fullmatch(cfg.path)):
        return  # a file, or a Hub repo: data_dir / data_files are inside it
    # As datasets resolves them: under the folder (dataset.path) or the data_dir, else the current folder.
    base = cfg.path if local_folder else ""
    if cfg.data_dir is not None and not _is_url(cfg.data_dir):
        base = os.path.join(base, cfg.data_dir)
        if not os.path.isdir(base):
            raise ConfigError(f"dataset.data_dir: no folder {cfg.data_dir!r}"
                              + (f" in {cfg.path!r}" if local_folder else f" (in {os.getcwd()})"))
    files = cfg.data_files
    patterns = ([files] if isinstance(files, str) else list(files) if isinstance(files, list)
                else [p for v in files.values() for p in ([v] if isinstance(v, str) else v)] if isinstance(files, dict)
                else [])
    for pattern in patterns:
        if not _is_url(pattern) and not glob.glob(os.path.join(base, os.path.expanduser(pattern)), recursive=True):
            raise ConfigError(f"dataset.data_files: nothing matches {pattern!r} (in {os.path.abspath(base or '.')})")


def _is_url(path: str) -> bool:
    return "://" in path


def open_source(cfg: DatasetConfig, data: Any = None, *, hub_timeout_s: float = 30.0) -> Source:
    """Open ``data`` (a Dataset / IterableDataset / DatasetDict) or what ``cfg`` names
    (``hub_timeout_s``: ``output.hub_timeout_s``, for the Hub's first answer)."""
    from_config = data is None
    if data is None:
        check_local_paths(cfg)
        check_hub_dataset(cfg, hub_timeout_s)
        data = _load(cfg)
    if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if cfg.split not in data:
            raise ConfigError(f"dataset.split: no split {cfg.split!r} (splits: {', '.join(data)})")
        data = data[cfg.split]
    if not isinstance(data, (datasets.Dataset, datasets.IterableDataset)):
        raise ConfigError(f"source must be a datasets Dataset or IterableDataset, not {type(data).__name__}")
    if cfg.limit is not None:
        data = data.take(cfg.limit) if isinstance(data, datasets.IterableDataset) else data.select(range(min(cfg.limit, len(data))))
    data = _cast_images(data, cfg.image_column)
    base_dir = cfg.path if cfg.path and os.path.isdir(cfg.path) else (cfg.data_dir if cfg.data_dir and os.path.isdir(cfg.data_dir) else None)
    if base_dir is None and from_config and _HUB_ID.fullmatch(cfg.path) and not os.path.exists(cfg.path):
        # A Hub repo: image paths relative to the repo's root are read from the repo (images.py, hf://).
        base_dir = f"hf://datasets/{cfg.path}@{quote(cfg.revision or 'main', safe='')}"
    return Source(data=data, image_column=cfg.image_column, base_dir=base_dir)


def check_hub_dataset(cfg: DatasetConfig, timeout_s: float) -> None:
    """For a ``dataset.path`` that is no local path but a Hub id: ask the Hub once, quickly, whether
    it has it, so that a typo or a Hub out of reach is one clear line, not datasets' many retries
    (huggingface_hub retries each file's metadata five times, about 25 s). ConfigError when the Hub
    says there is no such dataset (or revision); RunStopped when it cannot be reached. Offline
    (``HF_HUB_OFFLINE``): nothing asked, datasets reads its cache."""
    import httpx2
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    if os.path.exists(cfg.path) or not _HUB_ID.fullmatch(cfg.path) or constants.HF_HUB_OFFLINE:
        return
    where = f"dataset.path: {cfg.path!r} is no local file or folder"
    try:
        HfApi().dataset_info(cfg.path, revision=cfg.revision, timeout=timeout_s, files_metadata=False)
    except GatedRepoError:
        return  # it exists: datasets says what access it needs
    except RevisionNotFoundError:
        raise ConfigError(f"dataset.revision: the Hub dataset {cfg.path!r} has no revision {cfg.revision!r}") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{where}, and the Hub ({constants.ENDPOINT}) has no dataset of that name that this "
                          "login may read (log in with `hf auth login` or set HF_TOKEN for a private one)") from None
    except (httpx2.TransportError, OSError) as err:
        raise RunStopped(f"{where}, and the Hub ({constants.ENDPOINT}) cannot be reached: {err}") from None
    except HfHubHTTPError:
        return  # another answer of the Hub: datasets reads it and says what it means


def _load(cfg: DatasetConfig):
    kwargs: dict[str, Any] = {"split": cfg.split, "streaming": cfg.streaming}
    for key in ("name", "data_dir", "data_files", "revision"):
        value = getattr(cfg, key)
        if value is not None:
            kwargs[key] = value
    try:
        if cfg.streaming and cfg.path == "parquet":
            return _stream_parquet(kwargs)
        if cfg.streaming:
            # As load_dataset(streaming=True) does, but a folder builder (imagefolder) reading the Hub
            # would decode every image into PIL first (datasets 5.2): keep them as bytes/paths.
            split = kwargs.pop("split")
            kwargs.pop("streaming")
            builder = datasets.load_dataset_builder(cfg.path, **kwargs)
            if hasattr(builder.config, "decode_num_threads"):
                builder.config.decode_num_threads = 0
            return builder.as_streaming_dataset(split=split)
        return datasets.load_dataset(cfg.path, **kwargs)
    except FileNotFoundError as err:
        raise ConfigError(f"dataset.path: {cfg.path!r} not found: {err}") from None
    except ValueError as err:  # unknown split, bad data_files pattern, ...
        raise ConfigError(f"dataset: cannot open {cfg.path!r}: {err}") from None
    except (ConnectionError, OSError) as err:
        raise RunStopped(f"dataset: cannot reach {cfg.path!r}: {err}") from None


def _stream_parquet(kwargs: dict[str, Any]) -> datasets.IterableDataset:
    """``load_dataset("parquet", streaming=True, ...)``, reading one row group at a time where
    datasets' version allows (``patches/datasets_parquet.py`` says why)."""
    import pyarrow.dataset

    split = kwargs.pop("split")
    kwargs.pop("streaming", None)
    # Used only by datasets' own generator (kept with other datasets versions): no whole-file pre-buffer.
    kwargs["fragment_scan_options"] = pyarrow.dataset.ParquetFragmentScanOptions(pre_buffer=False)
    builder = datasets.load_dataset_builder("parquet", **kwargs)
    read_row_groups_one_at_a_time(builder)
    return builder.as_streaming_dataset(split=split)
