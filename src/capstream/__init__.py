"""capstream: caption image datasets at scale with vision language models.

    >>> from capstream import caption_dataset
    >>> ds = caption_dataset(my_dataset, config="configs/demo.yaml")

or, as a batched map function:

    >>> from capstream import Captioner
    >>> ds = ds.map(Captioner({"model": {"provider": "mock"}}), batched=True, input_columns=["image"])
"""

__version__ = "0.1.0"

# Names load on first use (PEP 562), so that a worker process, which needs only the model call,
# does not import datasets and the rest of the pipeline. The package's layers: docs/architecture.md.
_EXPORTS = {
    "caption_dataset": "api", "run": "api", "load_output": "api",
    "Captioner": "captioner",
    "RowResult": "row.results", "PromptAnswer": "row.results",
    "Config": "config", "load_config": "config", "config_from_dict": "config",
    "CapstreamError": "errors", "ConfigError": "errors", "RunStopped": "errors", "RowError": "errors",
    "ImageError": "errors", "Interrupted": "errors",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'capstream' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "__version__",
    "caption_dataset",
    "run",
    "load_output",
    "Captioner",
    "RowResult",
    "PromptAnswer",
    "Config",
    "load_config",
    "config_from_dict",
    "CapstreamError",
    "ConfigError",
    "RunStopped",
    "Interrupted",
    "RowError",
    "ImageError",
]
