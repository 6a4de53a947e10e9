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
    config = write_config(tmp_path / "c.yaml", server.url, "x.parquet", tmp_path / "out")
    result = run_cli("validate", str(config))
    assert result.returncode == 0, result.stderr
    assert server.requests == 0
