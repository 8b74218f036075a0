"""Structured outputs in the engine core: asynchronous grammar compilation, matchers, the step's bitmask.

``add`` turns a sequence's ``structured_outputs`` into a ``StructuredOutputRequest`` whose grammar
compiles on a background thread (the backend, with its vocabulary, is built there on first use: the core
loads the tokenizer only then); the sequence waits as ``WAITING_FOR_FSM`` while the others run. ``activate``
gives a ready sequence its own matcher (or its compile error). Each step ``bitmask`` fills one int32
``[rows, ceil(V/32)]`` mask for the sampling rows in one backend call (rows of unconstrained or finished
grammars stay all-ones), and ``accept`` advances every matcher by the step's tokens in one call. ``sync`` rolls
a matcher back to the tokens its sequence still holds (preemption / recompute).

With async scheduling ``bitmask_async`` fills on the mask thread and returns a future, so the host returns outputs
and builds the next step while the backend's native threads work; the fill reads the matchers captured when it was
queued (the core may release a finished sequence's grammar meanwhile). The interpreter's GIL switch interval is
lowered to 0.5 ms once the mask thread exists: with Python's 5 ms default, a fill queued while the host runs Python
waits up to 5 ms for the GIL to start and again to return (``benchmarks/mask_thread.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from slicelm.config import StructuredOutputsConfig
from slicelm.engine.structured_output.bitmask import allocate
from slicelm.engine.structured_output.spec import GrammarError, GrammarSpec, grammar_spec
from slicelm.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    from slicelm.engine.request import Request
    from slicelm.loader.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
BACKENDS = ("guidance", "xgrammar")
_CACHE_SIZE = 256  # compiled specs kept for reuse
SWITCH_INTERVAL_S = 0.0005  # the GIL switch interval while the mask thread runs


@dataclass(eq=False)
class StructuredOutputRequest:
    spec: GrammarSpec
    compiled: Future
    grammar: Any = None  # the sequence's matcher (GuidanceGrammar / XGrammarGrammar) once active
    num_accepted: int = 0  # output tokens the matcher has consumed
    failed: bool = False  # the matcher rejected a token: the sequence runs on unconstrained

    @property
    def ready(self) -> bool:
        return self.compiled.done()

    @property
    def active(self) -> bool:
        return self.grammar is not None and not self.failed and not self.grammar.is_terminated()


def make_backend(name: str, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int]) -> Any:
    if name == "guidance":
        from slicelm.engine.structured_output.guidance import GuidanceBackend

        return GuidanceBackend(tokenizer, vocab_size, eos_token_ids)
    if name == "xgrammar":
        from slicelm.engine.structured_output.xgrammar_backend import XGrammarBackend

        return XGrammarBackend(tokenizer, vocab_size, eos_token_ids)
    raise ValueError(f"structured outputs backend must be one of {BACKENDS}, got {name!r}")


class StructuredOutputManager:
    def __init__(self, config: StructuredOutputsConfig, load_tokenizer: Callable[[], Tokenizer | None],
                 vocab_size: int, eos_token_ids: set[int], max_rows: int, pin: bool) -> None:
        self.config = config
        self.backend_name = config.backend_name
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self._eos = set(eos_token_ids)
        self._pool: ThreadPoolExecutor | None = None
        self._mask_pool: ThreadPoolExecutor | None = None
        self._backend_future: Future | None = None
        self._compiled: OrderedDict[GrammarSpec, Future] = OrderedDict()
        self._mask = allocate(max_rows, vocab_size, pin)
        self.num_live = 0  # sequences with structured outputs in the core (0: no per-step work at all)

    # ------------------------------------------------------------------------- compile
    def add(self, params: StructuredOutputsParams) -> StructuredOutputRequest:
        """Starts (or reuses) the compilation of ``params``; ``GrammarError`` for a spec that is not valid."""
        cfg = self.config
        if cfg.disable_any_whitespace or cfg.disable_additional_properties:  # engine-wide defaults
            params = dataclasses.replace(
                params, disable_any_whitespace=params.disable_any_whitespace or cfg.disable_any_whitespace,
                disable_additional_properties=params.disable_additional_properties
                or cfg.disable_additional_properties)
        spec = grammar_spec(params)
        future = self._compiled.get(spec)
        if future is None or (future.done() and future.exception() is not None):
            future = self._compiled[spec] = self._executor().submit(self._compile, spec)
            while len(self._compiled) > _CACHE_SIZE:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(spec)
        self.num_live += 1
        return StructuredOutputRequest(spec, future)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
            self._backend_future = self._pool.submit(self._make_backend)
        return self._pool

    def _make_backend(self) -> Any:
        tokenizer = self._load_tokenizer()
        if tokenizer is None:
            raise GrammarError("structured_outputs", "structured outputs need a tokenizer (skip_tokenizer_init "
                                                     "is set)")
        return make_backend(self.backend_name, tokenizer, self.vocab_size, sorted(self._eos | tokenizer.eos_token_ids))

    def _compile(self, spec: GrammarSpec) -> Any:
        assert self._backend_future is not None
        return self._backend_future.result().compile(spec)

    def activate(self, so: StructuredOutputRequest) -> str | None:
        """A ready sequence gets its own matcher; returns the compile error instead when there was one."""
        assert so.ready and so.grammar is None
        error = so.compiled.exception()
        if error is not None:
            return str(error) if isinstance(error, GrammarError) else f"{type(error).__name__}: {error}"
        so.grammar = so.compiled.result().new_grammar()
        return None

    def release(self, so: StructuredOutputRequest) -> None:
        self.num_live -= 1

    # ---------------------------------------------------------------------------- steps
    def bitmask(self, requests: list[Request]) -> torch.Tensor | None:
        """The step's mask for ``requests`` (the sampling rows, in order), or None when no row is constrained."""
        return self._fill([r.structured for r in requests])

    def bitmask_async(self, requests: list[Request]) -> Future:
        """``bitmask`` on the mask thread (the backends' fills run natively, without the GIL)."""
        if self._mask_pool is None:
            self._mask_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")
            sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        return self._mask_pool.submit(self._fill, [r.structured for r in requests])

    def _fill(self, sos: list[StructuredOutputRequest | None]) -> torch.Tensor | None:
        rows = [i for i, so in enumerate(sos) if so is not None and so.active]
        if not rows:
            return None
        assert len(sos) <= self._mask.shape[0]
        # One pinned buffer: the core reads the step in flight back before filling it again, so the previous
        # step's copy to the device has finished by then. The backend writes whole rows: only a batch with
        # unconstrained rows needs the all-ones reset.
        mask = self._mask[: len(sos)]
        if len(rows) < len(sos):
            mask.fill_(-1)
        self._backend().fill_bitmask([sos[i].grammar for i in rows], rows, mask)
        return mask

    def accept(self, requests: list[Request], tokens: list[int]) -> None:
        """Advances the matchers of ``requests`` by one token each (one backend call)."""
        live = [(r, t) for r, t in zip(requests, tokens) if r.structured is not None and r.structured.active]
        if not live:
            return
        ok = self._backend().accept_batch([r.structured.grammar for r, _ in live], [t for _, t in live])
        for (r, t), accepted in zip(live, ok):
            so = r.structured
            if accepted:
                so.num_accepted += 1
            else:  # cannot happen when the mask was applied; never let it take the core down
                so.failed = True
                logger.error("request %s: the grammar rejected token %d (%s); it runs on unconstrained",
                             r.request_id, t, so.grammar.error())

    def sync(self, request: Request) -> None:
        """Rolls the matcher back to the output tokens ``request`` still knows (after preemption)."""
        so = request.structured
        if so is None or so.grammar is None or so.failed:
            return
        extra = so.num_accepted - request.num_known_output_tokens  # < 0: tokens taken past a finished grammar
        if extra > 0:
            so.grammar.rollback(extra)
            so.num_accepted -= extra

    def _backend(self) -> Any:
        assert self._backend_future is not None
        return self._backend_future.result()

    def shutdown(self) -> None:
        for pool in (self._pool, self._mask_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
