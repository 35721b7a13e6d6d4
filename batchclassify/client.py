"""ClassifyClient: one pooled aiohttp session that sends classify requests, with retry and
throttling. This is the one place where aiohttp's exceptions are translated into ours, with the
API key scrubbed from their text (aiohttp puts the full URL, query string included, into them).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import socket
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NoReturn, TypeVar

import aiohttp
import yarl
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from batchclassify.endpoints import (
    CONFIDENCE_KEYWORDS,
    DEFAULT_MAX_RESPONSE_BYTES,
    SERVERLESS,
    KeyTransport,
    Upload,
    endpoint_defaults,
    parse_model,
    resolve_endpoint,
)
from batchclassify.errors import (
    ConfigError,
    EndpointError,
    FatalApiError,
    ItemRejectedError,
    MalformedResponseError,
    OversizedResponseError,
    RequestError,
    RequestTimeout,
    TransportError,
    redact,
    url_secrets,
    without_userinfo,
)
from batchclassify.fleet import Endpoint, Fleet, Route
from batchclassify.hedge import HedgeOptions, Hedger
from batchclassify.response import Answer, parse_answer, parse_answers, snippet
from batchclassify.retry import (
    RetryPolicy,
    error_for_status,
    is_transient,
    parse_retry_after,
    wait_honouring_retry_after,
)
from batchclassify.throttle import Throttle

__all__ = [
    "CONFIDENCE_KEYWORDS",
    "DEFAULT_ENDPOINT",
    "ClassifyClient",
    "ClientOptions",
    "Response",
    "parse_model",
]

log = logging.getLogger("batchclassify")
_T = TypeVar("_T")

DEFAULT_ENDPOINT = SERVERLESS
#: the lowest ``confidence`` the server honours: asking for it returns the whole distribution
SERVER_CONFIDENCE_FLOOR = "0.01"
USER_AGENT = "batchclassify"
#: how much of an error body we keep for the message
_MESSAGE_LIMIT = 300
#: how much of an error body we read to find that message
_ERROR_BODY_LIMIT = 64 * 1024
#: refused connections or web pages, before any answer, that make the endpoint look wrong
_STRIKES_BEFORE_GIVING_UP = 3
#: the self-hosted JSON route that takes a list of images (``--batch-size``)
BATCH_ROUTE = "/infer/classification"
_JSON_HEADERS = {"Content-Type": "application/json"}
#: while ``--hedge-after auto`` has no delay yet, a pending request looks again this often (s)
_HEDGE_RECHECK = 0.25
#: a multipart body's one part, up to its bytes (the boundary line comes before)
_PART_HEAD = (
    b'\r\nContent-Disposition: form-data; name="file"; filename="image"\r\n'
    b"Content-Type: application/octet-stream\r\n\r\n"
)
#: redirects followed when downloading an image (never on classify requests)
_MAX_DOWNLOAD_REDIRECTS = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientOptions:
    """How to reach the service. ``timeout`` bounds a whole request, ``connect_timeout`` the
    connection set-up; the default allows the hosted service's multi-second p99 latency.

    ``endpoints`` names several servers of the same model (a fleet, :mod:`batchclassify.fleet`);
    then ``endpoint`` becomes the first of them. Each server gets its own host's key transport
    and upload form unless ``key_transport`` / ``upload`` say otherwise: after construction
    these hold the form shared by every server, or ``None`` when the servers differ (images are
    then prepared as raw bytes and base64-encoded for the servers that want text); ``routes``
    holds each server's own."""

    endpoint: str = DEFAULT_ENDPOINT
    #: several servers of one model; empty: ``endpoint`` alone
    endpoints: tuple[str, ...] = ()
    model: str
    version: int
    #: ``None``: ``ROBOFLOW_API_KEY`` from the environment, like the command line
    api_key: str | None = field(default=None, repr=False)
    #: how the key is sent and the image uploaded; ``None``: what the host gets by default
    #: (:mod:`batchclassify.endpoints`)
    key_transport: KeyTransport | None = None
    upload: Upload | None = None
    #: threshold on the scores, applied here to the whole distribution the server is asked
    #: for; ``best``/``default`` are passed to the server, which applies them itself
    confidence: float | str | None = None
    timeout: float = 30.0
    connect_timeout: float = 10.0
    concurrency: int = 8
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    extra_params: Mapping[str, str] = field(default_factory=dict)
    #: answers larger than this (after decompression) fail their item unread
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    #: send a pending request once more after a delay (:mod:`batchclassify.hedge`); ``None``:
    #: never (each copy may be billed)
    hedge: HedgeOptions | None = None
    #: each server and how it is reached, settled from the fields above
    routes: tuple[Route, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {self.concurrency}")
        # Frozen: the defaults that depend on other fields are settled once, here.
        urls = tuple(resolve_endpoint(url) for url in (self.endpoints or (self.endpoint,)))
        if len({url.rstrip("/") for url in urls}) != len(urls):
            raise ConfigError("an endpoint is named twice: give each server of a fleet once")
        routes = tuple(_route(url, self.key_transport, self.upload) for url in urls)
        object.__setattr__(self, "endpoint", urls[0])
        object.__setattr__(self, "endpoints", urls)
        object.__setattr__(self, "routes", routes)
        transports = {route.key_transport for route in routes}
        uploads = {route.upload for route in routes}
        shared_transport = transports.pop() if len(transports) == 1 else None
        object.__setattr__(self, "key_transport", shared_transport)
        object.__setattr__(self, "upload", uploads.pop() if len(uploads) == 1 else None)
        if self.api_key is None:
            object.__setattr__(self, "api_key", os.environ.get("ROBOFLOW_API_KEY") or None)
        if "/" in self.model or not self.model.strip():
            raise ConfigError(
                f"model must be the project id alone (version apart), got {self.model!r}: "
                "for 'project/3' use parse_model('project/3')"
            )

    @property
    def url(self) -> str:
        return f"{self.endpoint.rstrip('/')}/{self.model}/{self.version}"


def _route(endpoint: str, key_transport: KeyTransport | None, upload: Upload | None) -> Route:
    host = endpoint_defaults(endpoint)
    transport = key_transport or host.key_transport
    if url_secrets(endpoint):
        # user:password in the URL is sent as Basic auth: the Authorization header is taken.
        if transport == "header":
            raise ConfigError(
                "--api-key-transport header cannot be used with credentials in the endpoint "
                "URL (they use the Authorization header): use query"
            )
        transport = "query"
    return Route(endpoint, transport, upload or host.upload)


@dataclass(frozen=True, slots=True)
class _Target:
    """One server's request parts, built once: URL, query, and headers per upload form."""

    url: str
    params: dict[str, str]
    form_headers: dict[str, str]
    multipart_headers: dict[str, str]
    multipart: bool
    #: ``url`` with ``params`` as its query, encoded once (not again for every request)
    request_url: yarl.URL


@dataclass(frozen=True, slots=True)
class _Reply:
    """What a server sent back: the status, the (bounded) body, and for errors where it
    points to and how long it asks to wait."""

    status: int
    body: bytes
    location: str | None = None
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Response:
    """A successful, checked classify answer and how many attempts it took."""

    answer: Answer
    attempts: int


class ClassifyClient:
    """Send classify requests over one pooled session::

    async with ClassifyClient(ClientOptions(model="flowers", version=3, api_key=key)) as c:
        response = await c.classify(data=image_bytes)

    With several endpoints, each attempt goes to the least busy server of the fleet, a retry
    to another one than the attempt that failed (:mod:`batchclassify.fleet`). With hedging, a
    request still pending after the delay is sent once more and the first answer wins
    (:mod:`batchclassify.hedge`).
    """

    def __init__(self, options: ClientOptions, *, throttle: Throttle | None = None) -> None:
        self.options = options
        self._throttle = throttle
        self._session: aiohttp.ClientSession | None = None
        params = {key: str(value) for key, value in options.extra_params.items()}
        # Ask for every class down to the server's floor; the threshold is applied here, so a
        # row keeps the whole distribution and can be re-thresholded without a new request.
        keyword = isinstance(options.confidence, str)
        params["confidence"] = str(options.confidence) if keyword else SERVER_CONFIDENCE_FLOOR
        # One multipart boundary per client: random, so no image can be made to contain it
        # (each body is checked all the same).
        self._boundary = os.urandom(16).hex()
        self._targets = [self._target(route, params) for route in options.routes]
        #: the form images come prepared in: base64 text, or raw bytes
        self._base64_given = options.upload == "base64"
        secrets = [options.api_key]
        for route in options.routes:
            secrets.extend(url_secrets(route.endpoint))
        self._secrets = tuple(secrets)
        self._fleet: Fleet | None = None
        self._hedger = Hedger(options.hedge) if options.hedge is not None else None
        #: requests actually sent (attempts and hedges), and image downloads (--fetch-urls),
        #: for the summary
        self.requests_sent = 0
        self.downloads_sent = 0
        #: hedges sent, and those that answered first
        self.hedges_sent = 0
        self.hedges_won = 0

    def _target(self, route: Route, params: Mapping[str, str]) -> _Target:
        key = self.options.api_key
        query = dict(params)
        headers: dict[str, str] = {}
        if key and route.key_transport in ("query", "both"):
            query["api_key"] = key
        if key and route.key_transport in ("header", "both"):
            headers["Authorization"] = f"Bearer {key}"
        url = f"{route.endpoint.rstrip('/')}/{self.options.model}/{self.options.version}"
        form = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
        multipart = {**headers, "Content-Type": f"multipart/form-data; boundary={self._boundary}"}
        request_url = yarl.URL(url).with_query(query)
        return _Target(url, query, form, multipart, route.upload == "multipart", request_url)

    @property
    def fleet(self) -> Fleet:
        """The servers and what was seen of each (inside ``async with``)."""
        if self._fleet is None:
            raise RuntimeError("ClassifyClient used outside 'async with'")
        return self._fleet

    async def __aenter__(self) -> ClassifyClient:
        self._fleet = Fleet(self.options.routes)
        concurrency = max(self.options.concurrency, 1)
        # Hedges are requests beyond the concurrency: they need connections of their own.
        limit = concurrency * 2 if self._hedger is not None else concurrency
        connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(
            total=self.options.timeout, connect=self.options.connect_timeout
        )
        # Bodies are decompressed here, not by aiohttp, so that their decompressed size is
        # bounded too (a 1 MB gzip bomb is 1 GB once inflated). The key goes per request:
        # each server of a fleet may take it another way.
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "gzip, deflate"},
            auto_decompress=False,
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

    def usage(self) -> dict[str, Any]:
        """Requests per server (with failures and ejections) and hedges, for the summary."""
        fleet = self._fleet
        return {
            "endpoints": fleet.usage() if fleet is not None else {},
            "hedged": self.hedges_sent,
            "hedges_won": self.hedges_won,
        }

    def _retrying(self) -> AsyncRetrying:
        policy = self.options.retry
        return AsyncRetrying(
            stop=stop_after_attempt(policy.attempts),
            wait=wait_honouring_retry_after(multiplier=policy.initial, max=policy.max_wait),
            retry=retry_if_exception(is_transient),
            before_sleep=self._log_retry,
            sleep=self._sleep,
            reraise=True,
        )

    async def _sleep(self, seconds: float) -> None:
        """The backoff between attempts: through the throttle when there is one, so that it
        ends (with RunAborted) once the run has made no progress for --max-outage instead of
        sleeping through a long Retry-After."""
        if self._throttle is not None:
            await self._throttle.sleep(seconds)
        else:
            await asyncio.sleep(seconds)

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
            self.redact(str(error)),
            wait,
        )

    def redact(self, text: str) -> str:
        """``text`` without the API key or the endpoints' credentials."""
        return redact(text, *self._secrets)

    async def classify(
        self, *, data: bytes | None = None, image_url: str | None = None
    ) -> Response:
        """Classify one image: ``data`` is the upload (base64 text, or the image's raw bytes with
        ``upload="multipart"``), or ``image_url`` a URL for the service to fetch. Retries
        transient failures; raises a :class:`~batchclassify.errors.RequestError` (with
        ``attempts`` set) when it gives up.

        ``attempts`` counts the tries of the request: a hedged try is one attempt, however
        many copies of it were sent (those are counted in :attr:`hedges_sent`)."""
        if (data is None) == (image_url is None):
            raise ValueError("give exactly one of data and image_url")
        answer, attempts = await self._with_retries(
            lambda tried: self._attempt(data, image_url, tried)
        )
        return Response(answer=answer, attempts=attempts)

    async def _with_retries(
        self, attempt: Callable[[list[Endpoint]], Awaitable[_T]]
    ) -> tuple[_T, int]:
        """``attempt`` until it succeeds or the retry policy gives up; its result and the
        attempts made (on failure, the error's ``attempts``). ``attempt`` gets the servers
        tried so far, most recent last, so that a retry goes elsewhere."""
        tried: list[Endpoint] = []
        # Most requests succeed on their first attempt: that one goes without the retry
        # machinery (a tenth of the client's CPU per image). Its failure is replayed as
        # tenacity's first attempt, so waits, logging and counts are those of one policy.
        try:
            return await attempt(tried), 1
        except RequestError as exc:
            if not is_transient(exc) or self.options.retry.attempts == 1:
                exc.attempts = 1
                raise
            first: RequestError | None = exc
        retrying = self._retrying()
        attempt_number = 0
        try:
            async for retry in retrying:
                with retry:
                    attempt_number = retry.retry_state.attempt_number
                    if first is not None:
                        failed, first = first, None
                        raise failed
                    return await attempt(tried), attempt_number
        except RequestError as exc:
            exc.attempts = attempt_number
            raise
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    async def _attempt(
        self, data: bytes | None, image_url: str | None, tried: list[Endpoint]
    ) -> Answer:
        hedger = self._hedger
        if hedger is None:
            return await self._try(self._sender(data, image_url), tried)
        loop = asyncio.get_running_loop()
        started = loop.time()
        ticket = hedger.started(started)
        throttle = self._throttle
        try:
            if throttle is not None and throttle.in_outage:
                # No hedging now: the servers look down.
                answer = await self._try(self._sender(data, image_url), tried)
            else:
                answer = await self._race(data, image_url, tried, hedger, started)
        except BaseException:
            hedger.forget(ticket)  # no answer, no latency to learn from
            raise
        # The first copy's time: its latency, or a lower bound of it when the hedge won.
        hedger.observe(ticket, loop.time())
        return answer

    async def _race(
        self,
        data: bytes | None,
        image_url: str | None,
        tried: list[Endpoint],
        hedger: Hedger,
        started: float,
    ) -> Answer:
        """Send, and once more if no answer came within the hedger's delay; the first answer
        wins and the other copy is cancelled. When both fail, the error that says more wins:
        one that is not worth a retry (the item's or the run's), else the last one.

        The delay is read again while the copy is pending: with ``auto`` it is unknown until
        enough latencies were seen, and the first requests of a run (all sent at once) are
        those most likely to hit the tail; they are hedged too once it is known."""
        send = self._sender(data, image_url)
        first: asyncio.Future[Answer] = asyncio.ensure_future(self._try(send, tried))
        tasks = [first]
        loop = asyncio.get_running_loop()
        try:
            while True:
                delay = hedger.delay
                left = _HEDGE_RECHECK if delay is None else delay - (loop.time() - started)
                if delay is not None and left <= 0:
                    break
                done, _ = await asyncio.wait(tasks, timeout=left)
                if done:
                    return await first
            if not hedger.take():
                return await first
            tasks.append(asyncio.ensure_future(self._try(send, tried, hedge=True)))
            pending: set[asyncio.Future[Answer]] = set(tasks)
            error: BaseException | None = None
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    if exc is None:
                        if task is not first:
                            self.hedges_won += 1
                        return task.result()
                    if not isinstance(exc, RequestError):
                        raise exc  # RunAborted from the throttle, a bug: nothing to wait for
                    if isinstance(exc, FatalApiError) or error is None or is_transient(error):
                        error = exc
                    if isinstance(exc, FatalApiError):
                        raise exc
            assert error is not None
            raise error
        finally:
            for task in tasks:
                task.cancel()
            # Collect the outcomes (a cancelled loser, an error already raised) so that none
            # is reported as never retrieved.
            await asyncio.gather(*tasks, return_exceptions=True)

    def _sender(
        self, data: bytes | None, image_url: str | None
    ) -> Callable[[Endpoint], Awaitable[Answer]]:
        return lambda endpoint: self._send(endpoint, data, image_url)

    async def _try(
        self,
        send: Callable[[Endpoint], Awaitable[_T]],
        tried: list[Endpoint],
        *,
        hedge: bool = False,
    ) -> _T:
        """One copy of a request (``send`` to a server): through the throttle, to the server
        the fleet picks."""
        throttle = self._throttle
        ticket = await throttle.acquire() if throttle else 0.0
        fleet = self.fleet
        # Picked after the throttle's wait: the choice reflects the fleet at send time.
        endpoint = fleet.pick(tried)
        tried.append(endpoint)
        if hedge:
            self.hedges_sent += 1
        endpoint.outstanding += 1
        try:
            answer = await send(endpoint)
        except RequestError as exc:
            if is_transient(exc):
                if throttle is not None:
                    throttle.failure(
                        ticket,
                        status=exc.http_status,
                        retry_after=exc.retry_after,
                        reason=_failure_reason(exc),
                    )
                if _server_side(exc):
                    fleet.failed(endpoint, _failure_reason(exc))
                else:
                    fleet.released(endpoint)
            else:
                if throttle is not None:
                    throttle.release()
                fleet.released(endpoint)
            raise
        except BaseException:
            if throttle is not None:
                throttle.release()
            fleet.released(endpoint)
            raise
        finally:
            endpoint.outstanding -= 1
        fleet.succeeded(endpoint)
        if throttle is not None:
            throttle.success(ticket)
        return answer

    def _body(self, target: _Target, data: bytes) -> tuple[bytes, dict[str, str]]:
        """The request body for this server, in its upload form."""
        if not target.multipart:
            text = data if self._base64_given else base64.b64encode(data)
            return text, target.form_headers
        if self._base64_given:
            try:
                data = base64.b64decode(data, validate=True)
            except binascii.Error:
                raise ItemRejectedError("the upload is not base64 text", http_status=None) from None
        # The raw bytes as the "file" part: no base64 on either side, 25 % fewer bytes. Built
        # as one bytes object: aiohttp's FormData writes a part in five pieces (five sends), a
        # tenth of the client's CPU per small image.
        boundary = self._boundary.encode()
        headers = target.multipart_headers
        if boundary in data:  # practically never; a fresh boundary for this body then
            fresh = os.urandom(16).hex()
            boundary = fresh.encode()
            headers = {**headers, "Content-Type": f"multipart/form-data; boundary={fresh}"}
        body = b"".join((b"--", boundary, _PART_HEAD, data, b"\r\n--", boundary, b"--\r\n"))
        return body, headers

    async def _post(
        self,
        endpoint: Endpoint,
        url: yarl.URL,
        data: bytes,
        headers: Mapping[str, str],
        limit: int,
    ) -> _Reply:
        """One POST to a server of the fleet and its bounded body: ``limit`` bytes of an
        answer, a little of an error page. Transport failures become our errors, the key out
        of their text."""
        session = self._session
        if session is None:
            raise RuntimeError("ClassifyClient used outside 'async with'")
        self.requests_sent += 1
        endpoint.requests += 1
        try:
            # No redirects: following one would send the image and the key to another host.
            async with session.post(
                url, data=data, headers=headers, allow_redirects=False
            ) as response:
                if response.status == 200:
                    return _Reply(200, await read_body(response, limit))
                body = await read_body(response, _ERROR_BODY_LIMIT, truncate=True)
                return _Reply(
                    response.status,
                    body,
                    response.headers.get("Location"),
                    parse_retry_after(response.headers.get("Retry-After")),
                )
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"no answer within {self.options.timeout:g} s (--timeout)"
            ) from None
        except aiohttp.ClientError as exc:
            self._check_endpoint_reached(endpoint, exc)
            # `from None`: the original exception's text carries the URL and so the key.
            raise TransportError(self._describe(exc)) from None

    async def _send(self, endpoint: Endpoint, data: bytes | None, image_url: str | None) -> Answer:
        target = self._targets[endpoint.index]
        url = target.request_url
        if image_url is not None:
            url = url.update_query({"image": image_url})
        upload = b""
        headers = target.form_headers
        if data is not None:
            upload, headers = self._body(target, data)
        reply = await self._post(endpoint, url, upload, headers, self.options.max_response_bytes)
        status, body = reply.status, reply.body
        if status == 200:
            if not endpoint.answered and body.lstrip()[:1] not in (b"{", b"["):
                self._strike(endpoint, f"it answered 200 with {_content(body)}")
            return parse_answer(body)
        if status == 405 and not endpoint.answered:
            raise self._not_an_endpoint(
                endpoint, "it does not accept POST on the classify route (405)"
            )
        if 300 <= status < 400:
            where = (
                without_userinfo(reply.location)
                if reply.location
                else "nowhere (no Location header)"
            )
            message = self.redact(f"HTTP {status} redirect to {where}")
            raise FatalApiError(message, http_status=status)
        message = _error_message(status, body, self.redact)
        if status == 413:
            message += (
                "; the server found the upload too large: use --max-size (e.g. --max-size 1024) "
                "to downscale before upload"
            )
        raise error_for_status(status, message, retry_after=reply.retry_after)

    async def fetch(self, url: str, *, max_bytes: int) -> tuple[bytes, int]:
        """Download an image for sending inline (``--fetch-urls``), with the same retry rules;
        returns the bytes and the attempts it took (on failure, the error's ``attempts``)."""
        retrying = self._retrying()
        attempt_number = 0
        try:
            async for attempt in retrying:
                with attempt:
                    attempt_number = attempt.retry_state.attempt_number
                    self.downloads_sent += 1
                    return await self._fetch_once(url, max_bytes), attempt_number
        except RequestError as exc:
            exc.attempts = attempt_number
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fetch_once(self, url: str, max_bytes: int) -> bytes:
        session = self._session
        if session is None:
            raise RuntimeError("ClassifyClient used outside 'async with'")
        try:
            async with session.get(url, max_redirects=_MAX_DOWNLOAD_REDIRECTS) as response:
                if response.status != 200:
                    text = await read_body(response, _ERROR_BODY_LIMIT, truncate=True)
                    message = _error_message(response.status, text, self.redact)
                    # The image's host, not the classify service: its 404 is this item's problem.
                    error = error_for_status(
                        response.status,
                        f"downloading the image failed: {message}",  # already redacted
                        retry_after=parse_retry_after(response.headers.get("Retry-After")),
                    )
                    if not is_transient(error):
                        error = ItemRejectedError(str(error), http_status=response.status)
                    raise error
                try:
                    return await read_body(response, max_bytes)
                except OversizedResponseError:
                    raise ItemRejectedError(
                        f"the image at the URL is larger than {max_bytes} bytes", http_status=None
                    ) from None
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"download took longer than {self.options.timeout:g} s (--timeout)"
            ) from None
        except aiohttp.TooManyRedirects:
            raise ItemRejectedError(
                f"downloading the image: more than {_MAX_DOWNLOAD_REDIRECTS} redirects",
                http_status=None,
            ) from None
        except aiohttp.InvalidURL:
            raise ItemRejectedError(f"invalid URL: {self.redact(url)}", http_status=None) from None
        except aiohttp.ClientError as exc:
            raise TransportError(self._describe(exc)) from None

    # --- the self-hosted batch route --------------------------------------------------------

    async def classify_batch(self, images: Sequence[bytes]) -> tuple[list[Answer], int]:
        """Classify base64-encoded ``images`` in one request to a self-hosted server's JSON
        route (``POST /infer/classification``, PROTOCOL.md); returns the answers in order and
        the attempts it took. Retries transient failures like :meth:`classify` (never hedged:
        a batch is the expensive request). One bad image fails the whole request with a 400
        (:class:`ItemRejectedError`): the caller splits the batch to find it."""
        body = self._batch_body(images)
        count = len(images)
        return await self._with_retries(
            lambda tried: self._try(lambda endpoint: self._send_batch(endpoint, body, count), tried)
        )

    def _batch_body(self, images: Sequence[bytes]) -> bytes:
        options = self.options
        head: dict[str, Any] = {"model_id": f"{options.model}/{options.version}"}
        if options.api_key:
            head["api_key"] = options.api_key  # this route takes the key in the body
        confidence = options.confidence
        # No percent conversion on this route; the floor asks for the whole distribution.
        head["confidence"] = confidence if isinstance(confidence, str) else 0.01
        # Base64 text needs no JSON escaping: the images are joined in, not re-encoded.
        parts = b",".join(b'{"type":"base64","value":"' + image + b'"}' for image in images)
        return json.dumps(head)[:-1].encode() + b',"image":[' + parts + b"]}"

    async def _send_batch(self, endpoint: Endpoint, body: bytes, count: int) -> list[Answer]:
        url = f"{self.options.routes[endpoint.index].endpoint.rstrip('/')}{BATCH_ROUTE}"
        limit = self.options.max_response_bytes * count
        reply = await self._post(endpoint, yarl.URL(url), body, _JSON_HEADERS, limit)
        status, answer_body = reply.status, reply.body
        if status == 200:
            if not endpoint.answered and answer_body.lstrip()[:1] != b"[":
                self._strike(endpoint, f"it answered 200 with {_content(answer_body)}")
            return parse_answers(answer_body, count)
        if status in (404, 405) and not endpoint.answered:
            raise self._not_an_endpoint(
                endpoint,
                f"it has no batch route (HTTP {status} on POST {BATCH_ROUTE}): --batch-size "
                "needs a self-hosted Roboflow Inference server",
            )
        if 300 <= status < 400:
            raise FatalApiError(self.redact(f"HTTP {status} redirect"), http_status=status)
        message = _error_message(status, answer_body, self.redact)
        raise error_for_status(status, message, retry_after=reply.retry_after)

    def _check_endpoint_reached(self, endpoint: Endpoint, exc: aiohttp.ClientError) -> None:
        """Before a server's first answer, errors that say "this is no classify API" stop the
        run within seconds, instead of a 10-minute outage wait (or, in a fleet, leave that
        server out): the name does not resolve, TLS fails, or connections are refused again
        and again."""
        if endpoint.answered:
            return
        cause = getattr(exc, "os_error", None)
        if isinstance(cause, socket.gaierror):
            raise self._not_an_endpoint(
                endpoint, f"its host name does not resolve ({cause.strerror})"
            )
        if isinstance(exc, (aiohttp.ClientSSLError, aiohttp.ClientConnectorCertificateError)):
            raise self._not_an_endpoint(endpoint, f"TLS failed ({self._describe(exc)})")
        if isinstance(cause, ConnectionRefusedError):
            self._strike(endpoint, "it refuses connections (nothing listens on that port)")

    def _strike(self, endpoint: Endpoint, what: str) -> None:
        """One more sign, before any answer, that this is no classify API. A few in a row
        are a wrong endpoint; one alone may be a server still starting, or a garbled body."""
        endpoint.strikes += 1
        if endpoint.strikes >= _STRIKES_BEFORE_GIVING_UP:
            raise self._not_an_endpoint(
                endpoint, f"{what}, {endpoint.strikes} times without an answer"
            )

    def _not_an_endpoint(self, endpoint: Endpoint, what: str) -> RequestError | EndpointError:
        """The error for a server that is no classify API: the run stops unless other servers
        of the fleet may still be (then the request is retried on one of them)."""
        name = without_userinfo(endpoint.route.endpoint)
        why = self.redact(f"it does not look like a classify API: {what}")
        if self.fleet.condemn(endpoint, why):
            return TransportError(self.redact(f"{name} does not look like a classify API: {what}"))
        others = "" if len(self.fleet) == 1 else ", nor did the other servers of the fleet"
        return EndpointError(
            self.redact(
                f"{name} does not look like a classify API: {what}{others}. Check --endpoint: "
                f"the hosted API is {DEFAULT_ENDPOINT}, a self-hosted server is usually "
                "http://HOST:9001"
            )
        )

    def _describe(self, exc: aiohttp.ClientError) -> str:
        name = type(exc).__name__
        text = str(exc) or name
        return self.redact(f"{name}: {text}" if text != name else name)


def _content(body: bytes) -> str:
    """What a body is, in a few words: "an HTML page", "an empty body", "text: '...'"."""
    head = body.lstrip()[:200].lower()
    if not head:
        return "an empty body"
    if head.startswith((b"<!doctype html", b"<html")) or b"<body" in head:
        return "an HTML page"
    return f"text that is not JSON: {snippet(body, 80)!r}"


def _server_side(exc: RequestError) -> bool:
    """A failure that says the server is unwell: no answer, a timeout, a 5xx. A 429 says it is
    up (just busy), a garbled 200 may be one image's doing."""
    if isinstance(exc, TransportError):
        return True
    status = exc.http_status
    return status is not None and status >= 500


def _failure_reason(exc: RequestError) -> str:
    """What went wrong, for the throttle's outage warning and abort message: the error's own
    (already redacted) words, which start with the status for HTTP errors."""
    text = str(exc)
    if exc.http_status is not None and exc.http_status != 200 and not text.startswith("HTTP"):
        text = f"HTTP {exc.http_status}: {text}"
    return text or exc.kind


async def read_body(
    response: aiohttp.ClientResponse, limit: int, *, truncate: bool = False
) -> bytes:
    """Read at most ``limit`` bytes of body, decompressed size included. Over the limit:
    :class:`OversizedResponseError`, or with ``truncate`` the first ``limit`` bytes. Memory
    stays bounded whatever the server sends (huge, endless or compressed bodies); a body that
    does not inflate is a :class:`MalformedResponseError`."""
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    try:
        identity = encoding in ("", "identity")
        inflater = None if identity else _Inflater(encoding, response.status)
    except MalformedResponseError:
        if truncate:
            return b""  # an error page we cannot read: its status says enough
        raise
    declared = response.content_length
    if inflater is None and declared is not None and declared > limit and not truncate:
        raise _oversized(limit)  # refused unread: closing the connection drops the rest
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(1 << 16):
        if inflater is not None:
            try:
                chunk = inflater.feed(chunk, limit - size + 1)
            except MalformedResponseError:
                if truncate:
                    break
                raise
        size += len(chunk)
        chunks.append(chunk)
        if size > limit or (inflater is not None and inflater.held_back):
            if truncate:
                break
            # Drop the bytes before raising: the traceback keeps this frame and its locals alive
            # until the garbage collector breaks the retry machinery's reference cycle.
            del chunks[:], chunk
            raise _oversized(limit)
    return b"".join(chunks)[:limit]


class _Inflater:
    """Decompresses a body a chunk at a time, never producing more than asked for.

    ``deflate`` is sent both with the zlib wrapper (as the standard says) and raw (as many
    servers do): the first bytes tell which."""

    def __init__(self, encoding: str, status: int) -> None:
        self._encoding = encoding
        self._status = status
        self._inflater: Any = None
        if encoding not in ("gzip", "x-gzip", "deflate"):
            self._fail(f"a body in an encoding that was not asked for: {encoding[:40]!r}")

    @property
    def held_back(self) -> bool:
        """Input is left over because the output reached its bound."""
        return bool(self._inflater is not None and self._inflater.unconsumed_tail)

    def feed(self, data: bytes, max_length: int) -> bytes:
        if self._inflater is None:
            self._inflater = zlib.decompressobj(self._window(data))
        try:
            # max_length bounds this chunk's output; what it holds back stays in
            # unconsumed_tail, which only matters once the limit is already reached.
            out: bytes = self._inflater.decompress(data, max_length)
        except zlib.error as exc:
            self._fail(f"a {self._encoding} body that does not decompress ({exc})")
        return out

    def _fail(self, what: str) -> NoReturn:
        raise MalformedResponseError(f"the server sent {what}", http_status=self._status)

    def _window(self, head: bytes) -> int:
        if self._encoding != "deflate":
            return 16 + zlib.MAX_WBITS
        zlib_wrapped = len(head) >= 2 and head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0
        return zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS


def _oversized(limit: int) -> OversizedResponseError:
    return OversizedResponseError(
        f"the server's answer is larger than {limit} bytes (--max-response-bytes); a classify "
        "answer is a few KB",
        http_status=200,
    )


def _error_message(status: int, body: bytes, redact: Callable[[str], str]) -> str:
    """The server's own words for an error, from a JSON ``message``/``detail`` or plain text,
    with ``redact`` applied to the whole of them before they are cut short: a server that
    echoes the request (a 422 quoting the batch route's body, which holds the key) must not
    leave the start of a key at the cut."""
    try:
        parsed = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, dict):
        for key in ("message", "detail", "error"):
            if key in parsed:
                value = parsed[key]
                text = value if isinstance(value, str) else json.dumps(value)
                return f"HTTP {status}: {snippet(redact(text), _MESSAGE_LIMIT)}"
    excerpt = snippet(redact(body.decode("utf-8", "replace")), _MESSAGE_LIMIT)
    return f"HTTP {status}: {excerpt}" if excerpt else f"HTTP {status}"
