"""``RequestStream``: the deltas of one request, in the order the engine produced them.

``AsyncLLM`` puts each ``RequestOutput`` delta (or the request's ``PoolingOutput``, or the exception that
ended it) on the request's stream; the caller iterates it. Deltas that pile up while the caller is busy are
merged into one (``merge_deltas``: texts and lists concatenated per choice), so a slow reader costs one
output per read, not one per engine step.
"""

from __future__ import annotations

import asyncio
import collections

from slicelm.engine.request import CompletionOutput, PoolingOutput, RequestOutput

Output = RequestOutput | PoolingOutput


def merge_deltas(items: list[RequestOutput]) -> RequestOutput:
    """One delta out of consecutive deltas of a request (texts and lists concatenated per choice)."""
    if len(items) == 1:
        return items[0]
    by_index: dict[int, list[CompletionOutput]] = {}
    for item in items:
        for o in item.outputs:
            by_index.setdefault(o.index, []).append(o)
    outputs = []
    for index, parts in sorted(by_index.items()):
        last = parts[-1]
        logprobs = None
        if last.logprobs is not None:
            logprobs = [lp for p in parts for lp in (p.logprobs or [])]
        outputs.append(CompletionOutput(index, "".join(p.text for p in parts),
                                        [t for p in parts for t in p.token_ids], last.cumulative_logprob,
                                        logprobs, last.finish_reason, last.stop_reason))
    last_item = items[-1]
    return RequestOutput(last_item.request_id, last_item.prompt, last_item.prompt_token_ids, outputs,
                         last_item.finished, last_item.metrics, last_item.num_cached_tokens,
                         next((i.prompt_logprobs for i in items if i.prompt_logprobs is not None), None))


class RequestStream:
    """Deltas of one request, in order; deltas that pile up while the caller is busy are merged."""

    def __init__(self, request_id: str, n: int, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.n = n
        self.loop = loop
        self._items: collections.deque[Output | BaseException] = collections.deque()
        self._ready = asyncio.Event()
        self.finished = False
        self.released = False

    def put(self, item: Output | BaseException) -> None:
        self._items.append(item)
        self._ready.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Output:
        if self.finished:
            raise StopAsyncIteration
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if isinstance(item, RequestOutput):
            batch = [item]
            while self._items and isinstance(self._items[0], RequestOutput):
                batch.append(self._items.popleft())  # type: ignore[arg-type]
            item = merge_deltas(batch)
        if item.finished:
            self.finished = True
        return item
