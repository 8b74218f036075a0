"""``slicelm top``: registered by ``slicelm/entrypoints/cli.py`` (no torch)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console

COMMANDS = ("top",)


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("top", help="the stack's dashboard in the terminal (GPUs, slices, models, load)")
    p.add_argument("--url", default=None, help="a router (its base URL or its /dashboard URL); default: the "
                   "router of the stack in --run-dir")
    p.add_argument("--run-dir", default=None, help="a slicelm up run dir (default: $XDG_STATE_HOME/slicelm/stack)")
    p.add_argument("--api-key", default=None, help="the router's --api-key (default: env VLLM_API_KEY)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print the state once and exit")
    p.add_argument("--format", choices=["table", "json"], default="table", help="json: the state, once")


def run(args: argparse.Namespace) -> int:
    from slicelm.router.dashboard.top import TopError, read_state, render
    from slicelm.stack.state import resolve_run_dir

    if not args.interval > 0:
        print("slicelm top: error: --interval: must be > 0", file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get("VLLM_API_KEY") or os.environ.get("SLICELM_API_KEY")
    run_dir: Path = resolve_run_dir(args.run_dir)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 180))  # a pipe or a file: no terminal to fit
    try:
        state = read_state(args.url, run_dir, api_key)
        if args.format == "json":
            print(json.dumps(state, indent=2))
            return 0
        if args.once or not console.is_terminal:
            console.print(render(state))
            return 0
        from rich.live import Live

        with Live(render(state), console=console, screen=False, auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                live.update(render(read_state(args.url, run_dir, api_key)), refresh=True)
    except TopError as e:
        print(f"slicelm top: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slicelm")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["top", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
