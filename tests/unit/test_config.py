"""Config in-process: defaults, --set typing, ${VAR}, bad keys naming the key and the file."""

from __future__ import annotations

import pytest

from capstream import ConfigError, load_config
from capstream.config import config_from_dict


def test_defaults_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: {path: x}\n")
    cfg = load_config(path)
    assert cfg.dataset.split == "train" and cfg.dataset.streaming is False and cfg.dataset.image_column == "image"
    assert cfg.model.api_key_env == "OPENAI_API_KEY"
    assert cfg.output.caption_column == "caption" and cfg.output.error_column == "error"
    assert cfg.limits.requests_per_minute is None and cfg.limits.tokens_per_minute is None


def test_set_overrides_are_typed_by_the_schema(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: {path: x}\n")
    cfg = load_config(path, overrides=["limits.max_concurrency=3", "dataset.streaming=true",
                                       "limits.requests_per_minute=null", "prompt.text=Say: hi"])
    assert cfg.limits.max_concurrency == 3 and cfg.dataset.streaming is True
    assert cfg.limits.requests_per_minute is None and cfg.prompt.text == "Say: hi"
    with pytest.raises(ConfigError, match="limits.max_concurrency"):
        load_config(path, overrides=["limits.max_concurrency=many"])
    with pytest.raises(ConfigError, match="unknown key 'limits.max_concurency'"):
        load_config(path, overrides=["limits.max_concurency=3"])


def test_env_interpolation(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: {path: '${DS_ID}'}\nmodel: {base_url: '${BASE:-http://localhost:8000/v1}'}\n")
    monkeypatch.setenv("DS_ID", "user/images")
    cfg = load_config(path)
    assert cfg.dataset.path == "user/images" and cfg.model.base_url == "http://localhost:8000/v1"
    monkeypatch.delenv("DS_ID")
    with pytest.raises(ConfigError, match=r"c.yaml: dataset.path: environment variable DS_ID is not set"):
        load_config(path)


@pytest.mark.parametrize("text, key", [
    ("limits: {max_concurency: 3}", "unknown key 'limits.max_concurency'"),
    ("modle: {name: x}", "unknown key 'modle'"),
    ("image: {detail: medium}", "image.detail"),
    ("limits: {max_concurrency: 0}", "limits.max_concurrency"),
    ("dataset: [1, 2]", "dataset"),
])
def test_bad_keys_name_key_and_file(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert key in str(err.value) and "bad.yaml" in str(err.value)


def test_redacted_config_strips_url_credentials():
    cfg = config_from_dict({"model": {"base_url": "https://user:secret@example.com/v1"}})
    assert "secret" not in str(cfg.redacted())
    assert cfg.fingerprint()["model.base_url"] == "https://***@example.com/v1"


def test_caption_and_error_columns_must_differ():
    with pytest.raises(ConfigError, match="output.error_column"):
        config_from_dict({"output": {"caption_column": "x", "error_column": "x"}})


def test_every_shipped_config_validates(monkeypatch):
    from pathlib import Path

    for var in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY"):
        monkeypatch.setenv(var, "k")
    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        load_config(path).model.api_key()


def test_other_providers_go_through_init_chat_model_or_say_what_is_missing(monkeypatch):
    """A provider name capstream does not build itself needs LangChain's init_chat_model and that
    provider's package; without them the error says what to install (exit 2, nothing sent)."""
    import importlib.util

    from capstream.model.chat_models import build_chat_model

    cfg = config_from_dict({"model": {"provider": "anthropic", "name": "claude-x", "api_key_env": "X_KEY"}}).model
    if importlib.util.find_spec("langchain") is None:
        with pytest.raises(ConfigError, match="pip install langchain langchain-anthropic"):
            build_chat_model(cfg)
    else:
        with pytest.raises(ConfigError, match="model.provider"):
            build_chat_model(cfg.model_copy(update={"provider": "no-such-provider"}))


def test_which_fingerprint_changes_a_rerun_may_make():
    from capstream.config import ResumeChanges

    def changed(before: dict, after: dict) -> dict:
        old, new = config_from_dict(before).fingerprint(), config_from_dict(after).fingerprint()
        return {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}

    plain, retry = ResumeChanges(retry_errors=False), ResumeChanges(retry_errors=True)
    [(key, values)] = changed({"dataset": {"limit": 10}}, {}).items()
    assert key == "dataset.limit" and plain.allowed(key, *values)
    assert plain.allowed(key, 10, 20) and not plain.allowed(key, 20, 10) and not plain.allowed(key, None, 10)
    for before, after in [({"model": {"max_tokens": 50}}, {"model": {"max_tokens": 500}}),
                          ({"prompt": {"max_tokens": 50}}, {"prompt": {"max_tokens": 500}}),
                          ({"prompts": {"a": {"text": "x", "max_tokens": 50}}},
                           {"prompts": {"a": {"text": "x", "max_tokens": 500}}})]:
        [(key, values)] = changed(before, after).items()
        assert retry.allowed(key, *values) and not plain.allowed(key, *values), key
        assert "--retry-errors" in plain.hint(key, *values)
    # Anything else in a prompt, or another generation parameter, is refused even so.
    [(key, values)] = changed({"prompts": {"a": {"text": "x", "max_tokens": 50}}},
                              {"prompts": {"a": {"text": "y", "max_tokens": 500}}}).items()
    assert not retry.allowed(key, *values) and retry.hint(key, *values) is None
    [(key, values)] = changed({"model": {"temperature": 0.1}}, {"model": {"temperature": 0.2}}).items()
    assert not retry.allowed(key, *values)


def test_output_metadata_leaves_the_fingerprint_of_older_folders_alone():
    """A folder written before output.metadata existed has no such key: off, it is not in the fingerprint."""
    assert "output.metadata" not in config_from_dict({}).fingerprint()
    assert config_from_dict({"output": {"metadata": True}}).fingerprint()["output.metadata"] is True
