"""``EngineClient``: what the API server needs from an engine (``AsyncLLM`` and test fakes implement it).

Streams yield **deltas**: each ``RequestOutput`` carries the text, token ids and logprobs that are new
since the previous one (outputs that pile up while the caller is busy are merged); the last one has
``finished=True``. Pooling requests yield one ``PoolingOutput``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from slicelm.config import CacheConfig, ModelConfig
from slicelm.engine.input_processor import PromptType
from slicelm.engine.request import PoolingOutput, RequestOutput
from slicelm.engine.request_stream import RequestStream
from slicelm.engine.stats import EngineStats, IterationStats
from slicelm.pooling_params import PoolingParams
from slicelm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from slicelm.engine.core_messages import EngineCoreInfo
    from slicelm.loader.tokenizer import Tokenizer

StatListener = Callable[[EngineStats, IterationStats], None]


class EngineDeadError(RuntimeError):
    """The engine core has died (or was shut down); no request can be served."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (``max_waiting_requests``); retry later."""


@runtime_checkable
class EngineClient(Protocol):
    tokenizer: Tokenizer | None  # None with --skip-tokenizer-init
    model_config: ModelConfig
    cache_config: CacheConfig
    info: EngineCoreInfo  # what the core resolved at start (pooling type, scheduler settings, ...)
    max_num_seqs: int

    @property
    def is_running(self) -> bool: ...

    @property
    def errored(self) -> bool: ...

    @property
    def dead_error(self) -> BaseException | None: ...

    @property
    def num_active_requests(self) -> int: ...

    def add_stat_listener(self, listener: StatListener) -> None: ...

    async def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | PoolingParams,
                          arrival_time: float | None = None, priority: int = 0) -> RequestStream:
        """Validates and queues a request; returns its stream of outputs."""
        ...

    def generate(self, prompt: PromptType, params: SamplingParams, request_id: str, priority: int = 0,
                 arrival_time: float | None = None) -> AsyncIterator[RequestOutput]: ...

    def encode(self, prompt: PromptType, params: PoolingParams, request_id: str, priority: int = 0,
               arrival_time: float | None = None) -> AsyncIterator[PoolingOutput]: ...

    def release(self, stream: RequestStream) -> None:
        """The caller is done with ``stream``; aborts its request if it has not finished."""
        ...

    def abort(self, request_ids: str | Iterable[str]) -> None: ...

    def abort_all(self) -> None: ...

    async def wait_idle(self, timeout: float) -> bool: ...

    async def end_warmup(self, timeout: float = 10.0) -> bool:
        """The server's warm-up requests (sent with ``async_llm.WARMING_UP`` set) are over: the engine forgets their
        prefix-cache entries."""
        ...

    async def sleep(self, level: int = 1, mode: str = "abort") -> None:
        """vLLM's sleep mode (``--enable-sleep-mode``): level 1 offloads the weights, 2 discards them; ``ValueError``
        when this engine cannot sleep, ``RuntimeError`` when it cannot now."""
        ...

    async def wake_up(self, tags: list[str] | None = None) -> float:
        """Wakes the engine (``tags``: only ``weights`` / ``kv_cache``); returns the seconds it took."""
        ...

    async def is_sleeping(self) -> bool: ...

    def shutdown(self, timeout: float = 10.0) -> None: ...
