"""``capstream run | validate | estimate``: a thin layer over the library.

Exit codes: 0 every row processed (rows with errors included), 1 the run stopped early (state saved,
rerun to resume), 2 bad config or arguments (nothing started), 130 stopped by Ctrl-C (resumable).
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import load_config
from .errors import ConfigError, RunStopped

EXIT_OK, EXIT_STOPPED, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capstream", description="Caption image datasets with vision language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="caption the dataset a config file describes (rerun to resume)")
    run.add_argument("config", help="YAML config file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a config key (repeatable), e.g. --set limits.max_concurrency=8")
    run.add_argument("--overwrite", action="store_true", help="discard the output folder's previous run and start again")
    run.add_argument("--retry-errors", action="store_true",
                     help="ask again only for the rows whose error is set, rewriting their shards")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    validate = sub.add_parser("validate", help="check a config file without reading data or sending requests")
    validate.add_argument("config")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")

    estimate = sub.add_parser("estimate", help="estimate a run's rows, tokens and cost; sends no request")
    estimate.add_argument("config")
    estimate.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    estimate.add_argument("--sample", type=int, metavar="N",
                          help="read only the first N rows and scale to the row count in the metadata")
    estimate.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _validate(args) -> int:
    from .models import check_model_config

    config = load_config(args.config, overrides=args.overrides)
    check_model_config(config.model)
    print(f"{args.config}: ok ({config.model.provider} {config.model.name}, dataset {config.dataset.path})")
    return EXIT_OK


def _estimate(args) -> int:
    import json

    from .estimate import estimate

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
    from .engine import Interrupted
    from .progress import format_summary

    config = load_config(args.config, overrides=args.overrides)
    try:
        result = run(config, overwrite=args.overwrite, retry_errors=args.retry_errors, show_progress=not args.no_progress, handle_signals=True)
    except Interrupted as err:
        print(format_summary(err.summary), file=sys.stderr)
        print(f"capstream: interrupted; rerun `capstream run {args.config}` to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RunStopped as err:
        summary = getattr(err, "summary", None)
        if summary:
            print(format_summary(summary), file=sys.stderr)
        print(f"capstream: stopped: {err}", file=sys.stderr)
        if summary:
            print(f"capstream: what was done is saved; rerun `capstream run {args.config}` to resume", file=sys.stderr)
        return EXIT_STOPPED
    print(format_summary(result.summary), file=sys.stderr)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="capstream: %(message)s")
    try:
        return {"run": _run, "validate": _validate, "estimate": _estimate}[args.command](args)
    except ConfigError as err:
        print(f"capstream: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
