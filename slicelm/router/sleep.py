"""Idle sleep and wake-on-request for the router's replicas (vLLM's ``/sleep``, ``/wake_up``, ``/is_sleeping``).

``--idle-sleep-after S``: a replica with nothing in flight and no request for its models for ``S`` seconds is
put to sleep (``POST /sleep?level=L&mode=wait``) and leaves the routing candidates; ``slicelm up`` passes
this from the stack file's ``slicelm.idleSleep``. Whatever put a replica to sleep (this router, an operator,
``/sleep`` by hand: the loop also reads ``/is_sleeping`` every health interval), the first request for a
model none of whose replicas is awake wakes one (``POST /wake_up``) and waits for it; requests arriving
meanwhile wait for the same wake-up. A wake-up that fails answers 503. Sleeping and waking a replica are
serialised (one lock per replica), and a replica found asleep with requests in flight is woken at once,
so no request waits on a sleeper.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp

from slicelm.router.backends import Backend, BackendPool

logger = logging.getLogger("slicelm.router")
WAKE_TIMEOUT_S = 300.0


class WakeFailed(Exception):
    """No replica of the model could be woken."""


class SleepManager:
    def __init__(self, pool: BackendPool, idle_after: float | None = None, level: int = 1,
                 api_key: str | None = None, poll_interval: float = 2.0) -> None:
        self.pool = pool
        self.idle_after = idle_after
        self.level = level
        self.poll_interval = poll_interval
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.last_request: dict[str, float] = {}  # model -> when a request for it last arrived or ended
        self.started = time.monotonic()  # idle time counts from the router's start
        self._waking: dict[str, asyncio.Task[float]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.wake_seconds: list[float] = []  # router-measured wake-up times (wake_up call), newest last

    async def start(self) -> None:
        self.started = time.monotonic()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAKE_TIMEOUT_S))
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # ------------------------------------------------------------------------------ requests
    def touch(self, model: str) -> None:
        self.last_request[model] = time.monotonic()

    async def ensure_awake(self, model: str) -> None:
        """Before routing a request for ``model``: when none of its live replicas is awake, wake one and wait."""
        self.touch(model)
        serving = [b for b in self.pool.backends.values() if b.healthy and model in b.models]
        if not serving or any(not b.sleeping for b in serving):
            return
        b = next((b for b in serving if b.url in self._waking), serving[0])
        task = self._waking.get(b.url)
        if task is None:
            task = self._waking[b.url] = asyncio.create_task(self._wake(b))
            task.add_done_callback(lambda _t, url=b.url: self._waking.pop(url, None))
        try:
            await asyncio.shield(task)
        except Exception as e:
            raise WakeFailed(f"replica {b.url} of '{model}' is asleep and did not wake up: {e}") from None

    def _lock(self, b: Backend) -> asyncio.Lock:
        return self._locks.setdefault(b.url, asyncio.Lock())

    async def _wake(self, b: Backend) -> float:
        assert self._session is not None
        async with self._lock(b):
            if not b.sleeping:
                return 0.0
            t0 = time.monotonic()
            async with self._session.post(f"{b.url}/wake_up", headers=self.headers) as r:
                if r.status != 200:
                    raise WakeFailed(f"/wake_up answered {r.status}: {(await r.text())[:200]}")
            took = time.monotonic() - t0
            self.wake_seconds.append(took)
            logger.info("Woke up %s in %.3f s", b.url, took)
            self._set_sleeping(b, False)
            return took

    def _set_sleeping(self, b: Backend, sleeping: bool) -> None:
        if b.sleeping != sleeping:
            b.sleeping = sleeping
            self.pool.reindex()

    # ------------------------------------------------------------------------------ idle loop
    async def _loop(self) -> None:
        last_poll = 0.0
        tick = min(self.poll_interval, self.idle_after / 4) if self.idle_after else self.poll_interval
        while True:
            await asyncio.sleep(tick)
            try:
                if time.monotonic() - last_poll >= self.poll_interval:
                    last_poll = time.monotonic()
                    await asyncio.gather(*(self._poll(b) for b in list(self.pool.backends.values())))
                if self.idle_after:
                    await asyncio.gather(*(self._sleep_if_idle(b) for b in self._idle_backends()))
            except Exception:
                logger.exception("idle sleep loop failed")

    async def _poll(self, b: Backend) -> None:
        """Reads ``/is_sleeping`` (a replica may have been put to sleep by someone else)."""
        assert self._session is not None
        if not b.healthy or self._lock(b).locked():
            return
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
            async with self._session.get(f"{b.url}/is_sleeping", headers=self.headers,
                                         timeout=aiohttp.ClientTimeout(total=3.0)) as r:
                if r.status == 200:
                    self._set_sleeping(b, bool((await r.json()).get("is_sleeping")))
        if b.sleeping and b.in_flight > 0:
            await self._wake(b)

    def _idle_backends(self) -> list[Backend]:
        now = time.monotonic()
        assert self.idle_after is not None
        return [b for b in self.pool.backends.values()
                if b.healthy and not b.sleeping and b.in_flight == 0 and b.url not in self._waking
                and all(now - self.last_request.get(m, self.started) >= self.idle_after for m in b.models)]

    async def _sleep_if_idle(self, b: Backend) -> None:
        assert self._session is not None
        async with self._lock(b):
            if b.sleeping or b not in self._idle_backends():
                return
            self._set_sleeping(b, True)  # out of the candidates first: new requests now wake it (after us)
            try:
                async with self._session.post(f"{b.url}/sleep", params={"level": str(self.level), "mode": "wait"},
                                              headers=self.headers) as r:
                    ok = r.status == 200
            except (aiohttp.ClientError, OSError, TimeoutError):
                ok = False
            if not ok:
                self._set_sleeping(b, False)
                return
            logger.info("Put %s to sleep (level %d) after %.0f s without requests", b.url, self.level,
                        self.idle_after)
        if b.in_flight > 0:  # a request was on its way to it while it went to sleep
            await self._wake(b)
