"""huggingface_hub: give the HTTP clients it makes a timeout (its default clients have none).

``huggingface_hub.set_client_factory`` / ``set_async_client_factory`` are public; reading the
factories installed before (to wrap them, so a caller's proxies and headers survive) is not: they
live in ``huggingface_hub.utils._http``. Every client the wrapped factories make gets ``timeout_s``
wherever it has no timeout of its own (connect, read, write, pool); nothing else changes.

    >>> bound_hub_calls(30)   # process-wide: also bounds the reading of a Hub dataset
"""

from __future__ import annotations

from typing import Any

from . import tested

TESTED = ("huggingface_hub", "2.4", "3.0")


def bound_hub_calls(timeout_s: float) -> None:
    """Wrap the installed client factories; a second call replaces the timeout instead of wrapping
    twice. Outside the tested versions, the library's own factories get the timeout."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.utils import _http

    def bounded(made: Any) -> Any:
        own = made.timeout
        made.timeout = httpx2.Timeout(
            connect=timeout_s if own.connect is None else own.connect,
            read=timeout_s if own.read is None else own.read,
            write=timeout_s if own.write is None else own.write,
            pool=timeout_s if own.pool is None else own.pool,
        )
        return made

    def installed(name: str, default: Any) -> Any:
        factory = getattr(_http, name, default) if tested(*TESTED) else default
        return getattr(factory, "capstream_wraps", factory)

    make_client = installed("_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)
    make_async_client = installed("_GLOBAL_ASYNC_CLIENT_FACTORY", _http.default_async_client_factory)

    def client() -> httpx2.Client:
        return bounded(make_client())

    def async_client() -> httpx2.AsyncClient:
        return bounded(make_async_client())

    client.capstream_wraps, async_client.capstream_wraps = make_client, make_async_client
    huggingface_hub.set_client_factory(client)
    huggingface_hub.set_async_client_factory(async_client)
