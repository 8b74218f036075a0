"""``slicelm download MODEL``: fetch what ``slicelm serve MODEL`` loads into the Hub cache, and print where it is.

For machines that serve offline: run it where the Hub is reachable, then copy the cache (or share it), and
serve with ``HF_HUB_OFFLINE=1``. Torch-free (a light subcommand): it only talks to the Hub.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

COMMANDS = ("download",)


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="fetch a Hub model (and its tokenizer) into the cache for offline serving")
    p.add_argument("model", help="Hub repo id: org/name, or org/name:QUANT for a GGUF repo")
    p.add_argument("--revision", default=None)
    p.add_argument("--tokenizer", default=None, help="a separate tokenizer repo (e.g. for a GGUF model)")
    p.add_argument("--tokenizer-revision", default=None)
    p.add_argument("--download-dir", default=None)
    p.add_argument("--hf-token", nargs="?", const=True, default=None)
    p.add_argument("--ignore-patterns", nargs="+", default=["original/**/*"])
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: config and tokenizer files only")


def run(args: argparse.Namespace) -> int:
    from slicelm.loader.hub import HubOptions, fetch

    opts = HubOptions(args.revision, args.download_dir, args.hf_token, tuple(args.ignore_patterns))
    try:
        snap = fetch(args.model, opts, weights=args.load_format != "dummy")
        print(f"{args.model}: {snap.model_path} (commit {snap.commit})")
        if args.tokenizer:
            tok = fetch(args.tokenizer, dataclasses.replace(opts, revision=args.tokenizer_revision), weights=False)
            print(f"{args.tokenizer}: {tok.model_path} (commit {tok.commit})")
    except ValueError as e:
        print(f"slicelm download: error: {e}", file=sys.stderr)
        return 2
    return 0
