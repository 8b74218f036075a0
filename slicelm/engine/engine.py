"""LLMEngine: the offline engine — an in-process ``EngineCore`` between an input and an output processor.

``add_request`` validates and tokenizes (``InputProcessor``) and hands the sequences to the core;
``step`` runs one core step and turns its deltas into ``RequestOutput``s (``OutputProcessor``):
deltas for ``stream=True`` requests, one complete output at the end for ``stream=False`` ones.
Sequences that hit a stop string are aborted in the core at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING

from slicelm.config import CacheConfig, EngineArgs, ModelConfig, SchedulerConfig
from slicelm.engine.core import EngineCore
from slicelm.engine.input_processor import InputProcessor, PromptType, TextPrompt, TokensPrompt
from slicelm.engine.output_processor import EngineCoreRequestError, OutputProcessor
from slicelm.engine.request import PoolingOutput, RequestOutput
from slicelm.engine.stats import EngineStats
from slicelm.pooling_params import PoolingParams
from slicelm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from slicelm.engine.scheduler import Scheduler
    from slicelm.engine.worker import Worker
    from slicelm.loader.tokenizer import Tokenizer

__all__ = ["LLMEngine", "PromptType", "TextPrompt", "TokensPrompt", "load_api_tokenizer"]


def load_api_tokenizer(args: EngineArgs) -> Tokenizer | None:
    """The tokenizer the API side uses: ``--tokenizer`` if given, else the model's (None with
    ``skip_tokenizer_init``)."""
    if args.skip_tokenizer_init:
        return None
    from slicelm.engine.warmup import warm_tokenizer
    from slicelm.loader.hub import HubOptions
    from slicelm.loader.tokenizer import load_tokenizer_from

    tokenizer = load_tokenizer_from(args.tokenizer or args.model, args.chat_template, HubOptions.for_tokenizer(args))
    warm_tokenizer(tokenizer)
    return tokenizer


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        from slicelm.loader.model_files import pin_hub_snapshots

        self.args = args = pin_hub_snapshots(args)
        self.core = EngineCore(args)
        self.tokenizer = load_api_tokenizer(args)
        self.input_processor = InputProcessor(self.core.info(), self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._counter = itertools.count()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    # the core's parts, for tests and benchmarks
    @property
    def worker(self) -> Worker:
        return self.core.worker

    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    @property
    def model_config(self) -> ModelConfig:
        return self.core.model_config

    @property
    def cache_config(self) -> CacheConfig:
        return self.core.cache_config

    @property
    def scheduler_config(self) -> SchedulerConfig:
        return self.core.scheduler_config

    @property
    def async_scheduling(self) -> bool:
        return self.core.async_scheduling

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(self.input_processor.eos_token_ids)

    # --------------------------------------------------------------------------- requests
    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | PoolingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        token_type_ids: list[int] | None = None,
        stream: bool = True,
    ) -> None:
        """Queues a request. ``stream=True``: ``step`` reports deltas; ``False``: one output once finished."""
        if request_id in self.output_processor.parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        req = self.input_processor.process(request_id, prompt, params, arrival_time, priority, token_type_ids)
        self.output_processor.add(req, stream)
        for seq in req.sequences:
            self.core.add_request(seq)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.core.abort_requests(self.output_processor.abort(ids))

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.output_processor.get_num_unfinished_requests()

    def step(self) -> list[RequestOutput | PoolingOutput]:
        processed = self.output_processor.process(self.core.step())
        if processed.abort_in_core:
            self.core.abort_requests(processed.abort_in_core)
        if processed.errors:
            rid, err = next(iter(processed.errors.items()))
            raise EngineCoreRequestError(f"request {rid!r} failed in the engine core: {err}")
        return processed.outputs

    def get_stats(self) -> EngineStats:
        return self.core.get_stats()

    def shutdown(self) -> None:
        """Stops the core's tensor-parallel workers, if any (they also stop when the engine is dropped)."""
        self.core.shutdown()

    def next_request_id(self) -> str:
        return str(next(self._counter))
