"""``datasets.load_dataset(output.dir)``, the documented way to load the output, returns the rows as
they are now after a resume or ``--retry-errors`` rewrote shards: every load here shares one HF cache,
in a new process each time, as a user's session would."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import make_rows, run_cli, write_config, write_parquet

LOAD = """
import datasets, json, sys
ds = datasets.load_dataset(sys.argv[1], split=sys.argv[2])
print(json.dumps({"rows": len(ds), "captions": ds["caption"][:], "errors": ds["error"][:]}))
"""


def load_in_new_process(folder, hf_home, split="train") -> dict:
    done = subprocess.run([sys.executable, "-c", LOAD, str(folder), split], capture_output=True, text=True,
                          env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture
def hf_home(tmp_path):
    return tmp_path / "hf-home"  # one HF cache for every load of a test


def test_load_after_retry_errors_gives_the_rows_fixed(server, tmp_path, hf_home):
    rows, _ = make_rows(60)
    data = write_parquet(tmp_path / "d.parquet", rows)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", server.url, data, out, run={"chunk_size": 16})
    refused = {3, 20, 21, 50}
    sizes = {(64 + i % 400, 48 + i // 400 + i % 7) for i in refused}
    server.status_for = lambda info: 400 if (info.width, info.height) in sizes else None
    assert run_cli("run", str(config)).returncode == 0
    before = load_in_new_process(out, hf_home)
    assert {i for i, e in enumerate(before["errors"]) if e} == refused

    server.status_for = None
    result = run_cli("run", str(config), "--retry-errors")
    assert result.returncode == 0, result.stderr
    after = load_in_new_process(out, hf_home)
    assert after["rows"] == 60 and not any(after["errors"]) and all(after["captions"])


def test_load_after_a_resume_gives_every_row(server, tmp_path, hf_home):
    rows, _ = make_rows(60)
    data = write_parquet(tmp_path / "d.parquet", rows)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", server.url, data, out, run={"chunk_size": 10},
                          retry={"max_attempts": 2, "max_wait_s": 0.1}, limits={"max_concurrency": 2})
    answered = []
    server.status_for = lambda info: answered.append(1) or (503 if len(answered) > 25 else None)
    assert run_cli("run", str(config)).returncode == 1  # the endpoint went down part way
    partial = load_in_new_process(out, hf_home)
    assert 0 < partial["rows"] < 60

    server.status_for = None
    assert run_cli("run", str(config)).returncode == 0
    assert load_in_new_process(out, hf_home)["rows"] == 60


def test_two_folders_of_the_same_name_load_their_own_rows(server, tmp_path, hf_home):
    for name, n in (("a", 5), ("b", 7)):
        rows, _ = make_rows(n)
        data = write_parquet(tmp_path / f"{name}.parquet", rows)
        config = write_config(tmp_path / f"{name}.yaml", server.url, data, tmp_path / name / "out")
        assert run_cli("run", str(config)).returncode == 0
    assert load_in_new_process(tmp_path / "a" / "out", hf_home)["rows"] == 5
    assert load_in_new_process(tmp_path / "b" / "out", hf_home)["rows"] == 7


def test_another_split_name_loads_with_its_configs_and_load_output_reads_the_shards(server, tmp_path, hf_home):
    """A split that datasets' patterns do not know by name needs the card's configs, whose cache
    datasets keys by the folder's name: ``capstream.load_output(folder)`` reads the shards as they are."""
    from capstream import load_output

    rows, _ = make_rows(20)
    data = write_parquet(tmp_path / "d.parquet", rows)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", server.url, data, out, dataset={"data_files": {"part1": str(data)},
                                                                             "split": "part1"})
    server.status_for = lambda info: 400 if (info.width, info.height) == (67, 51) else None  # row 3
    assert run_cli("run", str(config)).returncode == 0
    assert "configs:" in (out / "README.md").read_text().split("---")[1]
    assert load_in_new_process(out, hf_home, split="part1")["rows"] == 20
    assert load_output(out)["error"][3].startswith("RequestError")
    server.status_for = None
    assert run_cli("run", str(config), "--retry-errors").returncode == 0
    ds = load_output(str(out))
    assert len(ds) == 20 and not any(ds["error"][:])


def test_the_card_of_a_train_split_names_no_configs(server, tmp_path):
    rows, _ = make_rows(5)
    data = write_parquet(tmp_path / "d.parquet", rows)
    config = write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out")
    assert run_cli("run", str(config)).returncode == 0
    header = (tmp_path / "out" / "README.md").read_text().split("---")[1]
    assert "configs:" not in header and "dataset_info:" in header and "caption" in header
