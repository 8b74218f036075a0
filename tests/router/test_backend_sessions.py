"""A replica ejected (health 503) or removed (its process gone from the stack) while the router streams from it: the
stream must still end when the replica's connection does. aiohttp never wakes a response read whose session was
closed under it, so closing the session on ejection left such a stream waiting forever (the stack test's killed
engine core: its two in-flight streams hung while the router had already ejected the replica)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from slicelm.router.backends import BackendPool, PoolConfig
from slicelm.router.discovery import StaticDiscovery


async def _dying_replica() -> tuple[web.AppRunner, str, asyncio.Event]:
    """A replica that streams one event, then drops the connection when ``die`` is set (as a killed process)."""
    die = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        await die.wait()
        assert request.transport is not None
        request.transport.close()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}", die


@pytest.mark.parametrize("how", ["eject", "remove"])
def test_a_stream_of_an_ejected_or_removed_replica_still_ends(how: str) -> None:
    async def main() -> None:
        runner, url, die = await _dying_replica()
        discovery = StaticDiscovery([url], ["m"])
        pool = BackendPool(discovery, PoolConfig())
        pool.sync()
        b = pool.backends[url]
        session = b.acquire()
        resp = await session.post(url + "/v1/chat/completions", data=b"{}")
        assert await resp.content.readany() == b"data: 1\n\n"
        if how == "eject":
            pool.eject(b, "/health answered 503")
            assert b.session is not session  # new requests use a fresh session
        else:
            discovery._endpoints = []
            pool.sync()
            assert url not in pool.backends
        await asyncio.sleep(0.1)
        assert not session.closed  # a request still reads from it
        die.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            async with asyncio.timeout(10):
                while await resp.content.readany():
                    pass
        resp.close()
        b.release(session)
        await asyncio.sleep(0.1)
        assert session.closed and b.in_flight == 0  # the retired session closes with its last request
        await b.close()
        await runner.cleanup()

    asyncio.run(main())
