"""Where a run's requests go: this process's event loop (``local``), or actors on a Ray cluster
(``ray``) sharing one rate limit and budget (``broker``). A backend decides only that; the run core
(``core/run.py``) does the rest."""
