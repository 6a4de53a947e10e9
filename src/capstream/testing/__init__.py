"""Fake servers on 127.0.0.1 for tests and benchmarks: an OpenAI-compatible chat server with fault
knobs (``openai_server.FakeOpenAI``) and a Hugging Face Hub (``hub_server.FakeHub``), both
``loopback.LoopbackServer``s; and headless Chromium for the viewer's browser tests
(``browser.chromium``). Nothing else in capstream imports this package.

    >>> from capstream.testing.openai_server import FakeOpenAI
    >>> with FakeOpenAI(latency=0.1, p429=0.05) as server:
    ...     ...  # server.url is an OpenAI-compatible base URL
"""
