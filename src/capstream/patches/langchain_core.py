"""langchain-core: compute its list of data content-block types once instead of on every block.

``langchain_core.messages.content.is_data_content_block`` (called by ChatOpenAI for every content
block of every request) rebuilds that list with ``typing.get_type_hints`` over the block TypedDicts
each time, the largest item of the client's CPU per request in a py-spy profile against a local
server (time ``ChatOpenAI._get_request_payload`` with timeit before and after to see it). The list
comes from static type declarations, so caching it changes no result.

    >>> cache_content_block_types()
"""

from __future__ import annotations

import functools

from . import tested

TESTED = ("langchain-core", "1.0", "2.0")


def cache_content_block_types() -> None:
    """Idempotent; does nothing outside the tested versions or when the function is gone."""
    if not tested(*TESTED):
        return
    from langchain_core.messages import content

    types_of = getattr(content, "_get_data_content_block_types", None)
    if types_of is not None and not hasattr(types_of, "cache_info"):
        content._get_data_content_block_types = functools.cache(types_of)
