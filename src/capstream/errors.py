"""Every exception capstream defines, in one place.

Lower libraries' errors (openai, httpx, PIL, pydantic, datasets, huggingface_hub) are translated into
these once, at the boundary where they are caught; the rest of the code only sees these::

    CapstreamError                  anything capstream raises on purpose
    ├── ConfigError                 the config or the command line is wrong: nothing started (exit 2)
    ├── RunStopped                  the run stopped early, its state saved for a rerun (exit 1)
    │   ├── Interrupted             the user asked it to stop (Ctrl-C; exit 130)
    │   ├── BudgetReached           run.max_cost_usd is spent
    │   └── HubError                a Hub call failed after retries (the local output is complete)
    ├── RowError                    belongs to one row: "<Kind>: <message>" in its error column
    │   ├── ImageError              the row's image is missing, unreadable, too large
    │   ├── InvalidAnswer           the answer is not JSON matching the prompt's schema
    │   ├── TruncatedAnswer         the answer was cut at max_tokens (finish_reason "length")
    │   └── FilteredAnswer          the provider withheld the answer (finish_reason "content_filter")
    ├── RequestFailed               one failed attempt, translated at the model-call boundary
    └── NotSent                     the session is stopping: this request was not sent (internal)

``RowError`` and its subclasses are *data*: the run goes on. A ``RunStopped`` carries the run's
summary (``summary``) once the run has written it, so a caller can report what was done.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class CapstreamError(Exception):
    """Base class of every error capstream raises on purpose."""


class ConfigError(CapstreamError):
    """The configuration or the command line is wrong; nothing has been read or sent (exit 2)."""


class RunStopped(CapstreamError):
    """The run stopped early; what was done is saved and a rerun resumes it (exit 1).

    ``summary``: the run's ``RunSummary``, once the run has written it (None before).
    """

    summary: Any = None

    def with_summary(self, summary: Any) -> "RunStopped":
        """This error, carrying the summary the run wrote before raising it."""
        self.summary = summary
        return self


class Interrupted(RunStopped):
    """The user asked the run to stop (Ctrl-C); what was received is saved."""


class BudgetReached(RunStopped):
    """``run.max_cost_usd`` is spent: no new request is sent; what was received is saved."""


class HubError(RunStopped):
    """A Hub call failed (after retries): the local output is complete; push again later."""


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


class InvalidAnswer(RowError):
    """The model's answer is not JSON matching the prompt's schema (``raw`` is the answer)."""

    kind = "InvalidAnswer"

    def __init__(self, reason: str, raw: str):
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


class TruncatedAnswer(RowError):
    """The answer was cut at ``max_tokens`` (``finish_reason: "length"``): asking the same again gives
    the same cut, so it is an error row; a higher ``max_tokens`` and ``--retry-errors`` fix it."""

    kind = "TruncatedAnswer"

    def __init__(self, raw: str):
        super().__init__('the answer was cut at max_tokens (finish_reason "length"); raise model.max_tokens '
                         "(or the prompt's max_tokens) and rerun with --retry-errors")
        self.raw = raw


class FilteredAnswer(RowError):
    """The provider withheld the answer (``finish_reason: "content_filter"``)."""

    kind = "FilteredAnswer"

    def __init__(self, raw: str):
        super().__init__('the provider withheld the answer (finish_reason "content_filter")')
        self.raw = raw


class Failure(Enum):
    """What a failed request means for the run."""

    TRANSIENT = "transient"  # 408/409/429/5xx, timeouts, dropped connections: retry
    FATAL = "fatal"  # bad key, no permission, unknown model or endpoint: stop the run
    ROW = "row"  # this row only (400 bad image, content policy, 413, 422): an error row
    # The connection was refused: nothing listens at the URL. Before the endpoint has ever answered
    # it stops the run at once (a wrong URL, a server not started); after, it is a restart: retry.
    REFUSED = "refused"


class RequestFailed(CapstreamError):
    """A failed attempt, translated once at the model-call boundary (``model.call.translate``).

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
        if self.failure in (Failure.TRANSIENT, Failure.REFUSED):
            return f"ConnectionError: {self.message}"
        return f"ModelError: {self.message}"


class NotSent(CapstreamError):
    """The session is stopping: this row's request was not sent (the row stays to do)."""


__all__ = ["CapstreamError", "ConfigError", "RunStopped", "Interrupted", "BudgetReached", "HubError", "RowError",
           "ImageError", "InvalidAnswer", "TruncatedAnswer", "FilteredAnswer", "Failure", "RequestFailed", "NotSent"]
