"""Shared fixtures: real servers on 127.0.0.1 (port 0), started in the test's own event loop.

* ``start_emulator(**config)`` -> base URL of a fresh emulator (kwargs go to EmulatorConfig)
* ``emulator_url`` -> base URL of a default, well-behaved emulator
* ``serve_bytes({"/a.jpg": data, "/gone": 404})`` -> base URL of a tiny static file server
* ``sample_images`` -> a few small, distinct image files under ``tmp_path / "images"``
* ``hostile_server`` -> a deliberately broken server (``tests/hostile.py``): ``.url(mode, every)``

Plain helpers (``make_image``, ``image_bytes``, ``b64``, ``emulator_stats``,
``reset_emulator``) live in ``tests/helpers.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers import make_image
from hostile import HostileServer, running_hostile_server

from batchclassify.emulator import EmulatorConfig, running_emulator

StartEmulator = Callable[..., Awaitable[str]]
ServeBytes = Callable[[Mapping[str, bytes | int]], Awaitable[str]]


@pytest.fixture
async def start_emulator() -> AsyncIterator[StartEmulator]:
    """Factory: ``url = await start_emulator(fail_rate=0.3, seed=1)``; all stop at teardown.

    Teardown is prompt even with hung requests (the emulator releases them on shutdown).
    """
    async with contextlib.AsyncExitStack() as stack:

        async def start(**config: Any) -> str:
            return await stack.enter_async_context(running_emulator(EmulatorConfig(**config)))

        yield start


@pytest.fixture
async def emulator_url(start_emulator: StartEmulator) -> str:
    """Base URL (``http://127.0.0.1:PORT``) of an emulator with the default config."""
    return await start_emulator()


@pytest.fixture
async def serve_bytes() -> AsyncIterator[ServeBytes]:
    """Factory for a loopback file server: ``base = await serve_bytes({"/a.jpg": data})``.

    A ``bytes`` value is served with 200; an ``int`` value is answered as that status (e.g.
    ``{"/missing.jpg": 404}``). Unknown paths get 404.
    """
    runners: list[web.AppRunner] = []

    async def serve(routes: Mapping[str, bytes | int]) -> str:
        table = dict(routes)

        async def handler(request: web.Request) -> web.Response:
            found = table.get(request.path)
            if isinstance(found, bytes):
                return web.Response(body=found, content_type="application/octet-stream")
            return web.Response(status=found if isinstance(found, int) else 404)

        app = web.Application()
        app.router.add_get("/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    try:
        yield serve
    finally:
        for runner in runners:
            await runner.cleanup()


@pytest.fixture
def sample_images(tmp_path: Path) -> list[Path]:
    """Six small, distinct images (4 JPEG, 2 PNG) under ``tmp_path / "images"``.

    Two share the base name ``same.jpg`` in different folders, which is what catches resume
    logic keyed on file names.
    """
    root = tmp_path / "images"
    return [
        make_image(root / "red.jpg", color=(220, 30, 30)),
        make_image(root / "green.png", color=(30, 200, 60), size=(40, 40)),
        make_image(root / "blue.jpg", color=(20, 40, 230), size=(80, 30)),
        make_image(root / "shapes.png", seed=7, size=(96, 64)),
        make_image(root / "a" / "same.jpg", seed=1),
        make_image(root / "b" / "same.jpg", seed=2),
    ]


@pytest.fixture
async def hostile_server() -> AsyncIterator[HostileServer]:
    """A hostile classification server plus its redirect catcher (see ``tests/hostile.py``).

    ``endpoint = hostile_server.url("gzip-bomb", every=2)``; stats and settings are attributes.
    Teardown is prompt even with hung or endless responses.
    """
    async with running_hostile_server() as server:
        yield server
