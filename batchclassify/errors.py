"""The exceptions batchclassify raises, and the one place secrets are scrubbed from text.

    BatchClassifyError
    ├── ConfigError            bad options or configuration: the run cannot start (exit 2)
    ├── InputError             one input cannot be read or is not a usable image (row, no request)
    ├── RequestError           one classify request failed
    │   ├── TransportError     timeout, refused or dropped connection (transient)
    │   │   └── RequestTimeout the server did not answer in time (transient)
    │   └── ApiError           the service answered with an error status or an unusable body
    │       ├── TransientApiError   429, 5xx, truncated or non-JSON 200 body: retried
    │       ├── ItemRejectedError   400, 413: this item fails, the run goes on
    │       └── FatalApiError       401, 402, 403, 404, 422, 423: the whole run stops (exit 2)
    └── RunAborted             the run stopped itself (fatal API error, too many failures)

Every error that crosses a module boundary is one of these; aiohttp's own exceptions are translated
once, in :mod:`batchclassify.client`, with the API key removed from their text.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "ApiError",
    "BatchClassifyError",
    "ConfigError",
    "FatalApiError",
    "InputError",
    "ItemRejectedError",
    "RequestError",
    "RequestTimeout",
    "RunAborted",
    "TransientApiError",
    "TransportError",
    "redact",
]

REDACTED = "***"
_KEY_IN_QUERY = re.compile(r"(?i)(api_key=)[^&\s'\"<>]+")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\"<>]+")


def redact(text: str, *secrets: str | None) -> str:
    """Return ``text`` with API keys removed: ``api_key=`` query values, bearer tokens, and
    every literal occurrence of each secret given (also URL-quoted forms are caught by the query
    rule)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    text = _KEY_IN_QUERY.sub(r"\1" + REDACTED, text)
    return _BEARER.sub(r"\1" + REDACTED, text)


class BatchClassifyError(Exception):
    """Base class of every error batchclassify raises on purpose."""

    #: short machine-readable name, used as ``error.type`` in result rows
    kind = "error"


class ConfigError(BatchClassifyError):
    """The options or the configuration are unusable; nothing was sent."""

    kind = "config"


class InputError(BatchClassifyError):
    """One input cannot be used (missing, unreadable, empty, not an image, too large)."""

    kind = "input"

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class RequestError(BatchClassifyError):
    """A classify request did not produce a usable answer."""

    kind = "request"
    http_status: int | None = None
    #: seconds the server asked us to wait (``Retry-After``), if it said
    retry_after: float | None = None
    #: how many attempts were made before giving up (set by the retry loop)
    attempts: int = 1


class TransportError(RequestError):
    """The connection failed: refused, reset, DNS, TLS. Always worth a retry."""

    kind = "connection"


class RequestTimeout(TransportError):
    """The server did not answer within the request timeout."""

    kind = "timeout"


class ApiError(RequestError):
    """The service answered with an error status or a body we cannot use."""

    kind = "http"

    def __init__(
        self, message: str, *, http_status: int | None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.retry_after = retry_after


class TransientApiError(ApiError):
    """Rate limited, overloaded or a broken body: the same request may well succeed later."""


class ItemRejectedError(ApiError):
    """The service refused this image (400, 413): retrying the same bytes cannot help."""


class FatalApiError(ApiError):
    """The service refused the run itself (key, credits, model, parameters): stop everything."""

    kind = "fatal"


class RunAborted(BatchClassifyError):
    """The run stopped before finishing; the message says why and what to do."""

    kind = "aborted"
    #: the run's statistics up to the stop (a :class:`batchclassify.summary.RunStats`), when known
    stats: Any = None
