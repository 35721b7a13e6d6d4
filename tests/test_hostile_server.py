"""Tests of the hostile test server itself (``tests/hostile.py``), with plain aiohttp calls.

Every read of a big or endless body is bounded: a few MiB at most, then the response is closed.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import struct
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import hostile
import pytest
from hostile import (
    ESCAPE_CLASS,
    FORMULA_CLASSES,
    MODES,
    GiB,
    HostileServer,
    MiB,
    gzip_bomb,
    handler_for,
    running_hostile_server,
)

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
BODY = b"aGVsbG8gd29ybGQ="  # base64 text, as the client sends it
KEY = "SECRET-KEY-123"
SINGLE_KEYS = ["time", "image", "predictions", "top", "confidence", "inference_id"]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        yield client


def classify_url(server: HostileServer, mode: str, every: int = 1) -> str:
    return f"{server.url(mode, every)}/proj/3?api_key={KEY}"


async def read_prefix(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most ``limit`` bytes of the body (less if it ends first)."""
    parts: list[bytes] = []
    size = 0
    while size < limit:  # bounded: each pass adds bytes, or the body ended
        part = await response.content.read(min(limit - size, MiB))
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)


async def post(
    session: aiohttp.ClientSession, url: str, *, limit: int = 4 * MiB, **kwargs: Any
) -> tuple[int, aiohttp.ClientResponse, bytes]:
    kwargs.setdefault("allow_redirects", False)
    async with session.post(url, data=BODY, headers=FORM, **kwargs) as response:
        return response.status, response, await read_prefix(response, limit)


async def eventually(condition: Callable[[], bool], seconds: float = 3.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # bounded by the deadline
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# --- URLs, counting ---------------------------------------------------------------------------


def test_url_rejects_unknown_modes_and_bad_every(hostile_server: HostileServer) -> None:
    assert hostile_server.url("nan", 4) == f"{hostile_server.base}/nan/4"
    assert hostile_server.url("status-503").endswith("/status-503/1")
    for mode in ("nope", "status-99", "status-600", "redirect-305", "redirect-200"):
        with pytest.raises(ValueError):
            hostile_server.url(mode)
    with pytest.raises(ValueError):
        hostile_server.url("nan", every=0)
    assert handler_for("redirect-308") is not None


def test_every_mode_is_documented() -> None:
    doc = hostile.__doc__ or ""
    for mode in [*MODES, "status-NNN", "redirect-NNN"]:
        assert f"``{mode}``" in doc, mode


async def test_unknown_mode_or_every_is_404(
    hostile_server: HostileServer, session: aiohttp.ClientSession
) -> None:
    status, _, _ = await post(session, f"{hostile_server.base}/nope/1/proj/3")
    assert status == 404
    status, _, _ = await post(session, f"{hostile_server.base}/nan/0/proj/3")
    assert status == 404
    assert sum(hostile_server.requests.values()) == 0


async def test_every_n_counts_per_mode_path(
    hostile_server: HostileServer, session: aiohttp.ClientSession
) -> None:
    every3 = [
        (await post(session, classify_url(hostile_server, "status-500", 3)))[0] for _ in range(6)
    ]
    every2 = [
        (await post(session, classify_url(hostile_server, "status-500", 2)))[0] for _ in range(4)
    ]
    assert every3 == [200, 200, 500, 200, 200, 500]
    assert every2 == [200, 500, 200, 500]
    assert hostile_server.requests["status-500"] == 10
    assert hostile_server.hostile_answers["status-500"] == 4
    assert hostile_server.bytes_received == 10 * len(BODY)


async def test_normal_answer_has_exactly_the_documented_shape(
    hostile_server: HostileServer, session: aiohttp.ClientSession
) -> None:
    status, response, body = await post(session, classify_url(hostile_server, "deep", 2))
    assert status == 200
    assert response.content_type == "application/json"
    data = json.loads(body)
    assert list(data) == SINGLE_KEYS
    assert data["top"] == "cat" and data["confidence"] == 0.9
    assert data["predictions"][0] == {"class": "cat", "class_id": 0, "confidence": 0.9}
    assert data["image"] == {"width": 64, "height": 48}
    uuid.UUID(data["inference_id"])


async def test_get_with_image_url_is_served_without_fetching(
    hostile_server: HostileServer, session: aiohttp.ClientSession
) -> None:
    url = f"{hostile_server.url('nan')}/proj/3"
    params = {"api_key": KEY, "image": "https://example.invalid/a.jpg"}
    async with session.get(url, params=params) as response:
        assert response.status == 200
        assert "NaN" in await response.text()
    assert hostile_server.requests["nan"] == 1


# --- bodies with bad values or shapes --------------------------------------------------------


#: mode -> a predicate on (the ASCII body text, the parsed body) that must hold
CHECKS: dict[str, Callable[[str, Any], bool]] = {
    "nan": lambda text, d: (
        "NaN" in text
        and math.isnan(d["confidence"])
        and math.isnan(d["predictions"][1]["confidence"])
    ),
    "infinity": lambda text, d: (
        "-Infinity" in text
        and d["confidence"] == math.inf
        and d["predictions"][1]["confidence"] == -math.inf
    ),
    "out-of-range": lambda text, d: (
        (d["confidence"], d["predictions"][1]["confidence"]) == (1.7, -0.2)
    ),
    "huge-number": lambda text, d: (
        "1e999" in text and d["confidence"] == math.inf and d["image"]["width"] == 10**400
    ),
    "predictions-null": lambda text, d: d["predictions"] is None,
    "predictions-string": lambda text, d: isinstance(d["predictions"], str),
    "predictions-numbers": lambda text, d: d["predictions"] == [1, 2, 3],
    "top-list": lambda text, d: d["top"] == ["l"],
    "class-not-string": lambda text, d: [p["class"] for p in d["predictions"]] == [5, None],
    "bad-types": lambda text, d: (
        (d["image"]["width"], d["inference_id"], d["time"]) == ("abc", {"a": 1}, "soon")
    ),
    "escape-codes": lambda text, d: (
        "\\u001b]0;pwned\\u0007\\u001b[2Jcat" in text and d["top"] == ESCAPE_CLASS
    ),
    "formula": lambda text, d: (
        [p["class"] for p in d["predictions"]] == list(FORMULA_CLASSES)
        and d["top"] == FORMULA_CLASSES[0]
    ),
    "surrogate-class": lambda text, d: '"\\ud800x"' in text and d["top"] == "\ud800x",
}


@pytest.mark.parametrize("mode", sorted(CHECKS))
async def test_bad_value_modes(
    mode: str, hostile_server: HostileServer, session: aiohttp.ClientSession
) -> None:
    status, response, body = await post(session, classify_url(hostile_server, mode))
    assert status == 200
    assert response.content_type == "application/json"
    text = body.decode("ascii")  # ASCII only: escapes stay escapes
    assert CHECKS[mode](text, json.loads(text)), text[:2000]
    assert hostile_server.hostile_answers[mode] == 1


async def test_many_classes_is_a_big_multi_label_answer(
    hostile_server: HostileServer, session: aiohttp.ClientSession
) -> None:
    _, _, body = await post(session, classify_url(hostile_server, "many-classes"))
    data = json.loads(body)
    assert len(data["predictions"]) == 5000 == len(data["predicted_classes"])
    assert data["predictions"]["c00001"] == {"confidence": 0.9, "class_id": 0}
    assert "top" not in data
    hostile_server.many_classes = 3
    _, _, body = await post(session, classify_url(hostile_server, "many-classes"))
    assert json.loads(body)["predicted_classes"] == ["c00001", "c00002", "c00003"]


async def test_deep_and_charset(
    hostile_server: HostileServer, session: aiohttp.ClientSession
) -> None:
    status, response, body = await post(session, classify_url(hostile_server, "deep"))
    assert status == 200 and response.content_type == "application/json"
    assert body == b"[" * 200_000 + b"]" * 200_000
    status, response, body = await post(session, classify_url(hostile_server, "charset"))
    assert status == 200
    assert response.headers["Content-Type"] == "application/json; charset=base64"
    assert json.loads(body)["top"] == "cat"


# --- echoing error pages ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "status", "content_type"),
    [
        ("html-echo", 200, "text/html"),
        ("html-echo-500", 500, "text/html"),
        ("json-echo-400", 400, "application/json"),
    ],
)
async def test_echo_modes_leak_the_key(
    mode: str,
    status: int,
    content_type: str,
    hostile_server: HostileServer,
    session: aiohttp.ClientSession,
) -> None:
    headers = {**FORM, "Authorization": f"Bearer {KEY}"}
    url = classify_url(hostile_server, mode)
    async with session.post(url, data=BODY, headers=headers) as response:
        assert response.status == status
        assert response.content_type == content_type
        text = await response.text()
    assert f"api_key={KEY}" in text
    if content_type == "text/html":
        assert f"Bearer {KEY}" in text
    else:
        assert json.loads(text)["message"] == f"bad image for {url}"


# --- statuses and redirects ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "status", "retry_after"),
    [
        ("status-503", 503, "1"),
        ("status-429", 429, "1"),
        ("status-410", 410, None),
        ("status-501", 501, None),
        ("status-507", 507, None),
        ("retry-after-huge", 429, "999999"),
    ],
)
async def test_status_modes(
    mode: str,
    status: int,
    retry_after: str | None,
    hostile_server: HostileServer,
    session: aiohttp.ClientSession,
) -> None:
    got, response, body = await post(session, classify_url(hostile_server, mode))
    assert got == status
    assert response.headers.get("Retry-After") == retry_after
    assert isinstance(json.loads(body)["message"], str)


async def test_retry_after_setting(
    hostile_server: HostileServer, session: aiohttp.ClientSession
) -> None:
    hostile_server.retry_after = "7"
    _, response, _ = await post(session, classify_url(hostile_server, "status-503"))
    assert response.headers["Retry-After"] == "7"
    hostile_server.retry_after = None
    _, response, _ = await post(session, classify_url(hostile_server, "status-503"))
    assert "Retry-After" not in response.headers


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
async def test_redirects_go_to_the_catcher(
    code: int, hostile_server: HostileServer, session: aiohttp.ClientSession
) -> None:
    url = classify_url(hostile_server, f"redirect-{code}")
    status, response, _ = await post(session, url)
    assert status == code
    path_qs = f"/redirect-{code}/1/proj/3?api_key={KEY}"
    assert response.headers["Location"] == hostile_server.catcher_base + path_qs
    assert hostile_server.catcher_requests == []

    status, _, body = await post(session, url, allow_redirects=True)
    assert status == 200 and json.loads(body)["top"] == "cat"
    [caught] = hostile_server.catcher_requests
    assert (caught.path, caught.query) == (f"/redirect-{code}/1/proj/3", f"api_key={KEY}")
    keeps_body = code in (307, 308)
    assert caught.method == ("POST" if keeps_body else "GET")
    assert caught.body_length == (len(BODY) if keeps_body else 0)
    assert "Host" in caught.headers


# --- big, endless and compressed bodies ------------------------------------------------------


async def test_huge_is_streamed_and_stops_when_the_client_leaves(
    hostile_server: HostileServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(classify_url(hostile_server, "huge"), data=BODY, headers=FORM) as r:
        assert r.status == 200 and r.content_type == "application/json"
        assert r.content_length == 200 * 1000 * 1000
        prefix = await read_prefix(r, 2 * MiB)
        assert prefix.startswith(b'{"predictions": [   ')
        assert len(prefix) == 2 * MiB
        r.close()  # drop the connection: the server must notice
    await eventually(lambda: hostile_server.disconnects["huge"] == 1)
    assert hostile_server.bytes_sent["huge"] < 100 * MiB


async def test_huge_size_setting_gives_an_exact_complete_body(
    hostile_server: HostileServer, session: aiohttp.ClientSession
) -> None:
    hostile_server.huge_size = 2 * MiB + 5
    _, response, body = await post(session, classify_url(hostile_server, "huge"), limit=4 * MiB)
    assert response.content_length == len(body) == 2 * MiB + 5
    assert body.rstrip(b" ") == b'{"predictions": ['
    assert hostile_server.disconnects["huge"] == 0


async def test_endless_is_chunked_and_stops_when_the_client_leaves(
    hostile_server: HostileServer, session: aiohttp.ClientSession
) -> None:
    url = classify_url(hostile_server, "endless")
    async with session.post(url, data=BODY, headers=FORM) as response:
        assert response.status == 200
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert response.content_length is None
        assert len(await read_prefix(response, 3 * MiB)) == 3 * MiB
        response.close()
    await eventually(lambda: hostile_server.disconnects["endless"] == 1)


async def test_gzip_bomb_is_small_on_the_wire(hostile_server: HostileServer) -> None:
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        status, response, wire = await post(
            raw, classify_url(hostile_server, "gzip-bomb"), limit=4 * MiB
        )
    assert status == 200
    assert response.headers["Content-Encoding"] == "gzip"
    assert 0.9 * 1e6 < len(wire) < 1.2 * 1e6
    assert struct.unpack("<I", wire[-4:])[0] == GiB % 2**32  # gzip ISIZE
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    head = inflate.decompress(wire, 4 * MiB)  # bounded
    assert head == bytes(4 * MiB)


def test_gzip_bomb_builder_is_a_valid_gzip_member() -> None:
    bomb = gzip_bomb(8 * MiB)
    assert gzip.decompress(bomb) == bytes(8 * MiB)  # checks the CRC and size too
    assert len(bomb) < 10_000
    with pytest.raises(ValueError):
        gzip_bomb(MiB + 1)


# --- time and teardown -----------------------------------------------------------------------


async def test_slow_answers_after_the_delay(
    hostile_server: HostileServer, session: aiohttp.ClientSession
) -> None:
    hostile_server.slow_seconds = 0.3
    started = time.monotonic()
    status, _, body = await post(session, classify_url(hostile_server, "slow"))
    assert 0.3 <= time.monotonic() - started < 2
    assert status == 200 and json.loads(body)["top"] == "cat"


async def test_shutdown_is_prompt_with_hung_and_streaming_responses(
    session: aiohttp.ClientSession,
) -> None:
    async with running_hostile_server(slow_seconds=60) as server:
        slow = asyncio.create_task(post(session, classify_url(server, "slow")))
        # open streams the client does not read: the server fills the socket buffers and waits
        streams = [
            await session.post(classify_url(server, mode), data=BODY, headers=FORM)
            for mode in ("huge", "endless")
        ]
        await eventually(lambda: server.requests["slow"] == 1)
        started = time.monotonic()
    assert time.monotonic() - started < 1.5
    for response in streams:
        response.close()
    status, _, body = await asyncio.wait_for(slow, 2)  # released at shutdown: answered early
    assert status == 200 and json.loads(body)["top"] == "cat"
    assert server.disconnects == {}  # the streams were cut by the shutdown, not by the client
