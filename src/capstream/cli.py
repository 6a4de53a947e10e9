"""``capstream run | validate | estimate | preview | push | status | cancel | view``: a thin layer over the library.

Exit codes: 0 every row processed (rows with errors included), 1 the run stopped early (state saved,
rerun to resume), 2 bad config or arguments (nothing started), 130 stopped by Ctrl-C (resumable).

The terminal shows the progress bar, capstream's warnings (each once, above the bar) and the
report; ``--log-file PATH`` appends the full log there as well: every row's error, every retry,
every library's warnings, the report.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .config import load_config
from .errors import ConfigError, HubError, Interrupted, RunStopped

EXIT_OK, EXIT_STOPPED, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130
log = logging.getLogger("capstream")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capstream", description="Caption image datasets with vision language models.")
    parser.add_argument("--version", action="version", version=f"capstream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="caption the dataset a config file describes (rerun to resume)")
    run.add_argument("config", help="YAML config file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a config key (repeatable), e.g. --set limits.max_concurrency=8")
    run.add_argument("--overwrite", action="store_true", help="discard the output folder's previous run and start again")
    run.add_argument("--retry-errors", action="store_true",
                     help="ask again only for the rows whose error is set, rewriting their shards")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--log-file", metavar="PATH",
                     help="append the full log (every row's error, every retry) to PATH")

    validate = sub.add_parser("validate", help="check a config file without reading data or sending requests")
    validate.add_argument("config")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")

    estimate = sub.add_parser("estimate", help="estimate a run's rows, tokens and cost; sends no request")
    estimate.add_argument("config")
    estimate.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    estimate.add_argument("--sample", type=int, metavar="N",
                          help="read only the first N rows and scale to the row count in the metadata")
    estimate.add_argument("--json", action="store_true", help="print one JSON object")

    preview = sub.add_parser("preview", help="ask the model about a few rows and project the whole dataset's cost; "
                                              "writes nothing into output.dir")
    preview.add_argument("config")
    preview.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    preview.add_argument("-n", "--rows", type=int, default=5, metavar="N", help="rows to ask about (default 5)")
    preview.add_argument("--sample", action="store_true", help="N rows picked at random instead of the first N")
    preview.add_argument("--seed", type=int, help="with --sample: the same rows again")
    preview.add_argument("--log-file", metavar="PATH", help="append the full log to PATH")

    status = sub.add_parser("status", help="show a batch run's request files and their batches (run.backend: batch)")
    status.add_argument("out_dir", help="the run's output folder (output.dir)")
    status.add_argument("--offline", action="store_true", help="as the folder last saw them: ask the provider nothing")
    cancel = sub.add_parser("cancel", help="cancel a batch run's batches at the provider (rerun to submit the rest)")
    cancel.add_argument("out_dir", help="the run's output folder (output.dir)")

    push = sub.add_parser("push", help="push a run's output folder (finished or partial) to a Hub dataset repo")
    push.add_argument("out_dir", help="the run's output folder (output.dir)")
    push.add_argument("repo", help="Hub dataset id, e.g. user/name")
    visibility = push.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=None,
                            help="create the repo private (the default, unless the run's config says otherwise)")
    visibility.add_argument("--public", dest="private", action="store_false", help="create the repo public")
    push.add_argument("--revision", help="branch to push to (created if missing)")
    push.add_argument("--config-name", help="the dataset config the shards belong to (default: default)")
    push.add_argument("--split", help="the split name on the Hub (default: the run's split)")
    push.add_argument("--commit-message", help="message of every commit")
    push.add_argument("--timeout", type=float, metavar="S", help="timeout of every Hub request in seconds")

    view = sub.add_parser("view", help="write a gallery of the answers and a run report into OUT_DIR/view/ "
                                       "(a static site: opens offline, from the file system)")
    view.add_argument("out_dir", help="the run's output folder (output.dir), finished or partial")
    view.add_argument("--serve", action="store_true", help="also serve it on 127.0.0.1 until Ctrl-C")
    view.add_argument("--port", type=_port, default=0, help="with --serve: the port (default: a free one)")
    view.add_argument("--open", action="store_true", help="open it in the default browser")
    return parser


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError("a port is 0 (any free one) to 65535")
    return port


def _validate(args) -> int:
    from .io.source import check_local_paths

    config = load_config(args.config, overrides=args.overrides)
    config.model.api_key()  # everything else was checked as it loaded, but the files it names
    check_local_paths(config.dataset)
    print(f"{args.config}: ok ({config.model.provider} {config.model.name}, dataset {config.dataset.path})")
    return EXIT_OK


def _estimate(args) -> int:
    import json

    from .cost.estimate import estimate

    config = load_config(args.config, overrides=args.overrides)
    try:
        result = estimate(config, sample=args.sample)
    except RunStopped as err:
        print(f"capstream: {err}", file=sys.stderr)
        return EXIT_STOPPED
    print(json.dumps(result.as_dict()) if args.json else result.format())
    return EXIT_OK


def _run(args) -> int:
    from .api import run
    from .core.progress import format_summary

    config = load_config(args.config, overrides=args.overrides)
    try:
        result = run(config, overwrite=args.overwrite, retry_errors=args.retry_errors, show_progress=not args.no_progress, handle_signals=True)
    except Interrupted as err:
        _report(format_summary(err.summary))
        _report(f"capstream: interrupted; rerun `capstream run {args.config}` to resume")
        return EXIT_INTERRUPTED
    except RunStopped as err:
        if err.summary is not None:
            _report(format_summary(err.summary))
        _report(f"capstream: stopped: {err}")
        if err.summary is not None:
            _report(f"capstream: what was done is saved; rerun `capstream run {args.config}` to resume")
        return EXIT_STOPPED
    _report(format_summary(result.summary, f"capstream run {args.config}"))
    return EXIT_OK


def _report(text: str) -> None:
    """Lines for the terminal (stderr), and for the log file when there is one."""
    print(text, file=sys.stderr)
    log.info("%s", text)


def _log_to(log_file: str | None) -> None:
    """Warnings on the terminal, each once: capstream's with its prefix, written above the progress
    bar; other libraries print theirs with their own handlers (huggingface_hub, datasets), or
    Python's last resort. With ``log_file``: everything from INFO up, every library's, to the file.
    Called again (``main`` twice in one process), it replaces what it installed."""
    for logger in (log, logging.getLogger()):
        for handler in [h for h in logger.handlers if isinstance(h, (_AboveTheBar, _LogFile))]:
            logger.removeHandler(handler)
            handler.close()
    terminal = _AboveTheBar()
    terminal.setLevel(logging.WARNING)
    terminal.setFormatter(logging.Formatter("capstream: %(message)s"))
    log.addHandler(terminal)
    log.setLevel(logging.INFO if log_file else logging.WARNING)
    if log_file:
        try:
            to_file = _LogFile(log_file, encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"--log-file {log_file}: {err.strerror or err}") from None
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(to_file)
        logging.getLogger().setLevel(logging.INFO)
        for chatty in ("httpx", "httpx2"):  # a line per request, with a URL's credentials in it: warnings only
            logging.getLogger(chatty).setLevel(logging.WARNING)


class _LogFile(logging.FileHandler):
    """The file of ``--log-file``."""


class _AboveTheBar(logging.Handler):
    """Writes through tqdm, so that a warning does not cut the progress bar in two."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # as logging.StreamHandler does: a broken stderr must not stop the run
            self.handleError(record)


def _preview(args) -> int:
    from .preview import preview

    config = load_config(args.config, overrides=args.overrides)
    try:
        result = preview(config, rows=args.rows, sample=args.sample, seed=args.seed)
    except RunStopped as err:
        _report(f"capstream: stopped: {err}")
        return EXIT_STOPPED
    print(result.format())
    return EXIT_OK


def _status(args) -> int:
    from .api import batch_status

    try:
        files = batch_status(args.out_dir, live=not args.offline)
    except RunStopped as err:
        print(f"capstream: {err}", file=sys.stderr)
        return EXIT_STOPPED
    for f in files:
        seen = f" ({f.completed:,} done, {f.failed:,} failed)" if f.batch_id and f.state != "collected" else ""
        collected = (", ".join(f"{v:,} {k}" for k, v in f.counts.items() if v) if f.state == "collected" else "")
        print(f"{f.name}  {f.requests:,} requests  {f.state}{seen}  {f.batch_id or '-'}  {collected}".rstrip())
    states = {}
    for f in files:
        states[f.state] = states.get(f.state, 0) + 1
    print(f"{len(files)} request file(s): " + ", ".join(f"{n} {state}" for state, n in states.items()))
    return EXIT_OK


def _cancel(args) -> int:
    from .api import cancel_batches

    try:
        cancelled = cancel_batches(args.out_dir)
    except RunStopped as err:
        print(f"capstream: {err}", file=sys.stderr)
        return EXIT_STOPPED
    for batch_id in cancelled:
        print(f"cancelled {batch_id}")
    print(f"capstream: {len(cancelled)} batch(es) cancelled; a rerun collects what they answered and submits the "
          "rest again", file=sys.stderr)
    return EXIT_OK


def _push(args) -> int:
    from .io.hub import push_folder, push_target

    target = push_target(args.out_dir, args.repo, private=args.private, revision=args.revision,
                         config_name=args.config_name, split=args.split, commit_message=args.commit_message,
                         timeout_s=args.timeout)
    try:
        result = push_folder(args.out_dir, target)
    except HubError as err:
        print(f"capstream: push failed: {err}", file=sys.stderr)
        return EXIT_STOPPED
    print(f"capstream: {result.shards_on_hub} shard(s) on {result.url} ({result.shards_pushed} pushed now; "
          f"commit {result.commit})", file=sys.stderr)
    return EXIT_OK


def _view(args) -> int:
    import webbrowser

    from .view import build_view

    try:
        site = build_view(args.out_dir)
    except RunStopped as err:  # a log that cannot be read
        print(f"capstream: {err}", file=sys.stderr)
        return EXIT_STOPPED
    except OSError as err:
        print(f"capstream: cannot write the view into {args.out_dir}: {err.strerror or err}", file=sys.stderr)
        return EXIT_STOPPED
    print(site.index, flush=True)
    print(f"capstream: {site.rows} rows ({site.error_rows} with errors, {site.pending_rows} in chunks not written "
          f"yet), {site.thumbnails_made} thumbnails made, in {site.seconds:.1f}s; run report: {site.report}",
          file=sys.stderr)
    if not args.serve:
        if args.open:
            webbrowser.open(site.index.resolve().as_uri())
        return EXIT_OK
    from .view.serve import open_server, server_url

    try:
        server = open_server(site.index.parent, args.port)
    except OSError as err:
        print(f"capstream: cannot serve on 127.0.0.1:{args.port}: {err.strerror or err}", file=sys.stderr)
        return EXIT_CONFIG
    url = server_url(server)
    print(url, flush=True)
    print("capstream: serving until Ctrl-C", file=sys.stderr, flush=True)
    if args.open:
        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _log_to(getattr(args, "log_file", None))
        return {"run": _run, "validate": _validate, "estimate": _estimate, "preview": _preview,
                "push": _push, "status": _status, "cancel": _cancel, "view": _view}[args.command](args)
    except ConfigError as err:
        _report(f"capstream: config error: {err}")
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
