"""Per-response load reporting: ORCA's ``endpoint-load-metrics`` header and the request-parameter histograms.

A client (Envoy, a gateway) that sends ``endpoint-load-metrics-format: TEXT`` or ``JSON`` gets the
server's load in an ``endpoint-load-metrics`` response header, as vLLM sends it:
``TEXT named_metrics.kv_cache_usage_perc=0.1, named_metrics.num_requests_waiting=0.0`` or
``JSON {"named_metrics": {...}}``.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from slicelm.engine.async_llm import WARMING_UP
from slicelm.entrypoints.server.state import ServerState


def named_load_metrics(state: ServerState) -> dict[str, float]:
    stats = state.engine.last_stats
    return {"kv_cache_usage_perc": float(stats.kv_cache_usage), "num_requests_waiting": float(stats.num_waiting)}


def load_headers(state: ServerState, raw: Request) -> dict[str, str]:
    fmt = (raw.headers.get("endpoint-load-metrics-format") or "").strip().lower()
    if fmt not in ("text", "json"):
        return {}
    metrics = named_load_metrics(state)
    if fmt == "text":
        value = "TEXT " + ", ".join(f"named_metrics.{k}={v}" for k, v in metrics.items())
    else:
        value = "JSON " + json.dumps({"named_metrics": metrics})
    return {"endpoint-load-metrics": value}


def observe_params(state: ServerState, params: Any) -> None:
    """``vllm:request_params_n`` / ``vllm:request_params_max_tokens`` for an accepted generation request."""
    if state.metrics is not None and not WARMING_UP.get():
        state.metrics.observe_request_params(int(getattr(params, "n", 1) or 1), getattr(params, "max_tokens", None))
