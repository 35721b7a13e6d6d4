"""The exceptions batchclassify raises, and the one place secrets are scrubbed from text.

    BatchClassifyError
    ├── ConfigError            bad options or configuration: the run cannot start (exit 2)
    ├── InputError             one input cannot be read or is not a usable image (row, no request)
    ├── RequestError           one classify request failed
    │   ├── TransportError     timeout, refused or dropped connection (transient)
    │   │   └── RequestTimeout the server did not answer in time (transient)
    │   └── ApiError           the service answered with an error status or an unusable body
    │       ├── TransientApiError   429, 5xx, truncated or non-JSON 200 body: retried
    │       │   └── MalformedResponseError  a 200 that is not a documented answer: retried
    │       ├── ItemRejectedError   400, 413: this item fails, the run goes on
    │       │   └── OversizedResponseError  an answer over --max-response-bytes
    │       └── FatalApiError       401-404, 410, 422, 423, 501, 507, a redirect: the run stops
    └── RunAborted             the run stopped itself (fatal API error, too many failures)
        └── EndpointError      before any answer: the endpoint is not a classify API at all

Every error that crosses a module boundary is one of these; aiohttp's own exceptions are translated
once, in :mod:`batchclassify.client`, with the API key removed from their text.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, quote_plus, unquote, urlsplit, urlunsplit

__all__ = [
    "ApiError",
    "BatchClassifyError",
    "ConfigError",
    "EndpointError",
    "FatalApiError",
    "InputError",
    "ItemRejectedError",
    "MalformedResponseError",
    "OversizedResponseError",
    "RequestError",
    "RequestTimeout",
    "RunAborted",
    "TransientApiError",
    "TransportError",
    "redact",
    "url_secrets",
    "without_userinfo",
]

REDACTED = "***"
#: secrets shorter than this are only removed where their context shows them (``api_key=``,
#: ``Bearer``, a URL's user info): replacing every occurrence of a short key would shred text
#: (a key ``x`` turned "does not exist" into "does not e***ist")
MIN_SECRET_LENGTH = 8
_KEY_IN_QUERY = re.compile(r"(?i)(api_key=)[^&\s'\"<>]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s'\"<>]+")
_BASIC = re.compile(r"(?i)\b(authorization\W{0,4}basic\s+)[^\s'\"<>]+")
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"<>]+@")
#: what makes a presigned URL (S3 SigV2 and SigV4, GCS, an Azure SAS) a credential: its
#: signature, the key id and session token it was signed with (``--url-mode presign``)
#: also URL-encoded, as it is inside a classify request's ``image=`` parameter
_SIGNED_QUERY = re.compile(
    r"(?i)((?:[?&]|%3F|%26)(?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|"
    r"awsaccesskeyid|x-goog-signature|x-goog-credential|sig)(?:=|%3D))"
    r"(?:[^&\s'\"<>%]|%(?!26)[0-9a-f]{2})+"
)


def redact(text: str, *secrets: str | None) -> str:
    """Return ``text`` with secrets removed: ``api_key=`` query values, ``Bearer`` and ``Basic``
    credentials, the user info of URLs (``http://user:pw@host``), the signature and credential
    of presigned URLs (``X-Amz-Signature=``, ``Signature=``, ``sig=`` …), and every occurrence
    of each secret given, raw or URL-encoded. A secret shorter than :data:`MIN_SECRET_LENGTH` is
    removed only where the patterns show it: as a substring it would match ordinary words."""
    for secret in secrets:
        if secret and len(secret) >= MIN_SECRET_LENGTH:
            for form in {secret, quote(secret, safe=""), quote_plus(secret, safe="")}:
                # Percent-escapes may come back in either case (%2F or %2f).
                flags = re.IGNORECASE if "%" in form else 0
                text = re.sub(re.escape(form), REDACTED, text, flags=flags)
    text = _KEY_IN_QUERY.sub(r"\1" + REDACTED, text)
    text = _BEARER.sub(r"\1" + REDACTED, text)
    text = _BASIC.sub(r"\1" + REDACTED, text)
    text = _SIGNED_QUERY.sub(r"\1" + REDACTED, text)
    return _URL_USERINFO.sub(r"\1" + REDACTED + "@", text)


def url_secrets(url: str) -> tuple[str, ...]:
    """The credentials in a URL's user info (``http://user:pw@host``), to pass to :func:`redact`."""
    parts = urlsplit(url)
    found = (parts.password, parts.username)
    return tuple(unquote(value) for value in found if value)


def without_userinfo(url: str) -> str:
    """``http://user:pw@host:9001/x`` -> ``http://host:9001/x``: a URL safe to store or show."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


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


class MalformedResponseError(TransientApiError):
    """A 200 whose body is not a documented answer (not JSON, NaN, wrong types, ...)."""

    kind = "malformed_response"


class ItemRejectedError(ApiError):
    """The service refused this image (400, 413): retrying the same bytes cannot help."""


class OversizedResponseError(ItemRejectedError):
    """The answer was larger than the client reads (``--max-response-bytes``)."""

    kind = "response_too_large"


class FatalApiError(ApiError):
    """The service refused the run itself (key, credits, model, parameters): stop everything."""

    kind = "fatal"


class RunAborted(BatchClassifyError):
    """The run stopped before finishing; the message says why and what to do."""

    kind = "aborted"
    #: the run's statistics up to the stop (a :class:`batchclassify.summary.RunStats`), when known
    stats: Any = None


class EndpointError(RunAborted):
    """Before any answer, the endpoint showed it is no classify API (the name does not
    resolve, TLS fails, nothing listens, a web page answers): a wrong ``--endpoint``."""

    kind = "endpoint"
