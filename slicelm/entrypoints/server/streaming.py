"""Server-sent events and the cumulative -> delta bookkeeping of streamed choices."""

from __future__ import annotations

import json
from typing import Any

from slicelm.engine.request import CompletionOutput, Logprob
from slicelm.entrypoints.server.errors import APIError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_done() -> str:
    return "data: [DONE]\n\n"


def sse_error(err: APIError) -> str:
    body = err.body()
    body["error"]["code"] = err.code or err.status
    return sse(body)


class DeltaTracker:
    """Turns cumulative ``CompletionOutput``s into deltas, per choice index.

    ``delta`` returns ``(new_text, new_token_ids, new_logprobs)`` or None when nothing changed and the
    choice has not just finished. A finished choice yields exactly one final delta.
    """

    def __init__(self, n: int) -> None:
        self.text_len = [0] * n
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
        text = o.text[self.text_len[i]:]
        ids = o.token_ids[self.num_ids[i]:]
        lps = o.logprobs[self.num_ids[i]:] if o.logprobs is not None else None
        finished = o.finish_reason is not None
        if not text and not ids and not finished:
            return None
        self.text_len[i] = len(o.text)
        self.num_ids[i] = len(o.token_ids)
        self.done[i] = finished
        return text, ids, lps
