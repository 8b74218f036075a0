"""Server-sent events and the bookkeeping of streamed choices (the engine hands out deltas)."""

from __future__ import annotations

from typing import Any

import msgspec

from slicelm.engine.request import CompletionOutput, Logprob
from slicelm.entrypoints.server.errors import APIError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


_json = msgspec.json.Encoder()  # compact UTF-8 like json.dumps(ensure_ascii=False), ~9x faster per chunk


def sse(body: dict[str, Any]) -> str:
    return f"data: {_json.encode(body).decode()}\n\n"


def sse_done() -> str:
    return "data: [DONE]\n\n"


def sse_error(err: APIError) -> str:
    body = err.body()
    body["error"]["code"] = err.code or err.status
    return sse(body)


class DeltaTracker:
    """Per choice index of a stream of delta ``CompletionOutput``s: tokens sent so far and whether it ended.

    ``delta`` returns ``(new_text, new_token_ids, new_logprobs)`` or None when the output carries nothing
    and does not finish the choice. A finished choice yields exactly one final delta.
    """

    def __init__(self, n: int) -> None:
        self.num_ids = [0] * n
        self.done = [False] * n

    @property
    def num_tokens(self) -> int:
        return sum(self.num_ids)

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def delta(self, o: CompletionOutput) -> tuple[str, list[int], list[dict[int, Logprob]] | None] | None:
        i = o.index
        if self.done[i]:
            return None
        finished = o.finish_reason is not None
        if not o.text and not o.token_ids and not finished:
            return None
        self.num_ids[i] += len(o.token_ids)
        self.done[i] = finished
        return o.text, o.token_ids, o.logprobs
