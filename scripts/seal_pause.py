#!/usr/bin/env python
"""How long the append that seals a results-log segment takes (an fsync, a rename and the
segment's summary, counted as answers were appended), and after how many answers it comes.
Answers of a paragraph each.

    python scripts/seal_pause.py
"""

import tempfile
import time
from pathlib import Path

from capstream.io.results_log import LogRecord, ResultsLog
from capstream.row.results import PromptAnswer

CAPTION = "A detailed paragraph describing the image: " + "words " * 50


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        log = ResultsLog(Path(folder) / "results.jsonl")
        answers, slowest = 0, 0.0
        while not any(Path(folder).glob("results.0*.jsonl.summary.json")):
            started = time.perf_counter()
            log.append(LogRecord.of(answers // 1000, answers, "caption", PromptAnswer(CAPTION, None, 1200, 90)))
            slowest = max(slowest, time.perf_counter() - started)
            answers += 1
        log.close()
    print(f"sealed after {answers} answers of {len(CAPTION)} characters; the sealing append took {slowest:.2f} s")


if __name__ == "__main__":
    main()
