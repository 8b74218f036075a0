"""vLLM's ``usage`` blocks: the full one of a response body and the two a stream sends; the per-request timing
``metrics`` of ``--enable-per-request-metrics``.

vLLM serializes a response with every key, a streamed chunk with only the keys it set (so the usage riding
on each chunk with continuous usage stats has three), and the final usage chunk without null keys (so
``prompt_tokens_details`` appears there only with ``--enable-prompt-tokens-details``).
"""

from __future__ import annotations

from typing import Any

from slicelm.engine.request import RequestMetrics


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None,
          details: bool = False) -> dict[str, Any]:
    """A response body's usage (every key); ``prompt_tokens_details`` only with ``--enable-prompt-tokens-details``,
    ``completion_tokens_details`` (reasoning tokens) stays null as vLLM's without a reasoning parser."""
    u: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": None,
                         "completion_tokens_details": None}
    if details:
        u["prompt_tokens_details"] = {"cached_tokens": cached_tokens or 0, "created_cache_tokens": None,
                                      "multimodal_tokens": None}
    return u


def chunk_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The usage on every streamed chunk with continuous usage stats."""
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens}


def final_chunk_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int,
                      details: bool) -> dict[str, Any]:
    """The last streamed chunk's usage: the cached prompt tokens only with ``--enable-prompt-tokens-details``."""
    u: dict[str, Any] = chunk_usage(prompt_tokens, completion_tokens)
    if details:
        u["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return u


def request_metrics(m: RequestMetrics | None, num_generated: int, streamed: bool = False) -> dict[str, Any]:
    """vLLM's ``metrics`` of one generation (``--enable-per-request-metrics``), in milliseconds: time to first
    token (from scheduling), decode time (first to last token), queue time, mean inter-token latency and
    output tokens per second over scheduling to last token. A figure whose timestamps are missing is null;
    the final usage chunk of a stream leaves null keys out, as vLLM serializes it."""
    out: dict[str, Any] = dict.fromkeys(("time_to_first_token_ms", "generation_time_ms", "queue_time_ms",
                                         "mean_itl_ms", "tokens_per_second", "speculative_decoding"))
    if m is not None:
        sched, first, last = m.first_scheduled_time, m.first_token_time, m.last_token_time
        if sched is not None and first is not None:
            out["time_to_first_token_ms"] = (first - sched) * 1000
        if first is not None and last is not None:
            out["generation_time_ms"] = (last - first) * 1000
            if num_generated > 1:
                out["mean_itl_ms"] = (last - first) / (num_generated - 1) * 1000
        if sched is not None:
            out["queue_time_ms"] = max(sched - m.arrival_time, 0.0) * 1000
        if sched is not None and last is not None and last > sched:
            out["tokens_per_second"] = num_generated / (last - sched)
    return {k: v for k, v in out.items() if v is not None} if streamed else out
