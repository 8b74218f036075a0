"""The warm-up on a GPU: the chunked-prefill wave runs (a prompt over one step's token budget), CUDA graphs and
async scheduling are in place, the core is left as new, and what the first request computes is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from slicelm.config import EngineArgs  # noqa: E402
from slicelm.engine.core import EngineCore  # noqa: E402
from slicelm.engine.core_messages import EngineCoreRequest  # noqa: E402
from slicelm.engine.warmup import generation_waves  # noqa: E402
from slicelm.sampling_params import SamplingParams  # noqa: E402

QWEN3_SMALL = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 512,
               "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128,
               "intermediate_size": 1024, "vocab_size": 2048, "tie_word_embeddings": True, "rope_theta": 1e6,
               "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}


def _greedy(core: EngineCore, ids: list[int]) -> list[int]:
    core.add_request(EngineCoreRequest("probe", ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)))
    out: list[int] = []
    while core.has_unfinished_requests():
        for o in core.step():
            out += o.new_token_ids
    return out


def test_gpu_warm_up_chunks_and_leaves_the_core_as_new(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_SMALL))
    args = EngineArgs(model=str(tmp_path), load_format="dummy", max_model_len=4096, max_num_seqs=16,
                      max_num_batched_tokens=1024, gpu_memory_budget="4GiB")
    core = EngineCore(args)
    assert core.worker.device.type == "cuda" and core.async_scheduling
    waves = generation_waves(core)
    assert waves[-1][0].request_id == "warmup-chunked" and len(waves[-1][0].prompt_token_ids) > 1024
    assert core.warmup.sequences == 9 and core.warmup.seconds > 0
    kv = core.scheduler.kv_cache
    assert kv.num_free_blocks == kv.num_blocks and not kv.pool.cached and core.get_stats().num_steps == 0
    first = _greedy(core, list(range(1, 60)))
    fresh = EngineCore(args)  # the same dummy weights (seeded): the warm-up changed nothing a request sees
    assert _greedy(fresh, list(range(1, 60))) == first
