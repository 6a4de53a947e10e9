"""One row: its prompts, its image, its answers, the response cache, and the session that asks.

Nothing here imports the run, the backends or the output folder (an import-linter contract
checks it); the config reaches this package only as sections handed down (``session.SessionSpec``).
"""
