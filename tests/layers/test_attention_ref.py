"""TorchAttentionBackend against a dense naive attention over the full (unpaged) sequences."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils_paged import PagedBatch, make_kv_caches

from slicelm.layers.attention import (
    Attention,
    TorchAttentionBackend,
    get_attention_backend,
    store_kv,
)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense causal attention of the whole sequence: q [S, H, D], k/v [S, KH, D] -> [S, H, D], float64."""
    seq_len, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double())).item()


def run_schedule(
    lens: list[int],
    chunks: list[list[int]],
    num_heads: int,
    num_kv_heads: int,
    block_size: int,
    head_dim: int = 16,
    seed: int = 0,
) -> None:
    """Feed every sequence's tokens in the given chunk sizes (one chunk list per step, entry per sequence)
    and compare each step's output rows with naive attention over the full sequence."""
    g = torch.Generator().manual_seed(seed)
    scale = 1 / math.sqrt(head_dim)
    full_q = [torch.randn(n, num_heads, head_dim, generator=g) for n in lens]
    full_k = [torch.randn(n, num_kv_heads, head_dim, generator=g) for n in lens]
    full_v = [torch.randn(n, num_kv_heads, head_dim, generator=g) for n in lens]
    refs = [naive_attention(q, k, v, scale) for q, k, v in zip(full_q, full_k, full_v)]
    batch = PagedBatch(lens, block_size, first_block=1, shuffle_seed=seed)
    (cache,) = make_kv_caches(1, batch.num_blocks, block_size, num_kv_heads, head_dim, fill=float("nan"))
    backend = TorchAttentionBackend()
    for step_chunks in chunks:
        starts = list(batch.num_computed)
        step = batch.step([[0] * n for n in step_chunks])
        sl = [slice(s, s + n) for s, n in zip(starts, step_chunks)]
        q = torch.cat([full_q[i][s] for i, s in enumerate(sl)])
        k = torch.cat([full_k[i][s] for i, s in enumerate(sl)])
        v = torch.cat([full_v[i][s] for i, s in enumerate(sl)])
        out = backend.forward(q, k, v, cache, step.meta, scale)
        assert out.shape == q.shape and out.dtype == q.dtype
        ref = torch.cat([refs[i][s] for i, s in enumerate(sl)])
        assert rel_err(out, ref) < 1e-5
    assert batch.num_computed == lens


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (4, 2), (8, 2), (6, 1)])
def test_ragged_prefill(block_size: int, num_heads: int, num_kv_heads: int) -> None:
    lens = [1, 17, 40, 5, 64, 33]
    run_schedule(lens, [lens], num_heads, num_kv_heads, block_size)


@pytest.mark.parametrize("block_size", [16, 32])
def test_prefix_hit_then_decode(block_size: int) -> None:
    lens = [20, 45, 9, 70]
    # prefix (cached) part, then the rest of the prompt, then 3 decode steps
    first = [16, 32, 1, 33]
    rest = [n - 3 - f for n, f in zip(lens, first)]
    run_schedule(lens, [first, rest, [1] * 4, [1] * 4, [1] * 4], 8, 2, block_size, seed=1)


@pytest.mark.parametrize("block_size", [16, 32])
def test_chunked_prefill_mixed_with_decode(block_size: int) -> None:
    lens = [50, 10, 37]
    # seq 1 finishes its prompt early and decodes while the others are still chunking their prompts
    steps = [[7, 9, 16], [16, 1, 16], [16, 0, 4], [11, 0, 1]]
    run_schedule(lens, steps, 4, 2, block_size, seed=2)


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (8, 2), (6, 1)])
def test_batch_one_decode_path(num_heads: int, num_kv_heads: int) -> None:
    """One sequence, one token per step (the CPU's fused decode path) after a prefill: every row as naive."""
    run_schedule([37], [[20]] + [[1]] * 17, num_heads, num_kv_heads, block_size=16)


def test_writes_land_in_slots_and_padding_is_skipped() -> None:
    block_size, kv_heads, head_dim = 16, 2, 8
    batch = PagedBatch([20, 5], block_size, first_block=2, shuffle_seed=3)
    step = batch.prefill([[0] * 20, [0] * 5])
    (cache,) = make_kv_caches(1, batch.num_blocks, block_size, kv_heads, head_dim, fill=-7.0)
    k = torch.randn(25, kv_heads, head_dim)
    v = torch.randn(25, kv_heads, head_dim)
    slots = step.meta.slot_mapping.clone()
    slots[3] = -1  # padding token: must not be written
    store_kv(k, v, cache, slots)
    flat_k = cache[0].view(-1, kv_heads, head_dim)
    flat_v = cache[1].view(-1, kv_heads, head_dim)
    for t in range(25):
        if t == 3:
            continue
        s = int(slots[t])
        # the slot follows the block table: position p of seq i -> table[p // bs] * bs + p % bs
        seq, pos = (0, t) if t < 20 else (1, t - 20)
        assert s == batch.block_tables[seq][pos // block_size] * block_size + pos % block_size
        assert torch.equal(flat_k[s], k[t]) and torch.equal(flat_v[s], v[t])
    written = set(slots[slots >= 0].tolist())
    untouched = [s for s in range(flat_k.shape[0]) if s not in written]
    assert (flat_k[untouched] == -7.0).all() and (flat_v[untouched] == -7.0).all()
    assert int(step.meta.slot_mapping[3]) not in written


def test_attention_layer_flat_and_3d_inputs_and_dtype() -> None:
    lens = [9, 21]
    heads, kv_heads, d = 4, 2, 16
    batch = PagedBatch(lens, 16)
    step = batch.prefill([[0] * n for n in lens])
    caches = make_kv_caches(2, batch.num_blocks, 16, kv_heads, d, dtype=torch.bfloat16)
    layer = Attention(heads, d, d**-0.5, kv_heads, TorchAttentionBackend())
    q = torch.randn(30, heads * d, dtype=torch.bfloat16)
    k = torch.randn(30, kv_heads * d, dtype=torch.bfloat16)
    v = torch.randn(30, kv_heads * d, dtype=torch.bfloat16)
    out_flat = layer(q, k, v, caches[0], step.meta)
    q3, k3, v3 = q.view(30, heads, d), k.view(30, kv_heads, d), v.view(30, kv_heads, d)
    out_3d = layer(q3, k3, v3, caches[1], step.meta)
    assert out_flat.shape == (30, heads * d) and out_flat.dtype == torch.bfloat16
    assert torch.equal(out_flat.view(30, heads, d), out_3d)
    ref = torch.cat([naive_attention(q3[a:b], k3[a:b], v3[a:b], d**-0.5) for a, b in [(0, 9), (9, 30)]])
    assert rel_err(out_3d, ref) < 1e-2


def test_backend_selection_and_validation() -> None:
    assert get_attention_backend(torch.device("cpu")).name == "torch"
    with pytest.raises(ValueError, match="num_kv_heads"):
        Attention(6, 16, 0.25, 4)
