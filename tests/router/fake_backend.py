"""A tiny OpenAI-shaped backend for staging faults (run as a subprocess): fixed delays, SSE streams of N chunks,
a process that dies mid-stream, and a ``vllm:*`` ``/metrics`` page. A request whose client (the router) goes away
is cancelled and counted per path (``fake_cancelled_total{path=…}``), as a real server aborts it.

    python tests/router/fake_backend.py --port 9001 --model fake [--delay 0.1] [--chunks 5] [--chunk-interval 0.01]
        [--die-after-chunks 3] [--hold-until-running N]

``--hold-until-running N`` keeps every stream after its first chunk until N requests run at once (at most 120 s):
a barrier proving that N streams were open together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from aiohttp import web

from slicelm.router.app import PROXIED
from slicelm.router.limits import raise_open_files_limit


def build(args: argparse.Namespace) -> web.Application:
    state = {"running": 0, "served": 0, "peak": 0}
    cancelled: dict[str, int] = {}
    all_running = asyncio.Event()

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                              "owned_by": "fake"} for m in args.model]})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running "
                            f"{state['running']}\n# TYPE vllm:num_requests_waiting gauge\n"
                            f"vllm:num_requests_waiting 0\n# TYPE fake_peak_running gauge\n"
                            f"fake_peak_running {state['peak']}\n# TYPE fake_served gauge\n"
                            f"fake_served {state['served']}\n# TYPE fake_cancelled_total counter\n" +
                            "".join(f'fake_cancelled_total{{path="{k}"}} {v}\n' for k, v in cancelled.items()),
                            content_type="text/plain")

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        state["running"] += 1
        state["served"] += 1
        state["peak"] = max(state["peak"], state["running"])
        if args.hold_until_running and state["running"] >= args.hold_until_running:
            all_running.set()
        seq = state["served"]
        rid = request.headers.get("X-Request-Id", "")
        try:
            if args.delay:
                await asyncio.sleep(args.delay)
            if not body.get("stream"):
                return web.json_response({"id": rid, "object": "text_completion", "model": body.get("model"),
                                          "port": args.port, "seq": seq, "headers": dict(request.headers),
                                          "choices": [{"index": 0, "text": "ok",
                                                                          "finish_reason": "stop"}],
                                          "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}},
                                         headers={"X-Backend-Port": str(args.port)})
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Backend-Port": str(args.port)})
            await out.prepare(request)
            for i in range(args.chunks):
                if args.die_after_chunks is not None and i == args.die_after_chunks:
                    os._exit(1)
                delta = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": body.get("model"), "port": args.port,
                         "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]}
                await out.write(b"data: " + json.dumps(delta).encode() + b"\n\n")
                if i == 0 and args.hold_until_running:
                    await asyncio.wait_for(all_running.wait(), 120)
                if args.chunk_interval:
                    await asyncio.sleep(args.chunk_interval)
            await out.write(b"data: [DONE]\n\n")
            await out.write_eof()
            return out
        except asyncio.CancelledError:  # the client left (handler_cancellation)
            cancelled[request.path] = cancelled.get(request.path, 0) + 1
            raise
        finally:
            state["running"] -= 1

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    for path in PROXIED:
        app.router.add_post(path, generate)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--chunks", type=int, default=5)
    p.add_argument("--chunk-interval", type=float, default=0.0)
    p.add_argument("--die-after-chunks", type=int, default=None)
    p.add_argument("--hold-until-running", type=int, default=0)
    args = p.parse_args()
    raise_open_files_limit()
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(build(args), host="127.0.0.1", port=args.port, access_log=None, print=None, backlog=4096,
                handler_cancellation=True, loop=loop)


if __name__ == "__main__":
    main()
