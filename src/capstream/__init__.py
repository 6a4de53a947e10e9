"""capstream: caption image datasets at scale with vision language models.

    >>> from capstream import caption_dataset
    >>> ds = caption_dataset(my_dataset, config="configs/demo.yaml")

or, as a batched map function:

    >>> from capstream import Captioner
    >>> ds = ds.map(Captioner({"model": {"provider": "mock"}}), batched=True, input_columns=["image"])
"""

__version__ = "0.1.0"

from .api import caption_dataset, load_output, run  # noqa: E402
from .captioner import Captioner  # noqa: E402
from .results import PromptAnswer, RowResult  # noqa: E402
from .config import Config, config_from_dict, load_config  # noqa: E402
from .engine import Interrupted  # noqa: E402
from .errors import CapstreamError, ConfigError, ImageError, RowError, RunStopped  # noqa: E402

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
