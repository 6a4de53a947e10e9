"""Config through the CLI: a bad key or an unset API key exits 2 and sends and writes nothing; validate says ok."""

from __future__ import annotations

import yaml

from conftest import make_rows, run_cli, write_config, write_parquet


def test_misspelt_key_exits_2_sends_nothing_writes_nothing(server, tmp_path):
    rows, _ = make_rows(5)
    data = write_parquet(tmp_path / "d.parquet", rows)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", server.url, data, out)
    raw = yaml.safe_load(config.read_text())
    raw["limits"] = {"max_concurency": 3}
    config.write_text(yaml.safe_dump(raw))
    for command in ("run", "validate"):
        result = run_cli(command, str(config))
        assert result.returncode == 2
        assert "limits.max_concurency" in result.stderr and "c.yaml" in result.stderr
    assert server.requests == 0
    assert not out.exists()


def test_unset_api_key_fails_fast_naming_the_variable(server, tmp_path):
    rows, _ = make_rows(5)
    data = write_parquet(tmp_path / "d.parquet", rows)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", server.url, data, out, model={"api_key_env": "MY_UNSET_KEY_VAR"})
    result = run_cli("run", str(config), timeout=30)
    assert result.returncode == 2
    assert "MY_UNSET_KEY_VAR" in result.stderr
    assert server.requests == 0 and not out.exists()


def test_validate_ok(server, tmp_path):
    data = write_parquet(tmp_path / "x.parquet", make_rows(2)[0])
    config = write_config(tmp_path / "c.yaml", server.url, data, tmp_path / "out")
    result = run_cli("validate", str(config))
    assert result.returncode == 0, result.stderr
    assert server.requests == 0


def test_validate_and_run_name_a_missing_data_dir_or_data_files(server, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for dataset, key in [({"path": "parquet", "data_files": str(tmp_path / "nope" / "*.parquet")}, "dataset.data_files"),
                         ({"path": "imagefolder", "data_dir": str(tmp_path / "no_such_folder")}, "dataset.data_dir"),
                         ({"path": "imagefolder", "data_dir": str(images), "data_files": "*.jpg"}, "dataset.data_files"),
                         ({"path": str(images), "data_dir": "sub"}, "dataset.data_dir")]:
        config = write_config(tmp_path / "c.yaml", server.url, "x", tmp_path / "out")
        raw = yaml.safe_load(config.read_text())
        raw["dataset"] = dataset
        config.write_text(yaml.safe_dump(raw))
        for command in ("validate", "run"):
            result = run_cli(command, str(config))
            assert result.returncode == 2, (command, dataset, result.stderr)
            assert key in result.stderr and "dataset.path" not in result.stderr, (command, dataset, result.stderr)
    assert server.requests == 0 and not (tmp_path / "out").exists()


def test_a_placeholder_typo_leaves_nothing_and_the_fixed_rerun_runs(server, tmp_path):
    """The flow of a first hour: a typo in a placeholder, found when the run opens the dataset; the
    folder stays empty, so the rerun after the fix is a new run, not a refused one."""
    data = write_parquet(tmp_path / "d.parquet", make_rows(6)[0])
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", server.url, data, out, prompt={"text": "Caption it. Alt: {atl}"})
    result = run_cli("run", str(config))
    assert result.returncode == 2 and "{atl}" in result.stderr, result.stderr
    assert not out.exists() and server.requests == 0
    raw = yaml.safe_load(config.read_text())
    raw["prompt"]["text"] = "Caption it. Alt: {alt}"
    config.write_text(yaml.safe_dump(raw))
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    assert server.requests == 6
