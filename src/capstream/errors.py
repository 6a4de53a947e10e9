"""One error hierarchy for capstream.

Lower libraries' errors (openai, httpx, PIL, pydantic, datasets) are translated into these once, at
the boundary where they are caught; the rest of the code only sees these.

Two families:

* ``RowError`` and its subclasses are *data*: they end up as ``"<Kind>: <message>"`` in the error
  column of one row, and the run goes on.
* ``CapstreamError`` subclasses that are not row errors stop something: ``ConfigError`` stops before
  anything starts (exit 2), ``RunStopped`` stops a run early with a resumable state (exit 1).
"""

from __future__ import annotations

from enum import Enum


class CapstreamError(Exception):
    """Base class of every error capstream raises on purpose."""


class ConfigError(CapstreamError):
    """The configuration or the command line is wrong; nothing has been read or sent (exit 2)."""


class RunStopped(CapstreamError):
    """The run stopped early; what was done is saved and a rerun resumes it (exit 1)."""


class RowError(CapstreamError):
    """A failure that belongs to one row: recorded in its error column, the run goes on."""

    kind = "Error"

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        if kind is not None:
            self.kind = kind

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def as_text(self) -> str:
        """The value written to the error column: ``"<Kind>: <message>"``."""
        return f"{self.kind}: {self.message}"


class ImageError(RowError):
    """The row's image is missing, unreadable, too large or of a kind we cannot send."""

    kind = "ImageError"


class Failure(Enum):
    """What a failed request means for the run."""

    TRANSIENT = "transient"  # 408/409/429/5xx, timeouts, dropped connections: retry
    FATAL = "fatal"  # bad key, no permission, unknown model or endpoint: stop the run
    ROW = "row"  # this row only (400 bad image, content policy, 413, 422): an error row


class RequestFailed(CapstreamError):
    """A failed attempt, translated once at the model-call boundary (``model_call.translate``).

    Small and picklable, so it crosses process boundaries: what the failure means, the HTTP status,
    how long the server asked us to wait, and its rate-limit headers.
    """

    def __init__(self, failure: Failure, message: str, status: int | None = None,
                 retry_after_s: float | None = None, headers: dict[str, str] | None = None):
        super().__init__(failure, message, status, retry_after_s, headers)
        self.failure = failure
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s
        self.headers = headers or {}

    def __str__(self) -> str:
        return self.message

    def as_row_error(self) -> str:
        """``"<Kind>: <message>"`` for the error column; our kinds, not the SDK's class names."""
        if self.status is not None:
            return f"RequestError: HTTP {self.status}: {self.message}"
        if self.failure is Failure.TRANSIENT:
            return f"ConnectionError: {self.message}"
        return f"ModelError: {self.message}"
