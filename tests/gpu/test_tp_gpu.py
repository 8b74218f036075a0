"""Tensor parallelism on two GPUs (NCCL): TP=2 gives the CPU reference's greedy tokens in float32 with the
all-reduces captured in the decode and mixed-step CUDA graphs; bf16 graphs agree with bf16 eager; a
killed worker fails the engine instead of hanging in a collective (offline: ``WorkerDiedError``; server:
error events, exit 1); every rank runs with NVLink multicast off; Qwen3-MoE (fused-MoE kernels on split experts)
and an AWQ checkpoint (W4A16 kernels on each rank's packed part) give their one-GPU tokens.

    python -m pytest -m gpu tests/gpu/test_tp_gpu.py     # on a machine with 2 GPUs (~4 min)
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]

from utils_parity import free_cuda, greedy_ids, prompts_with_shared_prefix, save_random_decoder  # noqa: E402

from slicelm import LLM  # noqa: E402
from slicelm.distributed.env import MULTICAST_OFF  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROMPT_LENS = (5, 17, 40, 3, 130, 64, 1, 300)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> str:
    """8 query heads and 2 KV heads (one per rank), 4 layers: small enough for seconds, real enough to shard."""
    return save_random_decoder("Qwen3Config", tmp_path_factory.mktemp("qwen3"), vocab_size=2048, hidden_size=512,
                               intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                               num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                               tie_word_embeddings=False)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return prompts_with_shared_prefix(PROMPT_LENS, 2048)


@pytest.fixture(scope="module")
def reference(qwen3_dir, prompts) -> list[list[int]]:
    llm = LLM(qwen3_dir, device="cpu", skip_tokenizer_init=True, max_model_len=1024)
    return greedy_ids(llm, prompts, 24)


OPTS = {"skip_tokenizer_init": True, "max_model_len": 1024, "max_num_seqs": 16, "gpu_memory_budget": "6GiB",
        "tensor_parallel_size": 2, "device": "cuda"}


@pytest.mark.parametrize("kwargs", [{}, {"enforce_eager": True}, {"max_num_batched_tokens": 64}],
                         ids=["graphs", "eager", "chunked"])
def test_tp2_fp32_gives_the_cpu_reference(qwen3_dir, prompts, reference, kwargs):
    llm = LLM(qwen3_dir, dtype="float32", **OPTS, **kwargs)
    try:
        got = greedy_ids(llm, prompts, 24)
        again = greedy_ids(llm, prompts, 24)  # prefix-cache hits
        runner = llm.engine.worker.runner
        decode_sizes = runner.graphs.sizes if runner.graphs is not None else []
        mixed_replays = runner.mixed_graphs.num_replays if runner.mixed_graphs is not None else None
        del runner
    finally:
        llm.engine.shutdown()
    for i, (g, a, r) in enumerate(zip(got, again, reference)):
        assert g == r, f"prompt {i} (len {len(prompts[i])}) differs from the CPU reference"
        assert a == r, f"prompt {i} differs on a prefix-cache hit"
    if kwargs.get("enforce_eager"):
        assert decode_sizes == [] and mixed_replays is None
    else:  # the all-reduces ran inside captured graphs (decode and mixed steps)
        assert decode_sizes and mixed_replays is not None and mixed_replays > 0
    del llm
    free_cuda()


def test_tp2_bf16_graphs_agree_with_eager(qwen3_dir, prompts):
    results = []
    for eager in (False, True):
        llm = LLM(qwen3_dir, dtype="bfloat16", enforce_eager=eager, **OPTS)
        results.append(greedy_ids(llm, prompts, 16))
        llm.engine.shutdown()
        del llm
        free_cuda()
    same = sum(x == y for x, y in zip(*results))
    assert same >= len(prompts) - 2, "CUDA-graph steps must compute what eager steps compute"



def _tp1_and_tp2(path: str, prompts: list[list[int]], **kwargs: object) -> list[list[list[int]]]:
    """Greedy tokens of the model on one GPU, then sharded over two (same dtype, CUDA graphs on)."""
    out = []
    for tp in (1, 2):
        llm = LLM(path, **{**OPTS, "tensor_parallel_size": tp, **kwargs})
        out.append(greedy_ids(llm, prompts, 16))
        llm.engine.shutdown()
        del llm
        free_cuda()
    return out


def test_tp2_moe_experts_split_give_tp1_tokens(tmp_path: Path, prompts):
    """Qwen3-MoE (8 experts, top-2): the Triton fused-MoE kernels on each rank's half of every expert, one
    all-reduce per sparse block inside the CUDA graphs; float32, so routing matches TP=1."""
    save_random_decoder("Qwen3MoeConfig", tmp_path, vocab_size=2048, hidden_size=512, intermediate_size=1024,
                        num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                        moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                        mlp_only_layers=[0], max_position_embeddings=2048)
    tp1, tp2 = _tp1_and_tp2(str(tmp_path), prompts, dtype="float32")
    assert sum(a == b for a, b in zip(tp1, tp2)) >= len(prompts) - 1


def test_tp2_awq_shards_give_tp1_tokens(tmp_path: Path):
    """AWQ 4-bit g64: each rank's packed part through the Triton W4A16 GEMV / GEMM (float16)."""
    from utils_quant import VOCAB, base_model, write_awq

    write_awq(base_model(), tmp_path, group=64)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 5, 17, 40, 90)]
    tp1, tp2 = _tp1_and_tp2(str(tmp_path), prompts, dtype="float16", max_model_len=256)
    assert sum(a == b for a, b in zip(tp1, tp2)) >= len(prompts) - 1


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def test_killed_worker_fails_the_offline_engine_without_hanging(qwen3_dir, prompts):
    from slicelm.engine.executor import WorkerDiedError

    llm = LLM(qwen3_dir, dtype="bfloat16", **OPTS)
    try:
        (worker,) = llm.engine.core.executor.workers
        assert MULTICAST_OFF.items() <= _environ(worker.proc.pid).items()
        assert MULTICAST_OFF.items() <= os.environ.items()  # the driver's own process too
        greedy_ids(llm, prompts[:2], 4)
        os.kill(worker.proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerDiedError, match="rank 1"):
            greedy_ids(llm, prompts, 256)  # NCCL waits on the dead rank until the watchdog aborts the group
        assert time.monotonic() - t0 < 60
    finally:
        llm.engine.shutdown()
    del llm
    free_cuda()


def test_killed_worker_ends_the_gpu_server(tmp_path: Path, qwen3_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "slicelm.entrypoints.cli", "serve", qwen3_dir, "--port",
                                 str(port), "--device", "cuda", "--tensor-parallel-size", "2", "--skip-tokenizer-init",
                                 "--max-model-len", "4096", "--gpu-memory-budget", "6GiB"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    import httpx

    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        pid = int(re.search(r"tensor-parallel worker rank 1 started \(pid (\d+)\)", log_path.read_text()).group(1))
        events: list[str] = []

        def stream() -> None:
            body = {"model": qwen3_dir, "prompt": [1, 2, 3], "max_tokens": 3000, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                    events.extend(line for line in r.iter_lines() if '"error"' in line)
            except httpx.HTTPError as e:
                events.append(f"connection: {e!r}")

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(2)
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(60) == 1, log_path.read_text()[-3000:]
        t.join(30)
        assert events and "rank 1" in events[0], events
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
