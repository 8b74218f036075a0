"""A screenshot of the dashboard in headless Chromium (Debian's ``chromium``, driven by Playwright; Playwright
never downloads a browser here): of a live router, or of a recording (replay.py) served on a free local port.

    python -m slicelm.router.dashboard.render --url http://127.0.0.1:8000/dashboard/ --out docs/dashboard_cpu.png
    python -m slicelm.router.dashboard.render --replay benchmarks/results/dashboard_capture_nvidia-h200.json \
        --out docs/dashboard_gpu_h200.png
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    """Debian's chromium, if installed (scripts/setup.sh installs it where apt and root are)."""
    return CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")


def launch(playwright: Any) -> Any:
    """A fresh headless Chromium (Playwright gives each launch its own new user-data dir)."""
    path = chromium_path()
    if path is None:
        raise RuntimeError("no chromium: install the Debian package chromium (scripts/setup.sh does, as root)")
    return playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)


@contextlib.contextmanager
def serve_replay(recording: str, frame: int = -1) -> Iterator[str]:
    """Serves a recording on a free local port from its own thread and event loop (Playwright's sync API owns
    this thread's loop); yields the page's URL."""
    from aiohttp import web

    from slicelm.router.dashboard.replay import load_recording, replay_app, replay_state

    app = replay_app(replay_state(load_recording(recording), frame, Path(recording).name))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    started = threading.Event()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    if not started.wait(30):
        raise RuntimeError("the replay server did not start")
    try:
        yield f"http://127.0.0.1:{port}/dashboard/"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def screenshot(url: str, out: Path, width: int = 1480, api_key: str | None = None, scale: float = 1.5) -> list[str]:
    """Renders ``url`` once the page drew a state; writes the full page to ``out``; returns console errors."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900}, device_scale_factor=scale)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            if api_key:
                page.add_init_script(f"sessionStorage.setItem('slicelm.dashboard.apiKey', {api_key!r})")
            page.goto(url)
            page.wait_for_function("document.body.dataset.renderedAt", timeout=30_000)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()
    return errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slicelm.router.dashboard.render", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a live dashboard page")
    src.add_argument("--replay", help="a recording (benchmarks/dashboard_capture.py's results JSON)")
    p.add_argument("--frame", type=int, default=-1, help="with --replay: which snapshot (default: the last)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--width", type=int, default=1480)
    p.add_argument("--api-key", default=None)
    args = p.parse_args(argv)
    with serve_replay(args.replay, args.frame) if args.replay else contextlib.nullcontext(args.url) as url:
        errors = screenshot(url, args.out, args.width, args.api_key)
    for e in errors:
        print(f"console error: {e}", file=sys.stderr)
    print(f"wrote {args.out}" + (" (rendered from recorded state)" if args.replay else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
