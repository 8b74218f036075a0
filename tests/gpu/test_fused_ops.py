"""Fused Triton glue ops against the torch reference code, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from slicelm.layers.rotary import RotaryEmbedding, compute_inv_freq, rope_parameters  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double())).item()


def ref_rms(x, w, eps, residual=None):
    if residual is not None:
        x = x + residual
    xf = x.float()
    y = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if residual is None else (y, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 128, 1024, 4096, 5120])
def test_rms_norm(dtype, n):
    from slicelm.layers.triton.fused_ops import rms_norm

    x = torch.randn(37, n, device="cuda", dtype=dtype)
    r = torch.randn_like(x)
    w = torch.randn(n, device="cuda", dtype=dtype)
    assert rel(rms_norm(x, w, 1e-6), ref_rms(x, w, 1e-6)) < TOL[dtype]
    out, res = rms_norm(x, w, 1e-6, r)
    ref_out, ref_res = ref_rms(x, w, 1e-6, r)
    assert rel(out, ref_out) < TOL[dtype] and rel(res, ref_res) < TOL[dtype]
    strided = torch.randn(37, 3, n, device="cuda", dtype=dtype)[:, 1]  # a row-strided view
    assert rel(rms_norm(strided, w, 1e-6), ref_rms(strided, w, 1e-6)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("hq", "hk", "d"), [(16, 8, 128), (32, 8, 128), (9, 3, 64)])
def test_rope_in_place_matches_reference(dtype, hq, hk, d):
    from slicelm.layers.triton.fused_ops import apply_rope_

    params = rope_parameters({"rope_theta": 1e6})
    inv, scale = compute_inv_freq(params, d, 4096)
    rope = RotaryEmbedding(d, d, 4096, inv, scale).to("cuda", dtype)
    t = 53
    qkv = torch.randn(t, (hq + 2 * hk) * d, device="cuda", dtype=dtype)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    pos = torch.randint(0, 4096, (t,), device="cuda")
    cos, sin = rope.cos_sin_cache[pos].unsqueeze(1).chunk(2, dim=-1)
    ref_q, ref_k = rope._rotate(q.clone(), cos, sin), rope._rotate(k.clone(), cos, sin)
    apply_rope_(pos, q, k, rope.cos_sin_cache, d)
    assert rel(q, ref_q) < TOL[dtype] and rel(k, ref_k) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype):
    from slicelm.layers.triton.fused_ops import silu_and_mul

    x = torch.randn(29, 2 * 3072, device="cuda", dtype=dtype)
    ref = torch.nn.functional.silu(x[:, :3072]) * x[:, 3072:]
    assert rel(silu_and_mul(x), ref) < TOL[dtype]


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize(("hq", "hk"), [(16, 8), (32, 8)])
@torch.no_grad()
def test_qkv_prep_matches_unfused_kernels(qk_norm, hq, hk):
    """The fused qk-norm + rotary + KV store against the separate GPU kernels it replaces (bf16)."""
    from slicelm.layers.norm import RMSNorm
    from slicelm.layers.triton.fused_ops import qkv_norm_rope_store
    from slicelm.layers.triton.kv_store import store_kv_cache

    d, t = 128, 77
    params = rope_parameters({"rope_theta": 1e6})
    inv, scale = compute_inv_freq(params, d, 4096)
    rope = RotaryEmbedding(d, d, 4096, inv, scale).to("cuda", torch.bfloat16)
    qn, kn = RMSNorm(d).to("cuda", torch.bfloat16), RMSNorm(d).to("cuda", torch.bfloat16)
    qn.weight.uniform_(0.5, 1.5)
    kn.weight.uniform_(0.5, 1.5)
    qkv = torch.randn(t, (hq + 2 * hk) * d, device="cuda", dtype=torch.bfloat16) * 3
    positions = torch.randint(0, 4096, (t,), device="cuda")
    slots = torch.randperm(40 * 16, device="cuda")[:t]
    slots[5] = -1
    cache = torch.zeros(2, 40, 16, hk, d, device="cuda", dtype=torch.bfloat16)
    ref_cache = cache.clone()
    q, k, v = qkv.clone().split([hq * d, hk * d, hk * d], dim=-1)
    if qk_norm:
        q, k = qn(q.reshape(t, hq, d)), kn(k.reshape(t, hk, d))
    q, k = rope(positions, q, k)
    store_kv_cache(k.reshape(t, hk, d), v.reshape(t, hk, d), ref_cache, slots)
    ours = qkv_norm_rope_store(qkv, positions, rope.cos_sin_cache, qn.weight if qk_norm else None,
                               kn.weight if qk_norm else None, qn.eps, cache, slots, hq, hk, d)
    # same roundings; only the norm's sum of squares may be added in another order (1 ulp)
    assert rel(ours, q.reshape(t, hq, d)) < 4e-3
    assert rel(cache, ref_cache) < 4e-3
    written = torch.zeros(40 * 16, dtype=torch.bool, device="cuda")
    written[slots[slots >= 0]] = True
    assert (cache[0].reshape(-1, hk, d)[~written] == 0).all()  # nothing outside the slots
