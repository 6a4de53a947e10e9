"""``capstream view`` as a new user meets it: real runs (the demo; 2,000 rows with broken images and two
prompts through 429s), then the site opened from the file system in headless Chromium, offline.

Every test checks that the page logged no error and asked for nothing off the file system, and keeps
a screenshot of what it saw (test-artefacts/browser/)."""

from __future__ import annotations

import json
import os
import re
import shutil
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml

from capstream.testing.browser import ConsoleWatch, chromium, missing
from capstream.testing.openai_server import FakeOpenAI, RequestInfo

from conftest import REPO, make_rows, run_cli, size_of_row, write_config, write_parquet

pytestmark = pytest.mark.browser
plots = pytest.mark.skipif(find_spec("matplotlib") is None,
                           reason="the report's plots need the view extra: pip install -e '.[view]'")

ROWS, CHUNK, PAGE = 2000, 128, 50
BROKEN_EVERY = 50  # rows 49, 99, ...: ImageError for both prompts

# Screenshots of the pages the tests saw: a test artefact, not committed (.gitignore).
ARTEFACTS = Path(os.environ.get("CAPSTREAM_TEST_ARTEFACTS", REPO / "test-artefacts")) / "browser"


@pytest.fixture(scope="module")
def browser():
    reason = missing()
    if reason is not None:
        pytest.skip(f"browser tests {reason}")
    with chromium() as context:
        yield context


class Page:
    """One page of the browser, with its console errors and any request off the file system."""

    def __init__(self, context):
        self.page = context.new_page()
        self.console = ConsoleWatch(self.page)
        self.off_disk: list[str] = []
        self.page.on("request", lambda request: None if request.url.startswith(("file://", "data:"))
                     else self.off_disk.append(request.url))

    def open(self, path: Path) -> None:
        self.page.goto(path.resolve().as_uri())
        self.page.wait_for_load_state("load")

    def images_loaded(self) -> None:
        self.page.wait_for_function("[...document.images].every(i => i.complete)")

    def problems(self) -> list[str]:
        return self.console.errors + [f"request off the file system: {url}" for url in self.off_disk]

    def screenshot(self, name: str) -> Path:
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTEFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def page(browser):
    opened = Page(browser)
    yield opened
    opened.page.close()


def refused_by_the_server(i: int) -> bool:
    """The tags prompt of these rows gets an HTTP 400 (a RequestError of that prompt alone)."""
    return size_of_row(i)[0] % 97 == 0 and i % BROKEN_EVERY != BROKEN_EVERY - 1


def view(out: Path, cwd: Path = REPO) -> Path:
    result = run_cli("view", str(out), cwd=cwd)
    assert result.returncode == 0, result.stderr
    return Path(cwd, result.stdout.splitlines()[0])


@pytest.fixture(scope="module")
def demo_site(tmp_path_factory):
    """``capstream run configs/demo.yaml`` then ``capstream view out/demo``, from a copy of the repository's configs."""
    work = tmp_path_factory.mktemp("demo")
    shutil.copytree(REPO / "configs", work / "configs")
    assert run_cli("run", "configs/demo.yaml", cwd=work).returncode == 0
    return view(Path("out/demo"), cwd=work)


@pytest.fixture(scope="module")
def big_site(tmp_path_factory):
    """2,000 rows (every 50th image broken) asked two prompts, through 3% random 429s, an announced
    rate limit and a price: a run as a user would make it, then its view."""
    work = tmp_path_factory.mktemp("big")
    rows, _ = make_rows(ROWS, broken_every=BROKEN_EVERY)
    data = write_parquet(work / "src.parquet", rows)

    def reply(info: RequestInfo) -> str:
        if (info.body or {}).get("response_format"):
            return json.dumps({"tags": [f"w{info.width}", f"h{info.height}"], "wide": info.width > info.height})
        return f"image {info.width}x{info.height}"

    def status_for(info: RequestInfo) -> int | None:
        return 400 if (info.body or {}).get("response_format") and info.width % 97 == 0 else None

    with FakeOpenAI(p429=0.03, rpm_limit=100_000, reply=reply, status_for=status_for, seed=5) as server:
        config = write_config(work / "c.yaml", server.url, data, work / "out", run={"chunk_size": CHUNK},
                              limits={"max_concurrency": 16, "requests_per_minute": 120_000},
                              model={"price_input_per_mtok": 0.15, "price_output_per_mtok": 0.60})
        spec = yaml.safe_load(config.read_text())
        spec["prompts"] = {"caption": {"text": "Describe this image."},
                           "tags": {"text": "Tag this image.", "schema": {"tags": "list[string]", "wide": "boolean"}}}
        config.write_text(yaml.safe_dump(spec))
        result = run_cli("run", str(config))
        assert result.returncode == 0, result.stderr
        assert server.by_status[429] > 0
    return view(work / "out")


def thumbnails_shown(page) -> int:
    return page.page.eval_on_selector_all("#grid img.thumb", "imgs => imgs.filter(i => i.complete && i.naturalWidth > 0).length")


def keys_shown(page) -> list[str]:
    return page.page.eval_on_selector_all("#grid .row-key", "nodes => nodes.map(n => n.textContent)")


def wait_for_keys(page, keys: list[str]) -> None:
    """Until the grid shows exactly these rows (a search or filter may still be running)."""
    page.page.wait_for_function("keys => JSON.stringify([...document.querySelectorAll('#grid .row-key')]"
                                ".map(n => n.textContent)) === JSON.stringify(keys)", arg=keys)
    page.images_loaded()


def wait_for(page, element: str, text: str) -> None:
    page.page.wait_for_function("([id, text]) => document.getElementById(id).textContent === text", arg=[element, text])
    page.images_loaded()


@plots
def test_the_demo_opens_offline_with_every_thumbnail_and_its_report(demo_site, page):
    page.open(demo_site)
    page.page.wait_for_selector("#grid .card")
    page.images_loaded()
    assert len(keys_shown(page)) == 12 and thumbnails_shown(page) == 12
    assert "complete" in page.page.inner_text("#status")
    page.screenshot("demo-gallery")
    page.page.click("#grid .card >> nth=0")
    detail = page.page.inner_text("#detail")
    assert page.page.is_visible("#detail") and "mock caption" in detail and "latency" in detail
    page.open(demo_site.parent / "report.html")
    plots = page.page.eval_on_selector_all("img.plot", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
    assert len(plots) >= 4 and all(plots)
    page.screenshot("demo-report")
    assert page.problems() == []


@pytest.mark.slow
def test_every_row_is_reachable_across_the_shards(big_site, page):
    page.open(big_site)
    wait_for(page, "shown", f"rows 1\u201350 of {ROWS:,}")
    # The first page: a thumbnail for every row but the broken one, which shows its error instead.
    assert thumbnails_shown(page) == PAGE - 1
    assert page.page.eval_on_selector_all("#grid .image-error", "nodes => nodes.map(n => n.textContent)")[0].startswith(
        "ImageError")
    page.screenshot("big-gallery")
    seen = []
    pages = ROWS // PAGE
    for number in range(1, pages + 1):
        wait_for(page, "page-info", f"page {number} of {pages}")
        seen += keys_shown(page)
        if number == 3:  # rows 100-149 come from two shards (chunks of 128)
            assert keys_shown(page)[27:29] == ["row 127", "row 128"]
        if number < pages:
            page.page.click("#next")
    assert seen == [f"row {i}" for i in range(ROWS)]
    page.page.fill("#goto", "17")
    page.page.dispatch_event("#goto", "change")
    wait_for(page, "page-info", f"page 17 of {pages}")
    assert keys_shown(page)[0] == f"row {16 * PAGE}"
    assert page.problems() == []


@pytest.mark.slow
def test_error_rows_are_two_clicks_away(big_site, page):
    broken = [i for i in range(ROWS) if i % BROKEN_EVERY == BROKEN_EVERY - 1]
    refused = [i for i in range(ROWS) if refused_by_the_server(i)]
    errors = sorted(broken + refused)
    page.open(big_site)
    wait_for(page, "shown", f"rows 1\u201350 of {ROWS:,}")
    page.page.click("#errors-only")  # one
    wait_for(page, "shown", f"rows 1\u2013{min(PAGE, len(errors))} of {len(errors)} (of {ROWS:,})")
    assert keys_shown(page) == [f"row {i}" for i in errors[:PAGE]]
    assert page.page.eval_on_selector_all("#grid .card", "cards => cards.every(c => c.classList.contains('has-error'))")
    page.screenshot("big-errors")
    page.page.click("#grid .card >> nth=0")  # two: the row, large, with its error
    detail = page.page.inner_text("#detail")
    kind = "ImageError" if errors[0] in broken else "RequestError: HTTP 400"
    assert page.page.is_visible("#detail") and f"row {errors[0]}" in detail and kind in detail
    page.screenshot("big-error-row")
    page.page.keyboard.press("ArrowRight")  # the next error row, without closing
    page.page.wait_for_function("key => document.querySelector('#detail .row-key')?.textContent === key",
                                arg=f"row {errors[1]}")
    page.page.click("#close")
    # By kind, and by prompt: the server refused only the tags prompt of some rows.
    page.page.select_option("#kind", "ImageError")
    wait_for_keys(page, [f"row {i}" for i in broken])
    assert page.page.inner_text("#shown") == f"rows 1\u2013{len(broken)} of {len(broken)} (of {ROWS:,})"
    page.page.select_option("#kind", "RequestError")
    wait_for_keys(page, [f"row {i}" for i in refused])
    page.page.select_option("#kind", "")
    page.page.select_option("#prompt", "caption")  # the caption prompt failed only where the image did
    wait_for_keys(page, [f"row {i}" for i in broken[:PAGE]])
    page.page.select_option("#prompt", "tags")
    wait_for_keys(page, [f"row {i}" for i in errors[:PAGE]])
    assert page.problems() == []


@pytest.mark.slow
def test_search_finds_answers_and_keys(big_site, page):
    page.open(big_site)
    wait_for(page, "shown", f"rows 1\u201350 of {ROWS:,}")
    width, height = size_of_row(123)
    page.page.fill("#search", f"{width}x{height}")  # row 123's caption, and no other's
    wait_for_keys(page, ["row 123"])
    assert page.page.inner_text("#shown") == f"rows 1\u20131 of 1 (of {ROWS:,})"
    assert page.page.inner_text("#grid .card").count(f"image {width}x{height}") == 1
    page.page.fill("#search", "row 1999")  # a key
    wait_for_keys(page, ["row 1999"])
    page.page.fill("#search", f"w{width}")  # a tag: every row of that width
    expected = [i for i in range(ROWS) if size_of_row(i)[0] == width and i % BROKEN_EVERY != BROKEN_EVERY - 1
                and not refused_by_the_server(i)]
    wait_for_keys(page, [f"row {i}" for i in expected])
    assert page.page.inner_text("#shown") == f"rows 1\u2013{len(expected)} of {len(expected)} (of {ROWS:,})"
    page.screenshot("big-search")
    # Sorted by the caption's length: "image WxH" is longest with a 3-digit width (rows 36 on), shortest
    # when there is none (row 49's image is broken).
    page.page.fill("#search", "")
    page.page.select_option("#prompt", "caption")
    page.page.select_option("#sort", "long")
    page.page.wait_for_function("document.querySelector('#grid .row-key')?.textContent === 'row 36'")
    page.page.select_option("#sort", "short")
    page.page.wait_for_function("document.querySelector('#grid .row-key')?.textContent === 'row 49'")
    assert page.problems() == []


@pytest.mark.slow
@plots
def test_the_report_shows_rate_retries_and_cost_over_time(big_site, page):
    page.open(big_site.parent / "report.html")
    page.images_loaded()
    plots = page.page.eval_on_selector_all("img.plot", "imgs => imgs.map(i => [i.src.split('/').pop(), "
                                                       "i.complete && i.naturalWidth > 0])")
    assert dict(plots).keys() >= {"rate.svg", "latency.svg", "retries.svg", "limits.svg", "tokens.svg", "errors.svg"}
    assert all(loaded for _, loaded in plots)
    series = {name: re.findall(r'id="(series-[^"]+)"', (big_site.parent / "report" / name).read_text())
              for name, _ in plots}
    assert "series-rows" in series["rate.svg"]  # rows per second
    assert any(s.startswith("series-retries-0-") for s in series["retries.svg"])  # retries after 429s
    assert "series-cost" in series["tokens.svg"]  # cost over time
    assert "series-limit-requests" in series["limits.svg"]  # the limit in force
    text = page.page.inner_text("main")
    assert "announced: 1" in text and "prompt tags" in text and "RequestError" in text
    page.screenshot("big-report")
    assert page.problems() == []


def test_answers_are_shown_as_text_never_as_markup(tmp_path, page):
    rows, _ = make_rows(4)
    data = write_parquet(tmp_path / "src.parquet", rows)
    markup = '<img src="x" onerror="document.title=\'owned\'"><b>bold</b>'
    with FakeOpenAI(reply=lambda info: markup) as server:
        config = write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out")
        assert run_cli("run", str(config)).returncode == 0
    page.open(view(tmp_path / "out"))
    page.page.wait_for_selector("#grid .card")
    page.images_loaded()
    assert page.page.eval_on_selector_all("#grid b", "nodes => nodes.length") == 0
    assert page.page.inner_text("#grid .card .value") == markup
    assert page.page.title() != "owned" and page.problems() == []


def test_a_partial_run_of_the_previous_release_shows_what_is_done(tmp_path, page):
    out = tmp_path / "out"
    shutil.copytree(REPO / "tests" / "data" / "previous_release" / "out", out)
    page.open(view(out))
    wait_for(page, "shown", "rows 1\u201321 of 21")
    assert page.page.eval_on_selector_all("#grid .pending", "nodes => nodes.length") == 5
    assert "not complete" in page.page.inner_text("#status")
    page.screenshot("previous-release-gallery")
    page.open(out / "view" / "report.html")
    assert "Not recorded" in page.page.inner_text("main")
    page.screenshot("previous-release-report")
    assert page.problems() == []
