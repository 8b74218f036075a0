"""Triton GEMV and ``Linear`` on CUDA at the Llama-3.1-8B projection shapes against F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("triton")

from slicelm.layers.triton.gemv import gemv, gemv_supported  # noqa: E402

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # qkv, o_proj, gate_up, down


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double())).item()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_bf16_gemv_matches_linear(n, k, bias):
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    assert gemv_supported(x, w)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    out = gemv(x, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == (1, n)
    assert rel(out, ref) < 1e-2
    assert rel(F.linear(x, w, b), ref) < 1e-2  # cuBLAS is held to the same bound
    for bn, bk, nw in ((4, 1024, 4), (16, 256, 8), (32, 128, 4)):
        assert rel(gemv(x, w, b, block_n=bn, block_k=bk, num_warps=nw), ref) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes_small_m_and_odd_n(dtype):
    for m in (1, 2, 3, 4):
        x = torch.randn(m, 1000, device="cuda", dtype=dtype)  # K % block_k != 0
        w = torch.randn(333, 1000, device="cuda", dtype=dtype)  # N % block_n != 0
        b = torch.randn(333, device="cuda", dtype=dtype)
        ref = F.linear(x.double(), w.double(), b.double())
        assert rel(gemv(x, w, b), ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_linear_layer_and_cuda_graph():
    from slicelm.layers.linear import Linear

    torch.manual_seed(0)
    lin = Linear(4096, 6144, bias=False).to("cuda", torch.bfloat16)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        assert gemv_supported(x, lin.weight)
        ref = F.linear(x, lin.weight)
        assert rel(lin(x), ref) < 1e-2
        assert torch.equal(lin(x), lin(x))  # deterministic
        assert rel(lin(torch.cat([x, x])), F.linear(torch.cat([x, x]), lin.weight)) < 1e-2  # M=2
        lin(x)  # compile before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = lin(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert rel(out, F.linear(x, lin.weight)) < 1e-2
