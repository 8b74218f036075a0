"""The engine core's warm-up: it runs before the core is ready (generation and pooling), through real steps, and
leaves the core as new — no sequence, every KV block free, an empty prefix cache, zero counters, the RNG state
unchanged — so that what a client sees first is the same as without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from utils_models import write_random_cross_encoder

from slicelm.config import EngineArgs
from slicelm.engine.core import EngineCore
from slicelm.engine.warmup import generation_waves, pooling_waves, warm_up

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 32,
        "vocab_size": 1000, "tie_word_embeddings": True, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 1024}


def assert_as_new(core: EngineCore) -> None:
    kv = core.scheduler.kv_cache
    assert not core.requests and not core.scheduler.running and not core.scheduler.waiting
    assert kv.num_free_blocks == kv.num_blocks and not kv.pool.cached
    stats = core.get_stats()
    assert (stats.num_prompt_tokens, stats.num_generation_tokens, stats.num_steps, stats.prefix_cache_queries,
            stats.prefix_cache_hits, stats.num_preemptions) == (0, 0, 0, 0, 0, 0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> EngineCore:
    d = tmp_path_factory.mktemp("tiny")
    (d / "config.json").write_text(json.dumps(TINY))
    return EngineCore(EngineArgs(model=str(d), load_format="dummy", device="cpu", max_model_len=256, max_num_seqs=8))


def test_generation_warm_up_runs_before_ready_and_leaves_the_core_as_new(llama: EngineCore) -> None:
    assert llama.warmup.sequences == 8 and llama.warmup.steps >= 3 and llama.warmup.seconds > 0
    assert_as_new(llama)
    rng = torch.get_rng_state()
    again = warm_up(llama)
    assert again.sequences == 8
    assert_as_new(llama)
    assert torch.equal(rng, torch.get_rng_state())
    waves = generation_waves(llama)
    lengths = sorted(len(r.prompt_token_ids) for r in waves[0])
    assert lengths[:3] == [1, 7, 9] and 16 in lengths and 2 * 16 + 5 in lengths  # 1, 16k and other lengths
    assert waves[1][0].prompt_token_ids == next(r for r in waves[0] if r.request_id == "warmup-long").prompt_token_ids
    kinds = {r.request_id: r.sampling_params for r in waves[0]}
    assert kinds["warmup-sampled"].top_k == 20 and kinds["warmup-sampled"].logprobs == 3
    assert kinds["warmup-penalized"].repetition_penalty > 1 and kinds["warmup-prompt-logprobs"].prompt_logprobs


@pytest.mark.parametrize("kind", ["bert", "xlmr"])
def test_pooling_warm_up_covers_pairs_and_the_longest_prompt(tmp_path: Path, kind: str) -> None:
    write_random_cross_encoder(tmp_path / kind, kind)
    core = EngineCore(EngineArgs(model=str(tmp_path / kind), device="cpu"))
    assert core.warmup.sequences >= 5
    assert_as_new(core)
    waves = pooling_waves(core)
    longest = max(len(r.prompt_token_ids) for w in waves for r in w)
    assert longest == core.model_config.max_model_len
    types = {t for w in waves for r in w for t in (r.token_type_ids or [])}
    assert types == ({0, 1} if kind == "bert" else set())  # XLM-R has one token type: never a 1
    assert {r.pooling_params.task for w in waves for r in w} == {"score"}


def test_penalized_sequence_joining_an_async_batch(llama: EngineCore, tmp_path: Path) -> None:
    """Async scheduling: a penalized sequence scheduled beside sequences whose last token is still in flight used to
    read their placeholders as token ids (IndexError in the core); the warm-up's first wave is exactly that."""
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    core = EngineCore(EngineArgs(model=str(tmp_path), load_format="dummy", device="cpu", async_scheduling=True,
                                 num_gpu_blocks_override=10, max_model_len=96, max_num_batched_tokens=24))
    assert core.async_scheduling and core.warmup.sequences == 8
    assert_as_new(core)
