"""Warm-up: before the engine core says it is ready, it serves a few dummy sequences through its real steps.

The first request of each kind must cost at most twice the second (issue 18; vLLM profiles and runs dummy batches
for the same reason). What a cold first request pays — Triton's JIT compiles of each kernel specialization, cuBLAS
and flash-attention set-up, lazily loaded CUDA modules, the allocator's first blocks, oneDNN / MKL primitives on the
CPU, the sampler's variants — is paid here instead, by sequences of the shapes the server runs:

- generation: prompts of 1, 7, 16 and 2 blocks + 5 tokens in one batch (Triton specializes integer arguments equal
  to 1 and multiples of 16), greedy, sampled (top-k / top-p / min-p, logprobs) and penalized sequences, one asking for
  prompt logprobs, each decoding one token after its prefill (decode steps: CUDA graphs where captured); then the
  long prompt again (a prefix-cache hit: the paged prefill over cached blocks); on a GPU also a prompt longer than
  one step's token budget (chunked prefill).
- pooling: prompts of several lengths in one packed batch (and pairs with token types for a cross-encoder), with and
  without normalization / activation, then one prompt of the longest length served (capped at 512 tokens on the CPU),
  then a single short one — the usual first request.

Afterwards the core is as new: no sequence, every KV block free (elastic KV: only the chunks it started with
mapped), the prefix cache empty, counters at zero, and the RNG states restored. ``warm_up`` returns what it ran
and how long it took (logged). The API side's tokenizer is warmed as it loads (``warm_tokenizer``: the chat
template's compile, the first encode / decode).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from slicelm.engine.core_messages import EngineCoreRequest
from slicelm.engine.stats import EngineStats
from slicelm.pooling_params import PoolingParams
from slicelm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from slicelm.engine.core import EngineCore

logger = logging.getLogger(__name__)
CPU_MAX_POOLING_TOKENS = 512  # the CPU warms its longest pooling shape up to this many tokens


@dataclass
class WarmupReport:
    sequences: int
    steps: int
    seconds: float


def warm_up(core: EngineCore) -> WarmupReport:
    """Runs the warm-up waves through ``core`` and leaves it as new."""
    t0 = time.perf_counter()
    waves = pooling_waves(core) if core.model_config.is_pooling else generation_waves(core)
    rng = _rng_states(core)
    steps = 0
    for wave in waves:
        for req in wave:
            core.add_request(req)
        while core.has_unfinished_requests():
            core.step()
            steps += 1
    _reset(core)
    _restore_rng(core, rng)
    if core.worker.device.type == "cuda":
        torch.cuda.synchronize(core.worker.device)
    report = WarmupReport(sum(len(w) for w in waves), steps, time.perf_counter() - t0)
    logger.info("warm-up: %d sequences, %d steps in %.2f s", report.sequences, report.steps, report.seconds)
    return report


def warm_tokenizer(tokenizer: Any) -> None:
    """The API side's first request pays for compiling the chat template and the tokenizer's first calls: pay
    them at start instead (a template that refuses a lone user message is left cold)."""
    if tokenizer is None:
        return
    with contextlib.suppress(Exception):
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "warm-up"}], add_generation_prompt=True)
            tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
    with contextlib.suppress(Exception):
        tokenizer.encode_pair("warm-up query", "warm-up document")


def _ids(n: int, vocab: int, salt: int) -> list[int]:
    top = max(2, min(vocab, 30000))
    return [(salt * 7919 + i * 104729) % (top - 1) + 1 for i in range(n)]


def generation_waves(core: EngineCore) -> list[list[EngineCoreRequest]]:
    limit = core.model_config.max_model_len - 4  # room for the decoded tokens
    if limit < 1:
        return []
    bs, vocab = core.cache_config.block_size, core.worker.vocab_size
    long_len = min(2 * bs + 5, limit)
    # two tokens each: a prefill step, then a decode step (with async scheduling one more is launched)
    greedy = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, logprobs=3, seed=0, max_tokens=2,
                             ignore_eos=True)
    penalized = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1,
                               max_tokens=2, ignore_eos=True)
    prefill_only = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    first = [_gen(f"warmup-{n}", _ids(min(n, limit), vocab, n), greedy) for n in (1, 7, 16)]
    first += [_gen("warmup-long", _ids(long_len, vocab, 99), greedy),
              _gen("warmup-sampled", _ids(min(12, limit), vocab, 5), sampled, seed=0),
              _gen("warmup-penalized", _ids(min(9, limit), vocab, 6), penalized),
              _gen("warmup-prompt-logprobs", _ids(min(10, limit), vocab, 7),
                   SamplingParams(temperature=0.0, prompt_logprobs=2, max_tokens=1, ignore_eos=True))]
    waves = [first, [_gen("warmup-prefix-hit", _ids(long_len, vocab, 99), prefill_only)]]
    budget = core.scheduler_config.max_num_batched_tokens
    if core.worker.device.type == "cuda" and limit > budget:
        waves.append([_gen("warmup-chunked", _ids(min(budget + bs + 3, limit), vocab, 11), prefill_only)])
    return waves


def _gen(rid: str, ids: list[int], params: SamplingParams, seed: int | None = None) -> EngineCoreRequest:
    return EngineCoreRequest(rid, ids, sampling_params=params, seed=seed)


def pooling_waves(core: EngineCore) -> list[list[EngineCoreRequest]]:
    max_len = core.model_config.max_model_len
    if core.worker.device.type != "cuda":
        max_len = min(max_len, CPU_MAX_POOLING_TOKENS)
    budget = core.scheduler_config.max_num_batched_tokens
    vocab = core.worker.vocab_size or 1000
    score = core.model_config.task == "score"
    pair_types = score and int(core.model_config.hf_config.get("type_vocab_size", 2)) > 1
    variants = ([PoolingParams(task="score"), PoolingParams(task="score", use_activation=False)] if score
                else [PoolingParams(), PoolingParams(normalize=False), PoolingParams(normalize=True)])
    lengths = [n for n in (3, 9, 16, 33) if n <= max_len]
    batch = [_pool(f"warmup-{i}", _ids(n, vocab, i), variants[i % len(variants)], pair_types)
             for i, n in enumerate(lengths)]
    waves = [batch] if sum(lengths) <= budget else [[r] for r in batch]
    longest = min(max_len, budget)
    waves.append([_pool("warmup-longest", _ids(longest, vocab, 42), variants[0], pair_types)])
    waves.append([_pool("warmup-single", _ids(min(12, max_len), vocab, 43), variants[0], pair_types)])
    return waves


def _pool(rid: str, ids: list[int], params: PoolingParams, pair: bool) -> EngineCoreRequest:
    types = [0] * (len(ids) // 2) + [1] * (len(ids) - len(ids) // 2) if pair else None
    return EngineCoreRequest(rid, ids, pooling_params=params, token_type_ids=types)


def _reset(core: EngineCore) -> None:
    """Back to a fresh core: the last launched step read back, the prefix cache emptied, counters at zero."""
    if core._inflight is not None:
        core._inflight.wait()
        core._inflight = None
    assert not core.requests, "warm-up sequences left behind"
    kv = core.scheduler.kv_cache
    ok = kv.reset_prefix_cache()
    assert ok, "warm-up left KV blocks allocated"
    kv.prefix_cache_queries = kv.prefix_cache_hits = 0
    if core.elastic is not None:  # elastic KV: the chunks the warm-up mapped go back
        core.elastic.settle()
    core.scheduler.num_preemptions = 0
    core._stats = EngineStats()


def _rng_states(core: EngineCore) -> tuple[torch.Tensor, torch.Tensor | None]:
    device = core.worker.device
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _restore_rng(core: EngineCore, states: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], core.worker.device)
