"""Replay: the dashboard page served from a recorded state instead of a live router, so a run recorded on a machine
without a browser (``benchmarks/dashboard_capture.py`` on a GPU host) can be rendered elsewhere.

A recording is ``{"device", "commit", "date", "workload", "snapshots": [state, ...]}`` where each state is what
``/dashboard/api/state`` answered; the page gets one of them, marked ``"replay"`` so it says it is a recording.

    python -m slicelm.router.dashboard.replay RECORDING.json [--frame -1] [--port 8088]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from slicelm.router.dashboard.routes import add_page_routes


def load_recording(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not data.get("snapshots"):
        raise ValueError(f"{path}: not a dashboard recording (no 'snapshots')")
    return data


def replay_state(recording: dict[str, Any], frame: int = -1, source: str | None = None) -> dict[str, Any]:
    """The ``frame``-th recorded state (default: the last, whose history covers the whole run), marked as a replay."""
    snap = recording["snapshots"][frame]
    return {**snap, "replay": {"source": source, "device": recording.get("device"), "captured_at": snap["time"],
                               "commit": recording.get("commit"), "workload": recording.get("workload")}}


def replay_app(state: dict[str, Any]) -> web.Application:
    app = web.Application()

    async def fixed() -> dict[str, Any]:
        return state

    add_page_routes(app, fixed)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slicelm.router.dashboard.replay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recording")
    p.add_argument("--frame", type=int, default=-1, help="which snapshot (default: the last)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8088)
    args = p.parse_args(argv)
    try:
        state = replay_state(load_recording(args.recording), args.frame, args.recording)
    except (OSError, ValueError, IndexError) as e:
        print(f"replay: error: {e}", file=sys.stderr)
        return 2
    print(f"replaying {args.recording} on http://{args.host}:{args.port}/dashboard/", flush=True)
    web.run_app(replay_app(state), host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
