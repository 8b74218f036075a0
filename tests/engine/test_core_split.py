"""The engine's parts: worker start-up steps, settings that reach their consumer, deltas vs final outputs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from utils_models import write_tiny_llama

from slicelm.config import EngineArgs
from slicelm.engine.core import EngineCore
from slicelm.engine.engine import LLMEngine
from slicelm.engine.worker import Worker
from slicelm.entrypoints.cli import make_parser
from slicelm.layers.attention import TorchAttentionBackend, get_attention_backend
from slicelm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny"))


def tiny_args(tiny_dir: str, **kw: object) -> EngineArgs:
    return EngineArgs(**{"model": tiny_dir, "load_format": "dummy", "device": "cpu", "max_model_len": 512,
                         "max_num_seqs": 8, **kw})  # type: ignore[arg-type]


def test_worker_is_built_in_named_steps(tiny_dir: str) -> None:
    w = Worker(tiny_args(tiny_dir, skip_tokenizer_init=True))
    w.init_device()
    w.load_model()
    assert w.model_config.task == "generate" and w.vocab_size == 49152 and not hasattr(w, "runner")
    w.initialize_cache()
    assert w.cache_config.num_blocks > 0 and w.scheduler_config.max_model_len == 512
    assert w.make_scheduler().kv_cache is w.kv_cache


@pytest.mark.parametrize(("kw", "batched"), [
    ({}, 2048),  # the CPU default
    ({"max_num_seqs": 3000}, 3000),  # never fewer tokens than sequences
    ({"max_num_batched_tokens": 24}, 24),  # the flag
])
def test_scheduler_settings_are_resolved_once(tiny_dir: str, kw: dict, batched: int) -> None:
    w = Worker(tiny_args(tiny_dir, skip_tokenizer_init=True, **kw))
    w.init_device()
    w.load_model()
    w.initialize_cache()
    cfg = w.scheduler_config
    assert w.max_num_batched_tokens == cfg.max_num_batched_tokens == batched
    assert (cfg.max_num_seqs, cfg.max_model_len, cfg.policy) == (kw.get("max_num_seqs", 8), 512, "fcfs")
    assert w.make_scheduler().config is cfg


def test_tokenizer_flag_loads_that_tokenizer(tiny_dir: str, tmp_path: Path) -> None:
    engine = LLMEngine(tiny_args(tiny_dir, tokenizer="smollm2-135m-instruct"))
    assert engine.tokenizer is not None and engine.tokenizer.vocab_size == 49152
    assert not hasattr(engine.core, "tokenizer")  # the core never loads one
    engine.add_request("t", "Hello world", SamplingParams(max_tokens=2, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    with pytest.raises(ValueError, match="no-such-tokenizer"):
        LLMEngine(tiny_args(tiny_dir, tokenizer=str(tmp_path / "no-such-tokenizer")))
    with pytest.raises(ValueError, match=r"tokenizer\.json"):  # the model directory has no tokenizer
        LLMEngine(tiny_args(tiny_dir))


def test_deltas_add_up_to_the_final_output(tiny_dir: str) -> None:
    engine = LLMEngine(tiny_args(tiny_dir, tokenizer="smollm2-135m-instruct"))
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=40, ignore_eos=True, logprobs=2)
    prompt = {"prompt_token_ids": [1, 2, 3, 4, 5]}
    engine.add_request("delta", prompt, params)
    engine.add_request("final", prompt, params, stream=False)
    deltas: dict[int, list] = {0: [], 1: []}
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "final":
                final = out
            else:
                for o in out.outputs:
                    assert len(o.token_ids) <= 2  # one step's tokens (two at most with a double read-back)
                    deltas[o.index].append(o)
    assert final is not None and final.finished
    for o in final.outputs:
        parts = deltas[o.index]
        assert [t for p in parts for t in p.token_ids] == o.token_ids and len(o.token_ids) == 40
        assert "".join(p.text for p in parts) == o.text
        assert [lp for p in parts for lp in p.logprobs] == o.logprobs
        assert parts[-1].finish_reason == o.finish_reason == "length"
        assert parts[-1].cumulative_logprob == pytest.approx(o.cumulative_logprob)


def test_attention_knobs_are_flags_or_refused() -> None:
    args = make_parser().parse_args(["serve", "m", "--attention-backend", "torch", "--no-attention-flash-prefill",
                                     "--attention-decode-splits", "4", "--tokenizer", "tok", "--no-engine-process"])
    ea = EngineArgs.from_cli_args(args)
    assert (ea.attention_backend, ea.attention_flash_prefill, ea.attention_decode_splits) == ("torch", False, 4)
    assert ea.tokenizer == "tok" and args.engine_process is False
    assert isinstance(get_attention_backend("cpu"), TorchAttentionBackend)
    with pytest.raises(ValueError, match="Triton backend only"):
        get_attention_backend("cpu", "torch", decode_splits=4)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        get_attention_backend("cpu", "triton")
    with pytest.raises(ValueError, match="attention_backend"):
        EngineArgs(attention_backend="flash")  # type: ignore[arg-type]


def test_gguf_loader_does_not_import_model_files() -> None:
    code = "import sys, slicelm.loader.gguf_loader; print('slicelm.loader.model_files' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_async_llm_follows_a_new_event_loop(tiny_dir: str) -> None:
    from slicelm.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_core(EngineCore(tiny_args(tiny_dir, skip_tokenizer_init=True)), tokenizer=None)

    async def one(rid: str) -> int:
        n = 0
        async for out in llm.generate([1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True), rid):
            n += len(out.outputs[0].token_ids)
        return n

    try:
        assert asyncio.run(one("a")) == 5
        assert asyncio.run(one("b")) == 5  # a second asyncio.run: outputs follow the new loop
        assert llm.num_active_requests == 0
    finally:
        llm.shutdown()
