#!/usr/bin/env python
"""How long the append that seals a results-log segment takes (an fsync, a rename and the
segment's summary, counted as answers were appended), and after how many answers it comes.
Answers of a paragraph each.

    python scripts/seal_pause.py
"""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from capstream.results import PromptAnswer  # noqa: E402
from capstream.store import RunStore  # noqa: E402

CAPTION = "A detailed paragraph describing the image: " + "words " * 50


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = RunStore(folder, "train")
        store.open({"bench": 1}, 1000)
        answers, slowest = 0, 0.0
        while not any(store.state.glob("results.0*.jsonl.summary.json")):
            started = time.perf_counter()
            store.log_answer(answers // 1000, answers, "caption", PromptAnswer(CAPTION, None, 1200, 90))
            slowest = max(slowest, time.perf_counter() - started)
            answers += 1
        store.close()
    print(f"sealed after {answers} answers of {len(CAPTION)} characters; the sealing append took {slowest:.2f} s")


if __name__ == "__main__":
    main()
