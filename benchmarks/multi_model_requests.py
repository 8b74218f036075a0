"""The HTTP side of ``multi_model.py``: one timed request of a trace against its SLO, a window of a trace sent on
time, each model's alone baseline, and a touch of every model (the sleep policy)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from multi_model_trace import Arrival, Baseline, Lengths, slo_misses
from serving import Record, one_request


async def _one(session: aiohttp.ClientSession, url: str, a: Arrival, t0: float, base: Baseline) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, t0 + a.t - time.perf_counter()))
    try:
        rec = await one_request(session, url, a.model, a.prompt, a.max_tokens)
    except TimeoutError:  # cut (the session's per-request limit): its disconnect aborts it in the engine
        rec = Record(status=-1)
    ttft = rec.first - rec.start if rec.first is not None else None
    tpot = (rec.end - rec.first) / (rec.output_tokens - 1) if rec.first is not None and rec.output_tokens > 1 \
        else None
    misses = slo_misses(rec.ok, ttft, tpot, len(a.prompt), base)
    return {"model": a.model, "ok": rec.ok, "status": rec.status, "ttft": ttft, "tpot": tpot, "slo": not misses,
            "misses": misses}


async def run_window(router: str, trace: list[Arrival], baselines: dict[str, Baseline], window: float,
                     drain: float) -> list[dict[str, Any]]:
    """Sends the trace on time; a request not done ``window + drain`` s after it was sent is cut (SLO missed)."""
    url = router + "/v1/completions"
    timeout = aiohttp.ClientTimeout(total=window + drain)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        t0 = time.perf_counter() + 0.2
        return await asyncio.gather(*(_one(session, url, a, t0, baselines[a.model]) for a in trace))


async def measure_alone(urls: dict[str, str], lengths: Lengths, vocab: dict[str, int]) -> dict[str, Baseline]:
    """Each model alone (the others idle): TTFT at the shortest and longest prompt, TPOT; best of two."""
    out = {}
    async with aiohttp.ClientSession() as session:
        for name, url in urls.items():
            runs: dict[int, list[tuple[float, float]]] = {lengths.prompt_min: [], lengths.prompt_max: []}
            for n in list(runs) * 2:
                prompt = [(7 * i + n) % vocab[name] for i in range(n)]
                rec = await one_request(session, url + "/v1/completions", name, prompt, 32)
                assert rec.ok and rec.first is not None, f"{name}: the alone request failed ({rec.status})"
                runs[n].append((rec.first - rec.start, (rec.end - rec.first) / (rec.output_tokens - 1)))
            short, long = (min(runs[k]) for k in (lengths.prompt_min, lengths.prompt_max))
            out[name] = Baseline(lengths.prompt_min, short[0], lengths.prompt_max, long[0],
                                 min(short[1], long[1], *(t for _, t in runs[lengths.prompt_max])))
    return out


async def touch_all(router: str, models: list[str]) -> None:
    """One one-token request per model through ``router``: wakes sleeping models and restarts their idle clocks."""
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one_request(session, router + "/v1/completions", m, [1] * 16, 1) for m in models))
