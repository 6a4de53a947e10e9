"""Every change capstream makes to another library's private code, in one place.

Each patch is applied by the code that needs it (never on import), is idempotent, checks that the
library is a version it was tested with (``tested``: outside that range it does nothing and the
library's own behaviour stays), and has a test proving it changes no result:

| module | library | what it changes | proven by |
| --- | --- | --- | --- |
| ``langchain_core`` | langchain-core | caches the list of content-block types | the same request payload |
| ``openai_sdk`` | openai | skips the request-body transform for plain JSON | the same body as the SDK's transform |
| ``datasets_parquet`` | datasets | streams parquet a row group at a time | the same rows as datasets' reader |
| ``hf_hub_clients`` | huggingface_hub | gives its HTTP clients a timeout | the installed factory's clients, timeout added |
| ``aiolimiter`` | aiolimiter | changes a limiter's rate in place | the same admissions as a new limiter |
"""

from __future__ import annotations

import importlib.metadata
import re


def tested(distribution: str, low: str, below: str) -> bool:
    """Whether the installed ``distribution`` is at least ``low`` and below ``below``."""
    try:
        installed = _release(importlib.metadata.version(distribution))
    except importlib.metadata.PackageNotFoundError:
        return False
    return _release(low) <= installed < _release(below)


def _release(version: str) -> tuple[int, ...]:
    """``"1.8.3"`` -> (1, 8, 3); pre-release and local parts ignored."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0].split("rc")[0])[:3])
