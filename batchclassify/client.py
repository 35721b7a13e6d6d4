"""ClassifyClient: one pooled aiohttp session that sends classify requests, with retry and
throttling. This is the one place where aiohttp's exceptions are translated into ours, with the
API key scrubbed from their text (aiohttp puts the full URL, query string included, into them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from batchclassify.errors import (
    ConfigError,
    ItemRejectedError,
    RequestError,
    RequestTimeout,
    TransientApiError,
    TransportError,
    redact,
)
from batchclassify.retry import (
    RetryPolicy,
    error_for_status,
    is_transient,
    parse_retry_after,
    wait_honouring_retry_after,
)
from batchclassify.throttle import Throttle

__all__ = ["DEFAULT_ENDPOINT", "ClassifyClient", "ClientOptions", "Response", "parse_model"]

log = logging.getLogger("batchclassify")

DEFAULT_ENDPOINT = "https://classify.roboflow.com"
USER_AGENT = "batchclassify"
_MODEL = re.compile(r"^(?:[^/\s]+/)?([^/\s]+)/(\d+)$")
#: how much of an error body we keep for the message
_MESSAGE_LIMIT = 300


def parse_model(text: str) -> tuple[str, int]:
    """``"project/3"`` or ``"workspace/project/3"`` -> ``("project", 3)``."""
    match = _MODEL.match(text.strip().strip("/"))
    if not match or int(match.group(2)) < 1:
        raise ConfigError(
            f"--model must look like PROJECT/VERSION (e.g. flowers-abc12/3), got {text!r}"
        )
    return match.group(1), int(match.group(2))


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientOptions:
    """How to reach the service. ``timeout`` bounds a whole request, ``connect_timeout`` the
    connection set-up; the default allows the hosted service's multi-second p99 latency."""

    endpoint: str = DEFAULT_ENDPOINT
    model: str
    version: int
    api_key: str | None = field(default=None, repr=False)
    confidence: float | None = None
    timeout: float = 30.0
    connect_timeout: float = 10.0
    concurrency: int = 8
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    extra_params: Mapping[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{self.endpoint.rstrip('/')}/{self.model}/{self.version}"


@dataclass(frozen=True, slots=True)
class Response:
    """A successful classify answer and how many attempts it took."""

    body: dict[str, Any]
    attempts: int


class ClassifyClient:
    """Send classify requests over one pooled session::

    async with ClassifyClient(ClientOptions(model="flowers", version=3, api_key=key)) as c:
        response = await c.classify(data=image_bytes)
    """

    def __init__(self, options: ClientOptions, *, throttle: Throttle | None = None) -> None:
        self.options = options
        self._throttle = throttle
        self._session: aiohttp.ClientSession | None = None
        params = {key: str(value) for key, value in options.extra_params.items()}
        if options.api_key:
            params["api_key"] = options.api_key
        if options.confidence is not None:
            params["confidence"] = str(options.confidence)
        self._params = params
        #: requests actually sent (attempts), for the summary
        self.requests_sent = 0

    async def __aenter__(self) -> ClassifyClient:
        connector = aiohttp.TCPConnector(
            limit=max(self.options.concurrency, 1), limit_per_host=0, enable_cleanup_closed=True
        )
        timeout = aiohttp.ClientTimeout(
            total=self.options.timeout, connect=self.options.connect_timeout
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers={"User-Agent": USER_AGENT}
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _retrying(self) -> AsyncRetrying:
        policy = self.options.retry
        return AsyncRetrying(
            stop=stop_after_attempt(policy.attempts),
            wait=wait_honouring_retry_after(multiplier=policy.initial, max=policy.max_wait),
            retry=retry_if_exception(is_transient),
            before_sleep=self._log_retry,
            reraise=True,
        )

    def _log_retry(self, state: RetryCallState) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        # Our errors are already redacted; redact again in case something else slipped in.
        log.info(
            "attempt %d/%d failed (%s); retrying in %.2f s",
            state.attempt_number,
            self.options.retry.attempts,
            self._redact(str(error)),
            wait,
        )

    def _redact(self, text: str) -> str:
        return redact(text, self.options.api_key)

    async def classify(
        self, *, data: bytes | None = None, image_url: str | None = None
    ) -> Response:
        """Classify one image: ``data`` is the base64 text to send inline, or ``image_url`` a URL
        for the service to fetch. Retries transient failures; raises a
        :class:`~batchclassify.errors.RequestError` (with ``attempts`` set) when it gives up."""
        if (data is None) == (image_url is None):
            raise ValueError("give exactly one of data and image_url")
        retrying = self._retrying()
        attempt_number = 0
        try:
            async for attempt in retrying:
                with attempt:
                    attempt_number = attempt.retry_state.attempt_number
                    body = await self._attempt(data, image_url)
                    return Response(body=body, attempts=attempt_number)
        except RequestError as exc:
            exc.attempts = attempt_number
            raise
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    async def _attempt(self, data: bytes | None, image_url: str | None) -> dict[str, Any]:
        throttle = self._throttle
        ticket = await throttle.acquire() if throttle else 0.0
        try:
            body = await self._send(data, image_url)
        except RequestError as exc:
            if throttle is not None:
                if is_transient(exc):
                    throttle.failure(ticket, status=exc.http_status, retry_after=exc.retry_after)
                else:
                    throttle.release()
            raise
        except BaseException:
            if throttle is not None:
                throttle.release()
            raise
        if throttle is not None:
            throttle.success(ticket)
        return body

    async def _send(self, data: bytes | None, image_url: str | None) -> dict[str, Any]:
        session = self._session
        if session is None:
            raise RuntimeError("ClassifyClient used outside 'async with'")
        params = self._params if image_url is None else {**self._params, "image": image_url}
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        self.requests_sent += 1
        try:
            async with session.post(
                self.options.url, params=params, data=data or b"", headers=headers
            ) as response:
                text = await response.text(errors="replace")
                status = response.status
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"no answer within {self.options.timeout:g} s (--timeout)"
            ) from None
        except aiohttp.ClientError as exc:
            # `from None`: the original exception's text carries the URL and so the key.
            raise TransportError(self._describe(exc)) from None
        if status != 200:
            message = self._redact(_error_message(status, text))
            raise error_for_status(status, message, retry_after=retry_after)
        try:
            body = json.loads(text)
        except ValueError:
            raise TransientApiError(
                f"the server sent a malformed (non-JSON or truncated) body: {_snippet(text)!r}",
                http_status=status,
            ) from None
        if not isinstance(body, dict) or "predictions" not in body:
            raise TransientApiError("the server's answer has no predictions", http_status=status)
        return body

    async def fetch(self, url: str, *, max_bytes: int) -> bytes:
        """Download an image for sending inline (``--fetch-urls``), with the same retry rules."""
        retrying = self._retrying()
        async for attempt in retrying:
            with attempt:
                return await self._fetch_once(url, max_bytes)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fetch_once(self, url: str, max_bytes: int) -> bytes:
        session = self._session
        if session is None:
            raise RuntimeError("ClassifyClient used outside 'async with'")
        try:
            async with session.get(url) as response:
                if response.status != 200:
                    text = await response.text(errors="replace")
                    message = _error_message(response.status, text)
                    # The image's host, not the classify service: its 404 is this item's problem.
                    error = error_for_status(
                        response.status,
                        self._redact(f"downloading the image failed: {message}"),
                        retry_after=parse_retry_after(response.headers.get("Retry-After")),
                    )
                    if not is_transient(error):
                        error = ItemRejectedError(str(error), http_status=response.status)
                    raise error
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > max_bytes:
                        raise ItemRejectedError(
                            f"the image at the URL is larger than {max_bytes} bytes",
                            http_status=None,
                        )
                    chunks.append(chunk)
                return b"".join(chunks)
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"download took longer than {self.options.timeout:g} s (--timeout)"
            ) from None
        except aiohttp.InvalidURL:
            raise ItemRejectedError(f"invalid URL: {self._redact(url)}", http_status=None) from None
        except aiohttp.ClientError as exc:
            raise TransportError(self._describe(exc)) from None

    def _describe(self, exc: aiohttp.ClientError) -> str:
        name = type(exc).__name__
        text = str(exc) or name
        return self._redact(f"{name}: {text}" if text != name else name)


def _error_message(status: int, text: str) -> str:
    """The server's own words for an error, from a JSON ``message``/``detail`` or plain text."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("message", "detail", "error"):
            if key in body:
                value = body[key]
                return f"HTTP {status}: {value if isinstance(value, str) else json.dumps(value)}"[
                    :_MESSAGE_LIMIT
                ]
    snippet = _snippet(text)
    return f"HTTP {status}: {snippet}" if snippet else f"HTTP {status}"


def _snippet(text: str) -> str:
    """A short, single-line excerpt of a body that may be HTML or binary noise."""
    text = re.sub(r"<[^>]+>", " ", text)
    text = " ".join(text.split())
    return text[:_MESSAGE_LIMIT]
