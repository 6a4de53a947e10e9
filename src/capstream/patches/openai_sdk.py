"""The OpenAI SDK: skip its request-body transform where it cannot change the body.

Before each request the SDK walks the body against its TypedDict declarations
(``openai._utils._transform``) to rename aliased keys, format dates and read files, trying every
member of every union on the way; for a chat-completions body with an image that walk is about a
quarter of the client's CPU per request against a local server (``python scripts/request_cpu.py``
with and without ``--sdk-transform``). The walk only acts on ``PropertyInfo`` annotations, on
omitted parameters and on non-JSON values (models, files, dates, iterators). So when the
declaration carries no ``PropertyInfo`` anywhere (true of chat completions) and every given value
is plain JSON, the result is the body minus its omitted parameters, which is what the patch
returns; any other body goes to the SDK's own transform.

    >>> send_plain_bodies_untransformed()
"""

from __future__ import annotations

import functools
from typing import Any

import typing_extensions

from . import tested

TESTED = ("openai", "1.40", "4.0")


def send_plain_bodies_untransformed() -> None:
    """Idempotent; does nothing outside the tested versions or when the SDK lacks what it replaces."""
    if not tested(*TESTED):
        return
    try:
        from openai._utils import _transform, is_given
    except ImportError:
        return
    transform, async_transform = getattr(_transform, "transform", None), getattr(_transform, "async_transform", None)
    if transform is None or async_transform is None or getattr(async_transform, "_capstream", False):
        return
    property_info = _transform.PropertyInfo

    def given_if_plain(data: Any, expected_type: Any) -> dict | None:
        try:
            if type(data) is not dict or not _declares_no(property_info, expected_type):
                return None
        except TypeError:  # an unhashable declaration
            return None
        given = {key: value for key, value in data.items() if is_given(value)}
        return given if _plain_json(given) else None

    @functools.wraps(transform)
    def plain_transform(data: Any, expected_type: Any) -> Any:
        given = given_if_plain(data, expected_type)
        return transform(data, expected_type) if given is None else given

    @functools.wraps(async_transform)
    async def plain_async_transform(data: Any, expected_type: Any) -> Any:
        given = given_if_plain(data, expected_type)
        return await async_transform(data, expected_type) if given is None else given

    plain_async_transform._capstream = True  # type: ignore[attr-defined]
    _transform.transform, _transform.async_transform = plain_transform, plain_async_transform


@functools.lru_cache(maxsize=256)
def _declares_no(marker: type, declared: Any) -> bool:
    """True when no ``marker`` instance annotates ``declared`` or any type reachable from it."""
    seen: set[int] = set()

    def clean(tp: Any) -> bool:
        if id(tp) in seen:
            return True
        seen.add(id(tp))
        if any(isinstance(meta, marker) for meta in getattr(tp, "__metadata__", ())):
            return False
        if typing_extensions.is_typeddict(tp):  # the SDK's TypedDicts are typing_extensions' own
            return all(clean(hint) for hint in typing_extensions.get_type_hints(tp, include_extras=True).values())
        return all(clean(arg) for arg in typing_extensions.get_args(tp))

    try:
        return clean(declared)
    except Exception:  # an unresolvable declaration: let the SDK handle it
        return False


def _plain_json(value: Any) -> bool:
    if value is None or isinstance(value, str) or type(value) in (int, float, bool):
        return True
    if type(value) is dict:
        return all(type(key) is str and _plain_json(item) for key, item in value.items())
    if type(value) is list:
        return all(_plain_json(item) for item in value)
    return False
