"""Quantized linears and the fp8 KV cache on CUDA: the Triton / _scaled_mm paths against the CPU (dequantizing)
reference at the Llama-3.1-8B projection shapes, and quantized checkpoints through the engine (CUDA graphs on)
giving the CPU path's greedy tokens."""

from __future__ import annotations

import pytest
import torch
from utils_paged import PagedBatch, make_kv_caches
from utils_quant import base_model, write_awq, write_compressed_tensors, write_fp8, write_gptq

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from slicelm import LLM, SamplingParams  # noqa: E402
from slicelm.layers.quantization import int_kernels  # noqa: E402
from slicelm.layers.quantization.fp8 import quantize_rows  # noqa: E402
from slicelm.layers.quantization.fp8_kernels import quantize_activations, quantize_activations_ref  # noqa: E402
from slicelm.layers.quantization.int_weights import dequantize, pack_rows  # noqa: E402

DEV = torch.device("cuda")
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # qkv, o_proj, gate_up, down


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double())).item()


def _int_weights(n: int, k: int, bits: int, group: int, zp: bool):
    q = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device=DEV)
    groups = 1 if group == -1 else k // group
    scales = (torch.rand(n, groups, device=DEV) * 2e-3 + 5e-4).half()
    zeros = torch.randint(0, 1 << bits, (n, groups), dtype=torch.uint8, device=DEV) if zp else None
    return pack_rows(q, bits), scales, zeros


@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("bits,group,zp", [(4, 128, True), (4, 32, False), (8, -1, False), (8, 128, True)])
def test_int_linear_matches_dequantized(n, k, bits, group, zp):
    w_q, scales, zeros = _int_weights(n, k, bits, group, zp)
    w = dequantize(w_q, scales, zeros, bits, k)
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    for m, dtype in ((1, torch.bfloat16), (1, torch.float16), (7, torch.bfloat16), (64, torch.float16),
                     (256, torch.bfloat16), (300, torch.bfloat16)):
        x = torch.randn(m, k, device=DEV, dtype=dtype)
        ref = x.double() @ w.double().T + bias.double()
        out = int_kernels.int_linear(x, w_q, scales, zeros, bits, k, bias.to(dtype))
        assert rel(out, ref) < 1e-2, (m, dtype, rel(out, ref))


def test_gemv_split_k_and_configs_and_cuda_graph():
    n, k = 4096, 14336
    w_q, scales, zeros = _int_weights(n, k, 4, 128, True)
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    ref = x.double() @ dequantize(w_q, scales, zeros, 4, k).double().T
    for cfg in ((128, 32, 1, 4, 3), (128, 32, 16, 4, 3), (64, 32, 8, 4, 2), (32, 64, 4, 8, 3), (16, 16, 2, 4, 1)):
        out = int_kernels.int_linear(x, w_q, scales, zeros, 4, k, None, cfg)
        assert rel(out, ref) < 1e-2, cfg
    first = int_kernels.int_linear(x, w_q, scales, zeros, 4, k, None)
    assert torch.equal(first, int_kernels.int_linear(x, w_q, scales, zeros, 4, k, None))  # deterministic
    graph = torch.cuda.CUDAGraph()
    static_x = x.clone()
    with torch.cuda.graph(graph):
        static_out = int_kernels.int_linear(static_x, w_q, scales, zeros, 4, k, None)
    for _ in range(3):
        static_x.copy_(torch.randn_like(x))
        graph.replay()
        expect = static_x.double() @ dequantize(w_q, scales, zeros, 4, k).double().T
        assert rel(static_out, expect) < 1e-2


def test_fp8_activation_quant_and_scaled_mm():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor cores need sm >= 8.9")
    x = torch.randn(37, 4096, device=DEV, dtype=torch.bfloat16) * 3
    q, s = quantize_activations(x)
    q_ref, s_ref = quantize_activations_ref(x)
    torch.testing.assert_close(s, s_ref)
    assert (q.float() - q_ref.float()).abs().max() <= 32  # one e4m3 step at the top of the range at most
    w_q, w_s = quantize_rows(torch.randn(6144, 4096, device=DEV, dtype=torch.bfloat16) / 64)
    out = torch._scaled_mm(q, w_q.t(), scale_a=s, scale_b=w_s.view(1, -1), out_dtype=torch.bfloat16)
    emulated = (q.float() * s) @ (w_q.float() * w_s[:, None]).T
    assert rel(out, emulated) < 1e-2
    exact = x.float() @ (w_q.float() * w_s[:, None]).T
    assert rel(out, exact) < 6e-2  # activation quantization error


@pytest.mark.parametrize("m", [1, 16, 64, 256, 300])
def test_fp8_block_linear_matches_dequantized(m):
    from slicelm.layers.quantization.fp8 import dequantize_blocks
    from slicelm.layers.quantization.fp8_kernels import fp8_block_linear

    w = (torch.randn(6144, 4096, device=DEV) * 64).to(torch.float8_e4m3fn)
    scale = torch.rand(48, 32, device=DEV) * 1e-3 + 1e-4
    x = torch.randn(m, 4096, device=DEV, dtype=torch.bfloat16)
    ref = x.double() @ dequantize_blocks(w, scale, (128, 128)).double().T
    assert rel(fp8_block_linear(x, w, scale, (128, 128), None), ref) < 1e-2


FORMATS = {
    "awq": lambda hf, p: write_awq(hf, p, group=64),
    "gptq_act_order": lambda hf, p: write_gptq(hf, p, bits=4, group=64, sym=False, desc_act=True),
    "gptq_8bit": lambda hf, p: write_gptq(hf, p, bits=8, group=128, sym=True),
    "ct_w4a16": lambda hf, p: write_compressed_tensors(hf, p, "w4a16"),
    "ct_fp8": lambda hf, p: write_compressed_tensors(hf, p, "fp8"),
    "fp8_block": lambda hf, p: write_fp8(hf, p, block=(128, 128)),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantized_checkpoint_on_gpu_matches_cpu_path(fmt, tmp_path):
    """fp16 on the GPU (Triton kernels / _scaled_mm, CUDA graphs) vs float32 on the CPU (dequantized weights):
    the first greedy tokens agree and CUDA graphs change nothing."""
    hf = base_model()
    FORMATS[fmt](hf, tmp_path)
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 17, 40)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    cpu = LLM(str(tmp_path), skip_tokenizer_init=True, device="cpu", dtype="float32")
    ref = [o.outputs[0].token_ids for o in cpu.generate(prompts, params, use_tqdm=False)]
    del cpu
    outs = {}
    for eager in (True, False):
        llm = LLM(str(tmp_path), skip_tokenizer_init=True, dtype="float16", enforce_eager=eager,
                  gpu_memory_utilization=0.2)
        outs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm
        torch.cuda.empty_cache()
    assert outs[True] == outs[False]
    agree = 2 if fmt == "ct_fp8" else 4  # W8A8 quantizes activations too (the CPU path is weight-only)
    for got, want in zip(outs[False], ref):
        assert got[:agree] == want[:agree], (got, want)


@pytest.mark.parametrize("kv_scales", [(1.0, 1.0), (0.5, 2.0)])
def test_triton_attention_reads_fp8_cache_like_torch(kv_scales):
    from slicelm.layers.attention import TorchAttentionBackend
    from slicelm.layers.triton.backend import TritonAttentionBackend

    kh, group, d, bs = 8, 4, 128, 16
    torch.manual_seed(0)
    batch = PagedBatch([300, 70, 513], bs, first_block=1, shuffle_seed=0, device=DEV)
    caches = {name: make_kv_caches(1, batch.num_blocks, bs, kh, d, torch.float8_e4m3fn, DEV)[0]
              for name in ("torch", "triton")}
    backends = {"torch": TorchAttentionBackend(), "triton": TritonAttentionBackend()}
    for step in (batch.step([[0] * 120, [0] * 70, [0] * 200]), batch.step([[0] * 60, [], [0] * 300]),
                 batch.decode([0, 0, 0])):
        t = step.meta.num_tokens
        q = torch.randn(t, kh * group, d, device=DEV, dtype=torch.bfloat16)
        k = torch.randn(t, kh, d, device=DEV, dtype=torch.bfloat16)
        v = torch.randn(t, kh, d, device=DEV, dtype=torch.bfloat16)
        outs = {n: b.forward(q, k, v, caches[n], step.meta, d**-0.5, kv_scales=kv_scales)
                for n, b in backends.items()}
        assert torch.equal(caches["torch"].view(torch.uint8), caches["triton"].view(torch.uint8))
        assert rel(outs["triton"], outs["torch"]) < 1e-2


def test_fp8_kv_cache_engine_with_cuda_graphs(tmp_path):
    hf = base_model()
    write_awq(hf, tmp_path, group=64)
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 17, 40)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, dtype="float16", kv_cache_dtype="fp8",
              gpu_memory_utilization=0.2)
    assert llm.engine.worker.runner.kv_caches[0].dtype == torch.float8_e4m3fn
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)
