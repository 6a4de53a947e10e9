"""``capstream view --serve``: the site served on 127.0.0.1 (and nowhere else), files only.

The site works from the file system too; serving it is for a browser on a machine that reaches the
output folder only over a forwarded port, or a browser that restricts local files.

    >>> server = open_server(Path("out/demo/view"))     # port 0: a free port
    >>> print(server_url(server)); server.serve_forever()
"""

from __future__ import annotations

import functools
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOST = "127.0.0.1"


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # the base class names it format
        """Quiet: a page of thumbnails is a hundred requests."""


def open_server(folder: Path, port: int = 0) -> ThreadingHTTPServer:
    """A server of ``folder`` on 127.0.0.1:``port`` (0: any free port), not yet serving."""
    return ThreadingHTTPServer((HOST, port), functools.partial(_Handler, directory=str(folder)))


def server_url(server: ThreadingHTTPServer) -> str:
    return f"http://{HOST}:{server.server_address[1]}/index.html"


__all__ = ["open_server", "server_url", "HOST"]
