"""A deliberately hostile / broken classification server, for testing the client's defences.

It speaks just enough of the classify protocol (``../shared/PROTOCOL.md``) to be pointed at with
``--endpoint``, then misbehaves. Everything runs in the caller's event loop, on 127.0.0.1 only,
and the server never opens a connection anywhere (``?image=URL`` is never fetched).

Use it through the ``hostile_server`` fixture (``tests/conftest.py``)::

    async def test_x(hostile_server: HostileServer) -> None:
        hostile_server.huge_size = 50 * MiB           # settings: change before the requests
        endpoint = hostile_server.url("huge", every=3)  # -> http://127.0.0.1:PORT/huge/3
        ...  # run the client with --endpoint endpoint
        assert hostile_server.requests["huge"] == 6
        assert hostile_server.catcher_requests == []

Route: ``GET|POST /{mode}/{every}/{model}/{version}``. Request number k (counted from 1 per
``/{mode}/{every}`` path, per server) is answered in the hostile ``mode`` when ``k % every == 0``,
otherwise with a normal, valid single-label answer (:func:`valid_answer`). ``every=1``: always
(but for the first ``warmup`` requests of each path, answered normally).

Modes (the table is :data:`MODES`, plus the ``status-NNN`` and ``redirect-NNN`` families):

Bodies that are too big or never end
    ``deep``          200 JSON of 200 000 nested ``[`` ... ``]`` (valid JSON, 400 kB)
    ``huge``          200, Content-Length ``huge_size`` (default 200 MB) of JSON-looking text,
                      streamed in 1 MiB chunks; stops when the client goes away
    ``endless``       200, chunked, 1 MiB chunks until the client goes away (bound: 20 GiB)
    ``gzip-bomb``     200, ``Content-Encoding: gzip``: ~1 MB on the wire, ``bomb_size``
                      (default 1 GiB) of zero bytes once decompressed
    ``many-classes``  valid multi-label answer with ``many_classes`` (default 5000) classes
                      ``c00001``..., all of them in ``predicted_classes``
Headers that lie
    ``charset``       valid answer with ``Content-Type: application/json; charset=base64``
Error pages that echo secrets
    ``html-echo``     200 text/html echoing the full request URL (``api_key=...`` included) and
                      the ``Authorization`` header, as proxy error pages do
    ``html-echo-500`` the same with status 500
    ``json-echo-400`` 400 ``{"message": "bad image for <full URL>"}``
Numbers that are not numbers
    ``nan``           confidences written as the bare literal ``NaN``
    ``infinity``      confidences ``Infinity`` and ``-Infinity``
    ``out-of-range``  confidences 1.7 and -0.2
    ``huge-number``   confidence ``1e999`` (literally) and ``image.width`` = 10**400
Wrong shapes and types
    ``predictions-null`` / ``predictions-string`` / ``predictions-numbers`` (``[1, 2, 3]``)
    ``top-list``      ``"top": ["l"]``
    ``class-not-string``  class names 5 and null
    ``bad-types``     ``image.width: "abc"``, ``inference_id: {"a": 1}``, ``time: "soon"``
Class names that attack whatever displays or stores them
    ``escape-codes``  top class ``"\\u001b]0;pwned\\u0007\\u001b[2Jcat"`` (terminal escapes)
    ``formula``       class names ``=HYPERLINK(...)``, ``@SUM(1+1)``, ``+1``, ``-1``, ``\\tx``,
                      ``\\rx`` (CSV/spreadsheet formula injection), top is the first
    ``surrogate-class``  class name ``"\\ud800x"`` (a lone surrogate escape in the JSON text)
Status codes
    ``status-NNN``    any status 200..599 with ``{"message": ...}``; 429 and 503 carry
                      ``Retry-After: <retry_after>`` (default ``"1"``; ``None`` omits it)
    ``retry-after-huge``  429 with ``Retry-After: 999999``
    ``redirect-NNN``  NNN in 301, 302, 303, 307, 308: redirect to the same path and query on the
                      *catcher*, a second loopback server that records every request it gets
                      (:class:`CaughtRequest`) and answers 200 with a valid classification
Time
    ``slow``          a valid answer after ``slow_seconds`` (default 5 s); released on shutdown

Stats on the :class:`HostileServer`: ``requests`` (Counter by mode), ``hostile_answers`` (Counter
by mode: how many got the hostile treatment), ``bytes_received`` (request body bytes),
``bytes_sent`` / ``disconnects`` (Counters by mode, for the streaming modes ``huge`` and
``endless``: bytes handed to the socket, and streams ended because the client went away), and
``catcher_requests``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import struct
import time
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

HOST = "127.0.0.1"
CHUNK = MiB
#: the ``endless`` stream stops here at the latest (never reached in practice)
ENDLESS_LIMIT = 20 * GiB
#: request bodies are read (and counted) up to this many bytes, the rest is left unread
MAX_BODY_READ = 64 * MiB
#: how often ``slow`` checks whether its client is still there
SLOW_POLL = 0.05
#: handlers still running this long after shutdown began are cancelled
SHUTDOWN_TIMEOUT = 0.5

DEEP_LEVELS = 200_000
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
FORMULA_CLASSES = ('=HYPERLINK("http://evil/","click")', "@SUM(1+1)", "+1", "-1", "\tx", "\rx")
ESCAPE_CLASS = "\x1b]0;pwned\x07\x1b[2Jcat"
SURROGATE_CLASS = "\ud800x"

JSON_TYPE = "application/json"
Handler = Callable[["HostileServer", web.Request], Awaitable[web.StreamResponse]]


# --------------------------------------------------------------------------------------------
# Bodies


def valid_answer(classes: Sequence[str] = ("cat", "dog")) -> dict[str, Any]:
    """A valid single-label answer, exactly the documented shape; ``classes[0]`` is on top."""
    confidences = [0.9, 0.1, *([0.0] * len(classes))][: len(classes)]
    predictions = [
        {"class": name, "class_id": i, "confidence": confidence}
        for i, (name, confidence) in enumerate(zip(classes, confidences, strict=True))
    ]
    return {
        "time": 0.01,
        "image": {"width": 64, "height": 48},
        "predictions": predictions,
        "top": classes[0],
        "confidence": confidences[0],
        "inference_id": str(uuid.uuid4()),
    }


def multi_label_answer(count: int) -> dict[str, Any]:
    """A valid multi-label answer with ``count`` classes ``c00001``..., all predicted."""
    names = [f"c{i:05d}" for i in range(1, count + 1)]
    return {
        "time": 0.01,
        "image": {"width": 64, "height": 48},
        "predictions": {name: {"confidence": 0.9, "class_id": i} for i, name in enumerate(names)},
        "predicted_classes": names,
        "inference_id": str(uuid.uuid4()),
    }


@functools.cache
def deep_json() -> bytes:
    """``[[[...]]]``, nested :data:`DEEP_LEVELS` deep: valid JSON that breaks recursive parsers."""
    return b"[" * DEEP_LEVELS + b"]" * DEEP_LEVELS


@functools.cache
def gzip_bomb(decompressed_size: int = GiB) -> bytes:
    """A gzip member of ``decompressed_size`` zero bytes (a multiple of 1 MiB), ~1/1000 as big.

    Each MiB of zeros is compressed with a full flush, which resets the compressor, so every
    MiB compresses to the same bytes: compress one, repeat it. Only the CRC costs a pass over
    the (never materialised) data.
    """
    if decompressed_size <= 0 or decompressed_size % CHUNK:
        raise ValueError("decompressed_size must be a positive multiple of 1 MiB")
    zeros = bytes(CHUNK)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    if deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH) != block:  # pragma: no cover
        raise RuntimeError("zlib did not reset on Z_FULL_FLUSH")
    end = deflate.flush(zlib.Z_FINISH)
    count = decompressed_size // CHUNK
    crc = 0
    for _ in range(count):
        crc = zlib.crc32(zeros, crc)
    # magic, deflate, no flags, no mtime, max compression, OS unknown
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc, decompressed_size & 0xFFFFFFFF)
    return b"".join([header, block * count, end, trailer])


def huge_chunks(size: int) -> Iterator[bytes]:
    """``size`` bytes of JSON-looking text (``{"predictions": [`` then spaces), in 1 MiB chunks."""
    prefix = b'{"predictions": ['
    spaces = b" " * CHUNK
    first = (prefix + spaces)[: min(size, CHUNK)]
    yield first
    left = size - len(first)
    while left > 0:  # bounded: ``left`` shrinks by up to CHUNK each time
        piece = spaces[: min(left, CHUNK)]
        left -= len(piece)
        yield piece


def _json_response(
    text: str | bytes,
    status: int = 200,
    content_type: str = JSON_TYPE,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = text.encode() if isinstance(text, str) else text
    return web.Response(
        body=body, status=status, headers={"Content-Type": content_type, **(headers or {})}
    )


def _answer(data: Any, status: int = 200) -> web.Response:
    # json.dumps writes NaN / Infinity as bare literals and escapes lone surrogates (ASCII only).
    return _json_response(json.dumps(data), status)


def _message(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    if status in (204, 205, 304):  # these may not have a body
        return web.Response(status=status, headers=headers)
    return _json_response(json.dumps({"message": message}), status, headers=headers)


# --------------------------------------------------------------------------------------------
# Mode handlers: (server, request) -> response


async def _normal(server: HostileServer, request: web.Request) -> web.StreamResponse:
    return _answer(valid_answer())


async def _deep(server: HostileServer, request: web.Request) -> web.StreamResponse:
    return _json_response(deep_json())


async def _charset(server: HostileServer, request: web.Request) -> web.StreamResponse:
    return _json_response(json.dumps(valid_answer()), content_type=f"{JSON_TYPE}; charset=base64")


def _echo_page(request: web.Request) -> str:
    auth = request.headers.get("Authorization")
    auth_line = f"<p>Authorization: {auth}</p>" if auth is not None else ""
    # Unescaped on purpose: the secrets appear verbatim, as on careless proxy pages.
    return (
        "<!DOCTYPE html><html><head><title>Upstream error</title></head><body>"
        f"<h1>Error</h1><p>Request: {request.method} {request.url}</p>{auth_line}"
        "</body></html>"
    )


async def _html_echo(server: HostileServer, request: web.Request) -> web.StreamResponse:
    return web.Response(text=_echo_page(request), content_type="text/html")


async def _html_echo_500(server: HostileServer, request: web.Request) -> web.StreamResponse:
    return web.Response(text=_echo_page(request), content_type="text/html", status=500)


async def _json_echo_400(server: HostileServer, request: web.Request) -> web.StreamResponse:
    return _message(400, f"bad image for {request.url}")


async def _huge(server: HostileServer, request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": JSON_TYPE})
    response.content_length = server.huge_size
    await response.prepare(request)
    await server.stream(request, response, "huge", huge_chunks(server.huge_size))
    return response


async def _endless(server: HostileServer, request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": JSON_TYPE})
    response.enable_chunked_encoding()
    await response.prepare(request)
    chunks = huge_chunks(ENDLESS_LIMIT)  # never exhausted: the client leaves first
    await server.stream(request, response, "endless", chunks)
    return response


async def _gzip_bomb(server: HostileServer, request: web.Request) -> web.StreamResponse:
    bomb = await asyncio.to_thread(gzip_bomb, server.bomb_size)  # cached after the first call
    return _json_response(bomb, headers={"Content-Encoding": "gzip"})


def _with_confidences(first: Any, second: Any) -> dict[str, Any]:
    data = valid_answer()
    data["predictions"][0]["confidence"] = first
    data["predictions"][1]["confidence"] = second
    data["confidence"] = first
    return data


async def _nan(server: HostileServer, request: web.Request) -> web.StreamResponse:
    return _answer(_with_confidences(float("nan"), float("nan")))


async def _infinity(server: HostileServer, request: web.Request) -> web.StreamResponse:
    return _answer(_with_confidences(float("inf"), float("-inf")))


async def _out_of_range(server: HostileServer, request: web.Request) -> web.StreamResponse:
    return _answer(_with_confidences(1.7, -0.2))


async def _huge_number(server: HostileServer, request: web.Request) -> web.StreamResponse:
    data = _with_confidences("@HUGE@", 0.1)
    data["image"]["width"] = 10**400
    # 1e999 is valid JSON grammar but overflows a double; json.dumps cannot write it.
    return _json_response(json.dumps(data).replace('"@HUGE@"', "1e999"))


def _replacing(**fields: Any) -> Handler:
    """A handler answering a valid answer with some top-level fields replaced."""

    async def handler(server: HostileServer, request: web.Request) -> web.StreamResponse:
        return _answer({**valid_answer(), **fields})

    return handler


async def _class_not_string(server: HostileServer, request: web.Request) -> web.StreamResponse:
    data = valid_answer()
    data["predictions"][0]["class"] = 5
    data["predictions"][1]["class"] = None
    data["top"] = 5
    return _answer(data)


async def _bad_types(server: HostileServer, request: web.Request) -> web.StreamResponse:
    data = valid_answer()
    data["image"]["width"] = "abc"
    data["inference_id"] = {"a": 1}
    data["time"] = "soon"
    return _answer(data)


def _named(*classes: str) -> Handler:
    """A handler answering a valid answer over these class names (the first on top)."""

    async def handler(server: HostileServer, request: web.Request) -> web.StreamResponse:
        return _answer(valid_answer(classes))

    return handler


async def _many_classes(server: HostileServer, request: web.Request) -> web.StreamResponse:
    return _answer(multi_label_answer(server.many_classes))


async def _retry_after_huge(server: HostileServer, request: web.Request) -> web.StreamResponse:
    return _message(429, "rate limited, come back in 11 days", {"Retry-After": "999999"})


async def _slow(server: HostileServer, request: web.Request) -> web.StreamResponse:
    await server.pause(request, server.slow_seconds)
    return _answer(valid_answer())


def _status(code: int) -> Handler:
    async def handler(server: HostileServer, request: web.Request) -> web.StreamResponse:
        headers: dict[str, str] = {}
        if code in (429, 503) and server.retry_after is not None:
            headers["Retry-After"] = server.retry_after
        return _message(code, f"hostile status {code}", headers)

    return handler


def _redirect(code: int) -> Handler:
    async def handler(server: HostileServer, request: web.Request) -> web.StreamResponse:
        location = server.catcher_base + request.raw_path  # same path and query string
        return web.Response(status=code, headers={"Location": location})

    return handler


#: the fixed-name modes; ``status-NNN`` and ``redirect-NNN`` are resolved by :func:`handler_for`
MODES: dict[str, Handler] = {
    "deep": _deep,
    "charset": _charset,
    "html-echo": _html_echo,
    "html-echo-500": _html_echo_500,
    "json-echo-400": _json_echo_400,
    "huge": _huge,
    "endless": _endless,
    "gzip-bomb": _gzip_bomb,
    "nan": _nan,
    "infinity": _infinity,
    "out-of-range": _out_of_range,
    "predictions-null": _replacing(predictions=None),
    "predictions-string": _replacing(predictions="cat"),
    "predictions-numbers": _replacing(predictions=[1, 2, 3]),
    "top-list": _replacing(top=["l"]),
    "class-not-string": _class_not_string,
    "bad-types": _bad_types,
    "huge-number": _huge_number,
    "escape-codes": _named(ESCAPE_CLASS, "dog"),
    "formula": _named(*FORMULA_CLASSES),
    "many-classes": _many_classes,
    "surrogate-class": _named(SURROGATE_CLASS, "dog"),
    "retry-after-huge": _retry_after_huge,
    "slow": _slow,
}

_FAMILY = re.compile(r"(status|redirect)-(\d{3})")


def handler_for(mode: str) -> Handler | None:
    """The handler of ``mode``, or None if there is no such mode."""
    if mode in MODES:
        return MODES[mode]
    match = _FAMILY.fullmatch(mode)
    if match is None:
        return None
    family, code = match[1], int(match[2])
    if family == "status" and 200 <= code <= 599:
        return _status(code)
    if family == "redirect" and code in REDIRECT_STATUSES:
        return _redirect(code)
    return None


# --------------------------------------------------------------------------------------------
# The servers


@dataclass(frozen=True)
class CaughtRequest:
    """One request the catcher received (after a redirect the client should not have followed)."""

    method: str
    path: str
    query: str  # the raw query string, e.g. "api_key=KEY&name=a.jpg"
    body_length: int
    headers: CIMultiDict[str]


@dataclass
class HostileServer:
    """The hostile server and its catcher; settings are read at request time."""

    # settings
    huge_size: int = 200 * 1000 * 1000
    bomb_size: int = GiB
    slow_seconds: float = 5.0
    retry_after: str | None = "1"
    many_classes: int = 5000
    #: the first ``warmup`` requests of each path are answered normally, whatever ``every``
    #: says: a client that has had an answer treats later nonsense as the server's, not as a
    #: wrong endpoint
    warmup: int = 0
    # stats
    requests: Counter[str] = field(default_factory=Counter)
    hostile_answers: Counter[str] = field(default_factory=Counter)
    bytes_received: int = 0
    bytes_sent: Counter[str] = field(default_factory=Counter)
    disconnects: Counter[str] = field(default_factory=Counter)
    catcher_requests: list[CaughtRequest] = field(default_factory=list)
    # plumbing
    base: str = ""
    catcher_base: str = ""
    _seen: Counter[str] = field(default_factory=Counter, init=False, repr=False)
    _runners: list[web.AppRunner] = field(default_factory=list, init=False, repr=False)
    _closing: asyncio.Event | None = field(default=None, init=False, repr=False)

    def url(self, mode: str, every: int = 1) -> str:
        """The endpoint base to pass as ``--endpoint``: ``http://127.0.0.1:PORT/<mode>/<every>``."""
        if handler_for(mode) is None:
            raise ValueError(f"unknown hostile mode {mode!r}")
        if every < 1:
            raise ValueError("every must be >= 1")
        if not self.base:
            raise RuntimeError("the server is not running")
        return f"{self.base}/{mode}/{every}"

    def reset(self) -> None:
        """Forget stats and request numbering (settings are kept)."""
        self.requests.clear()
        self.hostile_answers.clear()
        self.bytes_received = 0
        self.bytes_sent.clear()
        self.disconnects.clear()
        self.catcher_requests.clear()
        self._seen.clear()

    # lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._closing = asyncio.Event()  # created in the loop that waits on it
        try:
            self.catcher_base = await self._serve(self._catch, "/{tail:.*}", "*")
            self.base = await self._serve(
                self._handle, "/{mode}/{every}/{model}/{version}", "GET", "POST"
            )
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._closing is not None:
            self._closing.set()
        while self._runners:
            await self._runners.pop().cleanup()

    async def _serve(
        self,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        path: str,
        *methods: str,
    ) -> str:
        app = web.Application()
        for method in methods:
            app.router.add_route(method, path, handler)
        app.on_shutdown.append(self._release)
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, HOST, 0).start()
        return f"http://{HOST}:{runner.addresses[0][1]}"

    async def _release(self, app: web.Application) -> None:
        # on_shutdown: runs before aiohttp waits for in-flight handlers; wakes streams and sleeps.
        if self._closing is not None:
            self._closing.set()

    @property
    def closing(self) -> bool:
        return self._closing is not None and self._closing.is_set()

    # request handling -----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        mode, every_text = request.match_info["mode"], request.match_info["every"]
        handler = handler_for(mode)
        every = int(every_text) if every_text.isdigit() else 0
        if handler is None or every < 1:
            return _message(404, f"unknown hostile mode/every {mode!r}/{every_text!r}")
        self.requests[mode] += 1
        self._seen[f"{mode}/{every}"] += 1
        number = self._seen[f"{mode}/{every}"]
        hostile = number > self.warmup and number % every == 0
        self.bytes_received += await _drain(request)
        if not hostile:
            return await _normal(self, request)
        self.hostile_answers[mode] += 1
        return await handler(self, request)

    async def _catch(self, request: web.Request) -> web.StreamResponse:
        length = await _drain(request)
        self.catcher_requests.append(
            CaughtRequest(
                method=request.method,
                path=request.path,
                query=request.query_string,
                body_length=length,
                headers=CIMultiDict(request.headers),
            )
        )
        return _answer(valid_answer())

    async def stream(
        self, request: web.Request, response: web.StreamResponse, mode: str, chunks: Iterator[bytes]
    ) -> None:
        """Write ``chunks`` until they end, the client leaves, or the server shuts down."""
        for chunk in chunks:  # bounded by the iterator (huge_size, or ENDLESS_LIMIT)
            if _gone(request):
                self.disconnects[mode] += 1
                return
            if self.closing:
                _abort(request)  # a cut-short body must not look complete
                return
            try:
                written = await self._unless_closing(response.write(chunk))
            except ConnectionError:
                self.disconnects[mode] += 1
                return
            if not written:  # shutdown while the client was not reading
                _abort(request)
                return
            self.bytes_sent[mode] += len(chunk)
        await response.write_eof()

    async def _unless_closing(self, write: Awaitable[None]) -> bool:
        """Await ``write``; give up (False) if the server starts shutting down meanwhile."""
        assert self._closing is not None
        writing = asyncio.ensure_future(write)
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({writing, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not writing.done():
                writing.cancel()
        if writing.cancelled():
            return False
        writing.result()  # re-raises a write error
        return True

    async def pause(self, request: web.Request, seconds: float) -> None:
        """Sleep ``seconds``, returning early on shutdown or when the client goes away."""
        assert self._closing is not None
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not _gone(request):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), min(left, SLOW_POLL))
            if self.closing:
                return


async def _drain(request: web.Request) -> int:
    """Read and drop the request body (up to :data:`MAX_BODY_READ`); return its length."""
    total = 0
    async for chunk in request.content.iter_chunked(64 * KiB):  # bounded by the cap below
        total += len(chunk)
        if total >= MAX_BODY_READ:
            break
    return total


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


@contextlib.asynccontextmanager
async def running_hostile_server(**settings: Any) -> AsyncIterator[HostileServer]:
    """Start a :class:`HostileServer` (and its catcher) in the running loop; stop both on exit."""
    server = HostileServer(**settings)
    await server.start()
    try:
        yield server
    finally:
        await server.close()
