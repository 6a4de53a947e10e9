"""``capstream view``: look at a run's results, offline, in a browser.

A self-contained static site in ``OUT_DIR/view/`` (``site.py``): a gallery of captions beside their
images, with filters, search and pages across every shard, and a run report (``report.py``) of how
the run went over time. Read from the output folder alone (``folder.py``), never from the
environment: the view shows no secret.

    >>> from capstream.view import build_view
    >>> site = build_view("out/demo")
    >>> print(site.index)        # open it in a browser, or: capstream view out/demo --serve
"""

from .site import ViewSite, build_view

__all__ = ["build_view", "ViewSite"]
