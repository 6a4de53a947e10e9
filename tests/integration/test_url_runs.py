"""Runs over image URLs served by the fake image host on 127.0.0.1, through the real ChatOpenAI path.

The host is on 127.0.0.1, which capstream refuses by default: every test that fetches from it sets
``image.allow_private_urls: true``, except the one showing the refusal.
"""

from __future__ import annotations

import io
import json
import os

import datasets
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capstream import Captioner
from capstream.config import ImageConfig
from capstream.row.downloads import embedded_images
from capstream.row.images import KeptFiles
from capstream.testing.image_host import FakeImageHost

from conftest import FEATURES, expected_caption, jpeg, run_cli, size_of_row, write_config

URL_FEATURES = datasets.Features({"id": datasets.Value("int64"), "url": datasets.Value("string"),
                                  "alt": datasets.Value("string")})
ALLOW = {"allow_private_urls": True}


def noise_jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def image_of_row(i: int) -> bytes:
    return jpeg(*size_of_row(i), colour=(i % 256, 80, 160))


@pytest.fixture
def host():
    with FakeImageHost() as server:
        yield server


def url_rows(host: FakeImageHost, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        host.images[f"/img/{i}.jpg"] = image_of_row(i)
        rows.append({"id": i, "url": host.url(f"/img/{i}.jpg") + f"?token=secret{i}", "alt": f"row {i}"})
    return rows


def url_parquet(tmp_path, rows, features=URL_FEATURES):
    path = tmp_path / "urls.parquet"
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path


def test_url_rows_are_captioned_with_retries_404s_and_opt_outs(server, host, tmp_path):
    rows = url_rows(host, 120)
    missing, flaky, opted = {7, 50}, {3, 30, 99}, {11: "noai", 12: "capstream: noimageai", 13: "otherbot: noai"}
    host.missing |= {f"/img/{i}.jpg" for i in missing}
    host.fail_first |= {f"/img/{i}.jpg" for i in flaky}
    host.opt_out.update({f"/img/{i}.jpg": tag for i, tag in opted.items()})
    host.latency = 0.02
    config = write_config(tmp_path / "c.yaml", server.url, url_parquet(tmp_path, rows), tmp_path / "out",
                          dataset={"image_column": "url"}, image=ALLOW, run={"chunk_size": 32})
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    out = load_out_urls(tmp_path / "out")
    assert [r["id"] for r in out] == list(range(120)) and [r["url"] for r in out] == [r["url"] for r in rows]
    for i, row in enumerate(out):
        if i in missing:
            assert row["caption"] is None
            assert row["error"] == f"ImageError: download failed: HTTP 404 for http://127.0.0.1:{host.port}/img/{i}.jpg?***"
        elif i in (11, 12):
            assert row["caption"] is None and row["error"].startswith("ImageError: opted out: "), row
            assert "X-Robots-Tag" in row["error"] and "not sent to the model" in row["error"]
        else:
            assert row["error"] is None and row["caption"] == expected_caption(i), row
    # Each image downloaded once (twice where the first GET was a 503); none sent that opted out.
    assert host.requests == {f"/img/{i}.jpg": 2 if i in flaky else 1 for i in range(120)}
    assert server.ok == 120 - len(missing) - 2
    assert "secret" not in (tmp_path / "out" / "summary.json").read_text()


def load_out_urls(out_dir):
    return list(datasets.load_dataset(str(out_dir), split="train", cache_dir=str(out_dir.parent / "hf-load")))


def test_by_default_a_loopback_url_is_refused_and_the_host_sees_nothing(server, host, tmp_path):
    rows = url_rows(host, 5)
    data = url_parquet(tmp_path, rows)
    config = write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out", dataset={"image_column": "url"})
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    errors = [r["error"] for r in load_out_urls(tmp_path / "out")]
    assert all(e.startswith(f"ImageError: refused http://127.0.0.1:{host.port}/img/") for e in errors), errors
    assert "127.0.0.1 is not a public address" in errors[0] and "image.allow_private_urls" in errors[0]
    assert sum(host.requests.values()) == 0 and server.requests == 0
    allowed = write_config(tmp_path / "c2.yaml", server.url, data, tmp_path / "out2", dataset={"image_column": "url"},
                           image=ALLOW)
    assert run_cli("run", str(allowed)).returncode == 0
    assert [r["caption"] for r in load_out_urls(tmp_path / "out2")] == [expected_caption(i) for i in range(5)]
    assert sum(host.requests.values()) == 5


def test_embed_images_writes_the_downloads_beside_the_urls(server, host, tmp_path):
    rows = url_rows(host, 40)
    host.missing.add("/img/5.jpg")
    config = write_config(tmp_path / "c.yaml", server.url, url_parquet(tmp_path, rows), tmp_path / "out",
                          dataset={"image_column": "url"}, image=ALLOW, run={"chunk_size": 16},
                          output={"embed_images": True})
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    ds = datasets.load_dataset(str(tmp_path / "out"), split="train", cache_dir=str(tmp_path / "hf-load"))
    assert list(ds.features) == ["id", "url", "image", "alt", "caption", "error"]
    assert isinstance(ds.features["image"], datasets.Image)
    for i, row in enumerate(ds):
        if i == 5:
            assert row["image"] is None and row["error"].startswith("ImageError: download failed: HTTP 404")
        else:
            assert row["image"].size == size_of_row(i) and row["url"] == rows[i]["url"]  # decoded from the shard
    raw = ds.cast_column("image", datasets.Image(decode=False))
    assert raw[3]["image"] == {"bytes": image_of_row(3), "path": "3.jpg"}
    assert sum(host.requests.values()) == 40  # downloaded once, for the request and the shard alike
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- name: image\n    dtype: image" in card


def test_embed_images_fills_an_image_column_whose_paths_are_urls(server, host, tmp_path):
    rows = [{"id": r["id"], "url": {"bytes": None, "path": r["url"]}, "alt": r["alt"]} for r in url_rows(host, 12)]
    features = datasets.Features({"id": datasets.Value("int64"), "url": datasets.Image(), "alt": datasets.Value("string")})
    data = url_parquet(tmp_path, rows, features)
    host.reset_counters()  # datasets' to_parquet fetched each path once, to see whether to embed it
    for embed, out in ((False, tmp_path / "plain"), (True, tmp_path / "embedded")):
        config = write_config(tmp_path / f"{embed}.yaml", server.url, data, out, dataset={"image_column": "url"},
                              image=ALLOW, output={"embed_images": embed})
        assert run_cli("run", str(config)).returncode == 0
    plain = pq.read_table(tmp_path / "plain" / "data" / "train-000000.parquet").column("url").to_pylist()
    assert plain == [{"bytes": None, "path": r["url"]["path"]} for r in rows]  # never downloaded again to write
    embedded = pq.read_table(tmp_path / "embedded" / "data" / "train-000000.parquet").column("url").to_pylist()
    assert embedded == [{"bytes": image_of_row(i), "path": r["url"]["path"]} for i, r in enumerate(rows)]
    assert sum(host.requests.values()) == 24


def test_embedding_downloads_what_an_earlier_run_answered(host):
    """A resumed chunk's rows answered before the stop were not downloaded by this run: the shard
    writer downloads them, with the same rules (the refused one stays empty)."""
    rows = url_rows(host, 3)
    kept = KeptFiles()
    kept.put(rows[0]["url"], image_of_row(0))
    values = [r["url"] for r in rows] + ["http://169.254.169.254/latest/meta-data/", "not a url"]
    column = embedded_images(values, [True, True, False, True, True], kept, ImageConfig(**ALLOW), in_place=False)
    assert column == [{"bytes": image_of_row(0), "path": "0.jpg"}, {"bytes": image_of_row(1), "path": "1.jpg"},
                      None, None, None]
    assert host.requests == {"/img/1.jpg": 1} and len(kept) == 0


def test_embedded_column_name_is_checked(server, host, tmp_path):
    rows = [{**r, "image": "x"} for r in url_rows(host, 2)]
    features = datasets.Features({**URL_FEATURES, "image": datasets.Value("string")})
    config = write_config(tmp_path / "c.yaml", server.url, url_parquet(tmp_path, rows, features), tmp_path / "out",
                          dataset={"image_column": "url"}, image=ALLOW, output={"embed_images": True})
    result = run_cli("run", str(config))
    assert result.returncode == 2 and "output.embedded_image_column" in result.stderr
    assert not (tmp_path / "out").exists()


def test_downloads_run_ahead_of_the_request_slots(server, host, tmp_path):
    """2 request slots, each request 0.3 s: the rows behind them download 8 at a time meanwhile,
    not just the 2 x max_concurrency rows ahead that bytes rows get."""
    rows = url_rows(host, 40)
    host.latency = 0.3
    server.latency = 0.3
    config = write_config(tmp_path / "c.yaml", server.url, url_parquet(tmp_path, rows), tmp_path / "out",
                          dataset={"image_column": "url"}, limits={"max_concurrency": 2},
                          image={"download_concurrency": 8, **ALLOW})
    assert run_cli("run", str(config)).returncode == 0
    assert host.max_in_flight == 8 and server.max_in_flight == 2
    assert sum(1 for r in load_out_urls(tmp_path / "out") if r["error"] is None) == 40


def test_the_map_function_downloads_urls(server, host, monkeypatch):
    rows = url_rows(host, 6)
    monkeypatch.setenv("FAKE_KEY", "k")
    captioner = Captioner({"model": {"base_url": server.url, "name": "fake-vlm", "api_key_env": "FAKE_KEY"},
                           "image": ALLOW})
    try:
        ds = datasets.Dataset.from_list(rows, features=URL_FEATURES).map(captioner, batched=True, batch_size=4,
                                                                         input_columns=["url"])
    finally:
        captioner.close()
    assert ds["caption"] == [expected_caption(i) for i in range(6)] and ds["error"] == [None] * 6


def test_estimate_reads_url_headers_concurrently(host, tmp_path):
    rows = url_rows(host, 30)
    for i in (20, 21):  # larger than the first 64 KiB asked for: their end is asked for too
        host.images[f"/img/{i}.jpg"] = noise_jpeg(900, 600 + i)
    host.missing.add("/img/4.jpg")
    host.opt_out["/img/9.jpg"] = "noai"
    host.latency = 0.2
    data = url_parquet(tmp_path, rows)
    config = write_config(tmp_path / "c.yaml", "http://127.0.0.1:9/v1", data, tmp_path / "out",
                          dataset={"image_column": "url", "key_column": "id"}, image=ALLOW)
    result = run_cli("estimate", str(config), "--json")
    assert result.returncode == 0, result.stderr
    est = json.loads(result.stdout)
    assert est["rows"] == 30 and est["unusable_images"] == 2 and est["requests"] == 28
    assert [(u["key"], u["error"].split(":")[1].strip()) for u in est["unusable_rows"]] == [
        (4, "download failed"), (9, "opted out")]
    assert host.ranged == host.requests == {f"/img/{i}.jpg": 2 if i in (20, 21) else 1 for i in range(30)}
    text = run_cli("estimate", str(config)).stdout
    assert "unusable rows     2, by key:" in text and "4: ImageError: download failed: HTTP 404" in text

    # The same sizes as reading every image whole.
    host.missing.clear()
    host.opt_out.clear()
    as_bytes = [{"id": r["id"], "image": {"bytes": host.images[f"/img/{r['id']}.jpg"], "path": None},
                 "alt": r["alt"]} for r in rows]
    data = tmp_path / "bytes.parquet"
    datasets.Dataset.from_list(as_bytes, features=FEATURES).to_parquet(str(data))
    whole = write_config(tmp_path / "b.yaml", "http://127.0.0.1:9/v1", data, tmp_path / "out")
    by_url, by_bytes = (json.loads(run_cli("estimate", str(c), "--json").stdout) for c in (config, whole))
    assert by_url["image_tokens"] == by_bytes["image_tokens"] and by_url["unusable_images"] == 0
