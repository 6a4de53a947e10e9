"""Pushing a run's folder to the Hugging Face Hub: bounded calls, batched commits, continuous export.

The only module that writes to the Hub. What is pushed is the run's Hub-ready folder: the finished
parquet shards (``data/<split>-NNNNNN.parquet``) and a dataset card written for the repo's layout;
never the ``.capstream/`` state folder, never a token (``huggingface_hub`` reads ``HF_TOKEN`` or the
saved login itself; capstream never sees or stores it).

    >>> target = HubTarget.from_config(config.output, split="train")
    >>> result = push_folder("out/run", target)            # what `capstream push out/run user/name` does
    >>> exporter = HubExporter("out/run", target, every_shards=10)   # continuous export during a run
    >>> exporter.chunk_written(0); ...; exporter.finish()   # the run core calls these

Every Hub request has a timeout (``output.hub_timeout_s``; huggingface_hub's own client has none:
``patches/hf_hub_clients.py``) and a call failing with a transient status (``model.retry``'s: 408,
409, 425, 429, 5xx), a timeout or a dropped connection is retried by tenacity.
Every commit is recorded in ``.capstream/pushed.json`` once the Hub has accepted it, so a resumed run
or a later ``capstream push`` sends only what the Hub copy does not have yet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from ..config import Config, OutputConfig, push_every_seconds
from ..cost.meter import Prices
from ..errors import ConfigError, HubError
from ..model.retry import retry_after_s, transient_status
from ..patches.hf_hub_clients import bound_hub_calls
from .files import atomic_write_json, read_state
from .layout import STATE_DIR, OutputLayout, shard_index, shard_name
from .store import Manifest
from .summary import RunSummary

log = logging.getLogger("capstream.hub")

FILES_PER_COMMIT = 50  # a commit per 50 shards: each one small enough to go through, and recorded
ATTEMPTS = 4  # per Hub call; with the default 60 s timeout a silent Hub is given up in about 4 minutes
T = TypeVar("T")


# ------------------------------------------------------------------------------------ bounded calls


def _causes(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _status(err: BaseException) -> int | None:
    from huggingface_hub.errors import HfHubHTTPError

    for e in _causes(err):
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            return e.response.status_code
    return None


def _transport_error(err: BaseException) -> BaseException | None:
    import httpx2

    for e in _causes(err):
        if isinstance(e, (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)):
            return e
    return None


def _transient(err: BaseException) -> bool:
    status = _status(err)
    if status is not None:
        return transient_status(status)
    return _transport_error(err) is not None


def _scrub(text: str) -> str:
    """A token never reaches a message, even if a server echoed it."""
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "***") if token else text


def _translate(err: BaseException, what: str, target: "HubTarget") -> HubError:
    """huggingface_hub's and httpx2's errors, once, as a HubError that says what to do."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    later = f"; the local output is complete: push it later with `capstream push OUT_DIR {target.repo_id}`"
    status = _status(err)
    transport = _transport_error(err)
    if any(isinstance(e, OfflineModeIsEnabled) for e in _causes(err)):
        return HubError(f"{what}: HF_HUB_OFFLINE is set, nothing can be pushed{later}")
    if status in (401, 403):
        return HubError(f"{what}: the Hub refused (HTTP {status}): set HF_TOKEN to a token with write access "
                        f"to {target.repo_id}, or log in with `hf auth login`{later}")
    if status is not None:
        server = getattr(next((e for e in _causes(err) if hasattr(e, "server_message")), None), "server_message", None)
        return HubError(_scrub(f"{what}: HTTP {status}{f': {server}' if server else ''}{later}"))
    if isinstance(transport, httpx2.TimeoutException):
        return HubError(f"{what}: the Hub at {constants.ENDPOINT} did not answer within {target.timeout_s:g} s "
                        f"({ATTEMPTS} attempts){later}")
    if transport is not None:
        return HubError(_scrub(f"{what}: cannot reach the Hub at {constants.ENDPOINT}: "
                               f"{type(transport).__name__}: {transport}{later}"))
    return HubError(_scrub(f"{what}: {type(err).__name__}: {err}{later}"))


def _wait(retry_state) -> float:
    """Retry-After when the Hub sends one (capped), else exponential from 1 s."""
    from huggingface_hub.errors import HfHubHTTPError

    for e in _causes(retry_state.outcome.exception()):
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            asked = retry_after_s(e)  # the model requests' parser: seconds, milliseconds or a date
            if asked is not None:
                return min(60.0, asked)
    return wait_exponential(multiplier=1, min=1, max=30)(retry_state)


def _call(what: str, target: "HubTarget", fn: Callable[[], T]) -> T:
    """One Hub call with the retry policy; any failure comes out as a HubError."""
    try:
        for attempt in Retrying(retry=retry_if_exception(_transient), stop=stop_after_attempt(ATTEMPTS),
                                wait=_wait, reraise=True):
            with attempt:
                return fn()
    except HubError:
        raise
    except Exception as err:  # every library error is translated here, once
        raise _translate(err, what, target) from None
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------ the target


@dataclass
class HubTarget:
    """Where and how to push: a dataset repo, its branch, the config and split names shards get."""

    repo_id: str
    split: str
    private: bool = True
    config_name: str = "default"
    revision: str | None = None
    commit_message: str | None = None
    timeout_s: float = 60.0

    @classmethod
    def from_config(cls, out: OutputConfig, split: str, repo_id: str | None = None) -> "HubTarget":
        repo = repo_id or out.push_to_hub
        if not repo:
            raise ConfigError("output.push_to_hub: no repo to push to")
        return cls(repo_id=repo, split=out.split or split, private=out.private, config_name=out.config_name,
                   revision=out.revision, commit_message=out.commit_message, timeout_s=out.hub_timeout_s)

    @property
    def prefix(self) -> str:
        return "data" if self.config_name == "default" else self.config_name

    @property
    def key(self) -> str:
        return f"{self.repo_id}@{self.revision or 'main'}:{self.config_name}/{self.split}"

    def path_in_repo(self, chunk_index: int) -> str:
        return f"{self.prefix}/{shard_name(self.split, chunk_index)}"


@dataclass
class PushResult:
    repo_id: str
    commit: str | None
    shards_pushed: int  # by this call
    shards_on_hub: int  # of this run, in total
    url: str = ""


# ------------------------------------------------------------------------------------ the folder


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


@dataclass
class _Folder:
    """What a push needs from a run folder, read from disk (so a running engine is never touched)."""

    layout: OutputLayout
    config: Config
    manifest: Manifest
    summary: RunSummary

    @classmethod
    def read(cls, out_dir: str | Path) -> "_Folder":
        probe = OutputLayout(out_dir, "")  # the split is the manifest's
        manifest = Manifest.read(probe)
        saved = read_state(probe.saved_config)
        if manifest is None or saved is None:
            raise ConfigError(f"{probe.dir}: not a capstream output folder (no {STATE_DIR}/manifest.json)")
        try:
            config = Config.from_saved(saved)  # a run with prompts: saved beside the default prompt
        except (ValueError, ConfigError) as err:
            raise ConfigError(f"{probe.saved_config}: {err}") from None
        layout = OutputLayout(out_dir, manifest.split or config.dataset.split)
        return cls(layout, config, manifest, RunSummary.read(layout) or RunSummary())

    @property
    def dir(self) -> Path:
        return self.layout.dir

    @property
    def split(self) -> str:
        return self.layout.split

    def done_shards(self) -> dict[int, Path]:
        paths = {index: self.layout.shard_path(index) for index in sorted(self.manifest.done)}
        return {index: path for index, path in paths.items() if path.exists()}

    def summary_for(self, chunks: set[int]) -> RunSummary:
        """The summary a card for ``chunks`` (those on the Hub) shows: their counts and cost, the
        run's dates; the run's own cost (every answer paid) once every chunk is there."""
        complete = self.manifest.complete and chunks >= set(self.manifest.done)
        counts = self.manifest.totals(chunks)
        cost = self.summary.cost_usd if complete and self.summary.cost_usd is not None else counts.cost_usd
        return dataclasses.replace(
            RunSummary.of_counts(counts), complete=complete, cost_usd=cost,
            prices=self.summary.prices or Prices.of(self.config.model).as_dict(),
            started=self.summary.started, finished=self.summary.finished if complete else None,
            model=self.summary.model, endpoint=self.summary.endpoint)


def _front_matter(text: str) -> dict[str, Any]:
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


# ------------------------------------------------------------------------------------ pushing


class PushSession:
    """Pushes one folder to one target, as often as asked; each commit is recorded in the marker.

    Not thread-safe: one thread at a time (``HubExporter`` runs it on its own thread).
    """

    def __init__(self, out_dir: str | Path, target: HubTarget):
        self.dir = Path(out_dir)
        self.target = target
        self.marker_path = OutputLayout(out_dir, target.split).pushed
        self._prepared = False
        self._other_configs: list[dict[str, Any]] = []
        self._stale: list[str] = []  # files under our names that another run left in the repo

    def _marker(self) -> dict[str, Any]:
        data = read_state(self.marker_path) or {}
        return data if isinstance(data, dict) else {}

    def pushed(self) -> dict[str, list[int]]:
        """path in repo -> [size, mtime_ns] of the local shard it was pushed from."""
        return dict(self._marker().get(self.target.key, {}).get("files", {}))

    def _record(self, commit: str | None, files: dict[str, list[int]], card_sha256: str) -> None:
        data = self._marker()
        data[self.target.key] = {"repo_id": self.target.repo_id, "revision": self.target.revision,
                                 "commit": commit, "card_sha256": card_sha256, "files": files}
        atomic_write_json(self.marker_path, data)

    def _prepare(self, api, local_indices: set[int]) -> None:
        """Create the repo (and branch) if needed; learn what the repo's card and files already hold."""
        t = self.target
        _call(f"creating {t.repo_id}", t, lambda: api.create_repo(t.repo_id, repo_type="dataset", private=t.private,
                                                                   exist_ok=True))
        if t.revision and t.revision != "main":
            _call(f"creating branch {t.revision}", t,
                  lambda: api.create_branch(t.repo_id, branch=t.revision, repo_type="dataset", exist_ok=True))
        files = _call(f"listing {t.repo_id}", t, lambda: api.list_repo_files(t.repo_id, repo_type="dataset",
                                                                             revision=t.revision))
        # Shards under our names that this run will not write (left by another run): removed, so
        # the repo never mixes two runs' rows.
        ours = [(f, shard_index(f[len(t.prefix) + 1:], t.split)) for f in files if f.startswith(f"{t.prefix}/")]
        self._stale = [f for f, index in ours if index is not None and index not in local_indices]
        if "README.md" in files:
            path = _call(f"reading {t.repo_id}/README.md", t, lambda: api.hf_hub_download(
                t.repo_id, "README.md", repo_type="dataset", revision=t.revision))
            configs = _front_matter(Path(path).read_text(encoding="utf-8")).get("configs")
            self._other_configs = [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else []
        self._prepared = True

    def push(self) -> PushResult:
        """Commit every finished shard the Hub copy lacks (in batches), each with an up-to-date card."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

        from .card import CardLayout, render_card

        t = self.target
        folder = _Folder.read(self.dir)
        shards = folder.done_shards()
        api = HfApi()
        if not self._prepared:
            self._prepare(api, set(shards))
        pushed = self.pushed()
        pending = [(i, p) for i, p in shards.items() if pushed.get(t.path_in_repo(i)) != _stamp(p)]
        batches = [pending[i:i + FILES_PER_COMMIT] for i in range(0, len(pending), FILES_PER_COMMIT)] or [[]]
        layout = CardLayout(split=t.split, data_glob=f"{t.prefix}/{t.split}-*.parquet", config_name=t.config_name,
                            repo_id=t.repo_id, other_configs=self._other_configs)
        recorded = self._marker().get(t.key, {})
        commit, card_sha = recorded.get("commit"), recorded.get("card_sha256")
        for batch in batches:
            on_hub = {i for i in shards if t.path_in_repo(i) in pushed} | {i for i, _ in batch}
            card = render_card(folder.dir, folder.config, folder.summary_for(on_hub), layout,
                               shards=[shards[i] for i in sorted(on_hub)])
            if not batch and not self._stale and commit and hashlib.sha256(card.encode()).hexdigest() == card_sha:
                break  # the Hub copy is up to date: no empty commit
            ops: list[Any] = [CommitOperationAdd(t.path_in_repo(i), str(p)) for i, p in batch]
            ops.append(CommitOperationAdd("README.md", card.encode("utf-8")))
            ops += [CommitOperationDelete(f) for f in self._stale]
            rows = folder.manifest.totals(i for i, _ in batch).rows
            message = t.commit_message or (f"capstream: {len(batch)} shard(s) of {t.split} ({rows} rows)" if batch
                                           else "capstream: update the dataset card")
            info = _call(f"committing to {t.repo_id}", t, lambda: api.create_commit(
                t.repo_id, operations=ops, commit_message=message, repo_type="dataset", revision=t.revision))
            self._stale = []
            commit, card_sha = info.oid, hashlib.sha256(card.encode()).hexdigest()
            pushed.update({t.path_in_repo(i): _stamp(p) for i, p in batch})
            self._record(commit, pushed, card_sha)
            log.info("pushed %d shard(s) to %s (%d/%d of this run)", len(batch), t.repo_id,
                     sum(t.path_in_repo(i) in pushed for i in shards), len(shards))
        return PushResult(t.repo_id, commit, len(pending), sum(t.path_in_repo(i) in pushed for i in shards),
                          url=f"{api.endpoint}/datasets/{t.repo_id}")


def push_target(out_dir: str | Path, repo_id: str, **given: Any) -> HubTarget:
    """The target for ``capstream push``: options given win, then the run's saved ``output.*`` keys.

    ``given``: ``private``, ``revision``, ``config_name``, ``split``, ``commit_message``,
    ``timeout_s``; None means "not given".
    """
    folder = _Folder.read(out_dir)
    keys = {"timeout_s": "hub_timeout_s"}
    chosen = {keys.get(name, name): value for name, value in given.items() if value is not None}
    try:
        out = OutputConfig.model_validate({**folder.config.output.model_dump(), **chosen, "push_to_hub": repo_id})
    except ValueError as err:  # pydantic's validation error names the key
        raise ConfigError(str(err)) from None
    return HubTarget.from_config(out, folder.split)


def push_folder(out_dir: str | Path, target: HubTarget) -> PushResult:
    """Push a finished or partial run folder (``capstream push OUT_DIR REPO``); HubError on failure."""
    bound_hub_calls(target.timeout_s)  # huggingface_hub's own clients have no timeout
    return PushSession(out_dir, target).push()


# ------------------------------------------------------------------------------------ continuous export


@dataclass
class HubExporter:
    """Pushes finished shards in a background thread while the run goes on.

    ``chunk_written`` is the engine's hook (called in its event loop: it only counts and wakes the
    thread). A push is started every ``every_shards`` new shards and/or every ``every_s`` seconds
    with new shards; a failed push is logged and tried again at the next turn; ``finish()`` pushes
    what is left and raises HubError if that fails.
    """

    out_dir: str | Path
    target: HubTarget
    every_shards: int | None = None
    every_s: float | None = None
    last_error: HubError | None = None
    _new: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _wake: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        bound_hub_calls(self.target.timeout_s)  # huggingface_hub's own clients have no timeout
        self.session = PushSession(self.out_dir, self.target)
        if self.every_shards or self.every_s:
            self._thread = threading.Thread(target=self._loop, name="capstream-hub", daemon=True)
            self._thread.start()

    @classmethod
    def from_config(cls, out_dir: str | Path, out: OutputConfig, split: str) -> "HubExporter":
        shards, seconds = push_every_seconds(out.push_every)
        return cls(out_dir, HubTarget.from_config(out, split), every_shards=shards, every_s=seconds)

    def chunk_written(self, chunk_index: int) -> None:
        with self._lock:
            self._new += 1
            if self.every_shards and self._new >= self.every_shards:
                self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.every_s)  # woken by enough new shards, a stop, or the period
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                new, self._new = self._new, 0
            if not new:
                continue
            try:
                self.session.push()
                self.last_error = None
            except HubError as err:
                self.last_error = err
                log.warning("push to the Hub failed, tried again later: %s", err)
            except Exception as err:  # never let the export thread die silently
                self.last_error = HubError(f"push to the Hub failed: {type(err).__name__}: {err}")
                log.warning("%s", self.last_error)

    def stop(self) -> None:
        """Stop the background thread (an in-flight push finishes, bounded by the timeouts)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def finish(self) -> PushResult:
        """Stop the thread, then push everything not yet on the Hub; HubError when that fails."""
        self.stop()
        return self.session.push()
