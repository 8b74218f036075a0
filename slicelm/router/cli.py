"""``slicelm router [flags]``: production-stack's router flags (``--static-backends``, ``--routing-logic`` …) plus a
stack (``--stack``) and the timeouts and queue bounds that keep requests from hanging. Imports no torch."""

from __future__ import annotations

import argparse
import sys

from slicelm.router.config import DISCOVERY_TYPES, RouterConfig
from slicelm.router.logic import LOGICS

COMMANDS = ("router",)


def _choice(flag: str, choices: tuple[str, ...]):  # type: ignore[no-untyped-def]
    """An argparse type whose error names the flag and the accepted values."""

    def parse(value: str) -> str:
        if value not in choices:
            raise argparse.ArgumentTypeError(f"{flag}: unknown value {value!r} (choose from {', '.join(choices)})")
        return value

    return parse


def add_router_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0", help="address to listen on")
    g.add_argument("--port", type=int, default=8001, help="port to listen on")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer <key>' (default: env VLLM_API_KEY)")
    g.add_argument("--log-level", default="info", type=_choice("--log-level", ("critical", "error", "warning", "info",
                                                                                "debug")))
    d = p.add_argument_group("discovery (production-stack's flags)")
    d.add_argument("--service-discovery", default="static", type=_choice("--service-discovery", DISCOVERY_TYPES))
    d.add_argument("--static-backends", default=None, help="backend URLs, comma separated")
    d.add_argument("--static-models", default=None, help="one model name per backend, comma separated")
    d.add_argument("--static-model-types", default=None, help="one type per backend (chat, completion, embeddings, "
                   "rerank, score), comma separated")
    d.add_argument("--static-model-labels", default=None, help=argparse.SUPPRESS)  # accepted for compatibility
    d.add_argument("--stack", default=None, help="a `slicelm up` run dir, its state.json, or the stack file")
    d.add_argument("--k8s-namespace", default="default")
    d.add_argument("--k8s-label-selector", default="")
    d.add_argument("--k8s-port", type=int, default=8000)
    r = p.add_argument_group("routing")
    r.add_argument("--routing-logic", default="roundrobin", type=_choice("--routing-logic", tuple(LOGICS)))
    r.add_argument("--session-key", default=None, help="header (then body field) that identifies a session")
    r.add_argument("--prefix-min-match-length", type=int, default=0,
                   help="prefixaware: below this many matched characters, route to the least-loaded replica")
    r.add_argument("--prefix-max-imbalance", type=float, default=4,
                   help="prefixaware: leave the prefix's replica when it has this many more requests in flight "
                        "(scraped + router) than the least-loaded one")
    r.add_argument("--engine-stats-interval", type=float, default=30, help="seconds between /metrics scrapes")
    r.add_argument("--request-stats-window", type=float, default=60, help="sliding window (s) of request stats")
    r.add_argument("--log-stats", action="store_true", help="log per-backend stats periodically")
    r.add_argument("--log-stats-interval", type=float, default=10)
    f = p.add_argument_group("failures and queueing")
    f.add_argument("--max-instance-failover-reroute-attempts", type=int, default=2,
                   help="retries on another replica of a request that has not started streaming")
    f.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to connect to a replica")
    f.add_argument("--first-byte-timeout", type=float, default=300.0,
                   help="seconds to the first byte of a replica's answer (a non-streamed answer: all of it)")
    f.add_argument("--stream-idle-timeout", type=float, default=300.0,
                   help="seconds a started stream may stay silent before it is ended with an error event")
    f.add_argument("--health-check-interval", type=float, default=2.0)
    f.add_argument("--health-check-timeout", type=float, default=3.0)
    f.add_argument("--health-failure-threshold", type=int, default=2,
                   help="timed-out health checks in a row that eject a stalled replica (refused: at once)")
    f.add_argument("--max-inflight-per-replica", type=int, default=256,
                   help="requests the router keeps in flight per replica before queueing (0: no limit)")
    f.add_argument("--max-queue-size", type=int, default=1024, help="waiting requests per model before 429")
    f.add_argument("--queue-timeout", type=float, default=60.0, help="seconds a request may wait before 429")
    s = p.add_argument_group("sleep mode (replicas started with --enable-sleep-mode)")
    s.add_argument("--idle-sleep-after", type=float, default=None,
                   help="put a replica to sleep after this many seconds without requests for its models; the "
                        "first request for a sleeping model wakes a replica (off by default)")
    s.add_argument("--idle-sleep-level", type=int, default=1, help="sleep level for idle replicas (1 or 2)")


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("router", help="one OpenAI endpoint routing to many replicas (production-stack's flags)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_router_args(p)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = RouterConfig.from_args(args)
        from slicelm.router.app import serve

        return serve(cfg)
    except ValueError as e:
        print(f"slicelm router: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slicelm")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["router", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
