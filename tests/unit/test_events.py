"""What the sending side reports as it happens (model/events.py), and the events log that keeps it."""

from __future__ import annotations

import asyncio
import json
import pickle

import pytest

from capstream.config import Config, config_from_dict
from capstream.errors import Failure, RequestFailed, RunStopped
from capstream.io.events_log import EventsLog, RunMark, read_events
from capstream.io.layout import OutputLayout
from capstream.io.store import RunStore
from capstream.model.call import Answer, ImageRequest
from capstream.model.events import AttemptFailed, LimitChanged
from capstream.model.limits import RateLimits
from capstream.model.sending import Refusal, Sender, Usage


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_every_move_of_a_limit_is_reported():
    clock, seen = Clock(), []

    async def main():  # a limiter's rate changes on the loop that uses it
        limits = RateLimits(requests_per_minute=600, clock=clock, observer=seen.append)
        limits.observe({"x-ratelimit-limit-requests": "300"}, rate_limited=False)  # announced: lower
        clock.now = 10.0
        limits.observe({"x-ratelimit-remaining-requests": "0"}, rate_limited=True)  # over the limit: cut by 30%
        clock.now = 25.0
        limits.observe({}, rate_limited=False)  # grows back 5%

    asyncio.run(main())
    moves = [(e.limit, round(e.per_minute, 3), e.reason) for e in seen]
    assert moves == [("requests", 600.0, "configured"), ("requests", 300.0, "announced"),
                     ("requests", 210.0, "slowed"), ("requests", 220.5, "recovered")]
    assert all(isinstance(e, LimitChanged) and e.at > 1e9 for e in seen)  # unix times, for the report


def test_limits_without_an_observer_report_nothing_and_still_adapt():
    async def main():
        limits = RateLimits(tokens_per_minute=1000, clock=Clock())
        limits.observe({"x-ratelimit-limit-tokens": "500"}, rate_limited=False)
        return limits

    limits = asyncio.run(main())
    assert limits.tokens.rate == 500 and limits.tokens.observer is None


class ScriptedCall:
    """A model call that fails as told, then answers."""

    def __init__(self, failures: list[RequestFailed]):
        self.failures = list(failures)

    async def __call__(self, request: ImageRequest) -> Answer:
        if self.failures:
            raise self.failures.pop(0)
        return Answer("a cat", 10, 2)

    async def aclose(self) -> None:
        pass


def send(failures: list[RequestFailed], max_attempts: int = 4) -> tuple[list, object]:
    seen: list = []

    async def main():
        sender = Sender(ScriptedCall(failures), RateLimits(), usage=Usage(), max_concurrency=2,
                        max_attempts=max_attempts, max_wait_s=0.01, stopping=asyncio.Event(),
                        refusal=Refusal("fake", "m"), observer=seen.append)
        try:
            return await sender.send(ImageRequest("caption", None, "data:,", "low"), 100)
        except (RequestFailed, RunStopped) as err:
            return err

    return seen, asyncio.run(main())


def _rate_limited() -> RequestFailed:
    return RequestFailed(Failure.TRANSIENT, "slow down", status=429, retry_after_s=0)


def test_the_sender_reports_each_failed_attempt_and_nothing_for_a_success():
    seen, answer = send([_rate_limited(), RequestFailed(Failure.TRANSIENT, "dropped", retry_after_s=0)])
    assert isinstance(answer, Answer) and answer.attempts == 3
    assert [(e.status, e.failure, e.attempt, e.retried) for e in seen] == [(429, "transient", 1, True),
                                                                             (None, "transient", 2, True)]
    assert all(isinstance(e, AttemptFailed) for e in seen)
    seen, answer = send([])
    assert seen == [] and isinstance(answer, Answer)


def test_a_failure_not_retried_says_so():
    seen, failed = send([RequestFailed(Failure.ROW, "bad image", status=400)])
    assert isinstance(failed, RequestFailed)
    assert [(e.status, e.failure, e.retried) for e in seen] == [(400, "row", False)]
    seen, stopped = send([_rate_limited(), _rate_limited()], max_attempts=2)  # the last attempt is not retried
    assert isinstance(stopped, RunStopped)
    assert [(e.attempt, e.retried) for e in seen] == [(1, True), (2, False)]


def test_the_events_log_keeps_every_kind_and_reads_back_in_time_order(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventsLog(path)
    events = [RunMark("started", backend="local", resumed=True, at=3.0),
              AttemptFailed(429, "transient", 1, True, at=4.0), LimitChanged("tokens", 9000.0, "slowed", at=5.0),
              AttemptFailed(None, "transient", 2, False, at=3.5), RunMark("stopped", detail="budget", at=6.0)]
    for event in events:
        log(event)
    log.close()
    with open(path, "a") as f:
        f.write('{"e": "something-new", "t": 7}\n{"e": "attempt", "t": 8, "s"')  # an unknown kind, a cut line
    found = read_events([path])
    assert found.logs == 1
    assert found.attempts == [events[3], events[1]]
    assert found.limits == [events[2]]
    assert found.marks == [events[0], events[4]]
    again = EventsLog(path)  # a later run appends after the cut line, which is removed first
    again(RunMark("started", at=9.0))
    again.close()
    assert [m.at for m in read_events([path]).marks] == [3.0, 6.0, 9.0]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_an_events_log_travels_to_another_process_unopened_and_never_raises(tmp_path, caplog):
    log = EventsLog(tmp_path / "events.jsonl")
    copy = pickle.loads(pickle.dumps(log))  # a Ray actor's copy: its own file handle, opened there
    copy(RunMark("started"))
    copy.close()
    assert len(read_events([tmp_path / "events.jsonl"]).marks) == 1
    broken = EventsLog(tmp_path / "no-such-folder" / "events.jsonl")
    broken(RunMark("started"))  # the report loses it; the run goes on
    broken(RunMark("stopped"))
    assert "cannot write" in caplog.text and caplog.text.count("cannot write") == 1


def test_overwrite_discards_the_events_of_the_run_it_discards(tmp_path):
    layout = OutputLayout(tmp_path / "out", "train")
    store = RunStore(layout)
    store.open({"a": 1}, 10)
    EventsLog(layout.events_log())(RunMark("started"))
    EventsLog(layout.events_log("events-ray-0"))(RunMark("started"))
    assert len(layout.events_logs()) == 2
    RunStore(layout).open({"a": 1}, 10, overwrite=True)
    assert layout.events_logs() == []


TWO_PROMPTS = {"caption": {"text": "Caption."}, "tags": {"schema": {"tags": "list[string]"}}}


@pytest.mark.parametrize("prompts", [None, TWO_PROMPTS])
def test_a_saved_config_reads_back(prompts):
    config = config_from_dict({"model": {"provider": "mock"}, **({"prompts": prompts} if prompts else {})})
    again = Config.from_saved(json.loads(json.dumps(config.redacted())))
    assert again.prompt_specs() == config.prompt_specs()
