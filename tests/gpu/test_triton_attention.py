"""Triton paged attention on CUDA at real sizes against a dense float64 reference.

Every test draws fresh random inputs; unowned KV-cache slots (and the null block 0) hold NaN and
outputs are NaN-poisoned before each kernel call, so stray reads and unwritten elements fail.
Errors are ||out - ref|| / ||ref||: < 1e-2 for bf16, < 1e-3 for fp32.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from slicelm.layers.attention_metadata import AttentionMetadata  # noqa: E402
from slicelm.layers.triton.backend import TritonAttentionBackend  # noqa: E402
from slicelm.layers.triton.kv_store import store_kv_cache  # noqa: E402
from slicelm.layers.triton.paged_attention import paged_decode_attention, unified_attention  # noqa: E402

DEV = torch.device("cuda")
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-3}


def make_batch(q_lens, seq_lens, num_kv_heads, group, head_dim, block_size, dtype,
               num_blocks=0, max_blocks=0):
    """Paged batch on CUDA with the prefix (seq_len - q_len tokens) already in shuffled cache blocks.
    ``num_blocks`` / ``max_blocks`` fix the cache and block-table sizes (for CUDA-graph replays)."""
    num_heads = num_kv_heads * group
    nblk = [-(-s // block_size) for s in seq_lens]
    num_blocks = max(num_blocks, sum(nblk) + 8)
    cache_shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=DEV)
    perm = torch.randperm(num_blocks - 1, device=DEV) + 1
    block_tables = torch.zeros(len(seq_lens), max(max_blocks, max(nblk) + 2), dtype=torch.int32, device=DEV)
    flat_k = cache[0].view(-1, num_kv_heads, head_dim)
    flat_v = cache[1].view(-1, num_kv_heads, head_dim)
    full_k, full_v, keys, values, slots = [], [], [], [], []
    used = 0
    for i, (n, s) in enumerate(zip(q_lens, seq_lens)):
        ids = perm[used : used + nblk[i]]
        used += nblk[i]
        block_tables[i, : nblk[i]] = ids.to(torch.int32)
        pos = torch.arange(s, device=DEV)
        slot = ids[pos // block_size] * block_size + pos % block_size
        kk = torch.randn(s, num_kv_heads, head_dim, device=DEV).to(dtype)
        vv = torch.randn(s, num_kv_heads, head_dim, device=DEV).to(dtype)
        flat_k[slot[: s - n]] = kk[: s - n]
        flat_v[slot[: s - n]] = vv[: s - n]
        full_k.append(kk)
        full_v.append(vv)
        keys.append(kk[s - n :])
        values.append(vv[s - n :])
        slots.append(slot[s - n :])
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    query = torch.randn(qsl[-1], num_heads, head_dim, device=DEV).to(dtype)
    meta = AttentionMetadata(
        num_seqs=len(q_lens), num_tokens=qsl[-1],
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEV),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEV),
        slot_mapping=torch.cat(slots).to(torch.int64), block_tables=block_tables,
        max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl, seq_lens_cpu=list(seq_lens),
    )
    return query, torch.cat(keys), torch.cat(values), cache, meta, full_k, full_v


def reference(query, full_k, full_v, meta, scale):
    out = torch.empty(query.shape, dtype=torch.float64, device=DEV)
    for i in range(meta.num_seqs):
        a, b = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
        s = meta.seq_lens_cpu[i]
        group = query.shape[1] // full_k[i].shape[1]
        q = query[a:b].double().transpose(0, 1)
        k = full_k[i].double().repeat_interleave(group, 1).transpose(0, 1)
        v = full_v[i].double().repeat_interleave(group, 1).transpose(0, 1)
        att = (q @ k.transpose(1, 2)) * scale
        causal = torch.arange(s, device=DEV)[None, :] > torch.arange(s - (b - a), s, device=DEV)[:, None]
        out[a:b] = (att.masked_fill(causal, float("-inf")).softmax(-1) @ v).transpose(0, 1)
    return out


def rel_err(out, ref):
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out.double() - ref).norm() / ref.norm()).item()


def poisoned(query):
    return torch.full_like(query, float("nan"))


DECODE = [  # (Hkv, group, head_dim, block_size)
    (8, 2, 128, 16), (8, 4, 128, 16), (8, 1, 64, 32), (4, 8, 128, 32), (2, 2, 64, 16), (8, 2, 128, 32),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", DECODE)
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_decode(dtype, shape, batch):
    hkv, group, d, bs = shape
    seq_lens = torch.randint(1, 8193, (batch,)).tolist()
    seq_lens[0] = 8192 if batch > 1 else seq_lens[0]
    query, key, value, cache, meta, fk, fv = make_batch([1] * batch, seq_lens, hkv, group, d, bs, dtype)
    scale = d**-0.5
    store_kv_cache(key, value, cache, meta.slot_mapping)
    ref = reference(query, fk, fv, meta, scale)
    for splits in (None, 1, 4):
        out = paged_decode_attention(poisoned(query), query, cache, meta.block_tables, meta.seq_lens,
                                     meta.query_start_loc, batch, meta.max_seq_len, scale, num_splits=splits)
        assert rel_err(out, ref) < TOL[dtype], f"num_splits={splits}"
    out = unified_attention(poisoned(query), query, cache, meta.block_tables, meta.seq_lens,
                            meta.query_start_loc, batch, scale)
    assert rel_err(out, ref) < TOL[dtype]


MIXED = [  # (q_lens, seq_lens): fresh prefill, prefix hits, chunked prefill, decode rows
    ([1, 300, 1, 77], [8000, 300, 5, 1500]),
    ([512, 1, 129], [4096, 2, 129]),
    ([1000], [1000]),
    ([33, 1, 64, 7], [8192, 4000, 64, 7]),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(8, 2, 128, 16), (8, 4, 64, 32), (2, 8, 128, 32), (4, 1, 128, 16)])
@pytest.mark.parametrize("lens", MIXED)
def test_unified(dtype, shape, lens):
    hkv, group, d, bs = shape
    q_lens, seq_lens = lens
    query, key, value, cache, meta, fk, fv = make_batch(q_lens, seq_lens, hkv, group, d, bs, dtype)
    scale = d**-0.5
    store_kv_cache(key, value, cache, meta.slot_mapping)
    out = unified_attention(poisoned(query), query, cache, meta.block_tables, meta.seq_lens,
                            meta.query_start_loc, meta.num_seqs, scale)
    assert rel_err(out, reference(query, fk, fv, meta, scale)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_backend_forward_both_paths(dtype):
    backend = TritonAttentionBackend()
    for q_lens, seq_lens in (([1] * 5, [3, 8192, 100, 1, 2048]), ([20, 1, 700], [50, 9, 700])):
        query, key, value, cache, meta, fk, fv = make_batch(q_lens, seq_lens, 8, 2, 128, 16, dtype)
        out = backend.forward(query, key, value, cache, meta, 0.088)
        assert out.shape == query.shape and out.dtype == dtype
        assert rel_err(out, reference(query, fk, fv, meta, 0.088)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_flash_prefill_dispatch(dtype):
    backend = TritonAttentionBackend(use_flash_prefill=True)
    if backend._varlen_attn is None:
        pytest.skip("torch.nn.attention.varlen.varlen_attn with scale= not available")
    lens = [300, 17, 1024]
    query, key, value, cache, meta, fk, fv = make_batch(lens, lens, 8, 4, 128, 16, dtype)
    out = backend.forward(query, key, value, cache, meta, 0.088)
    assert rel_err(out, reference(query, fk, fv, meta, 0.088)) < TOL[dtype]
    # the flash path must still have stored K/V: attend again through the cache with the Triton kernel
    out2 = unified_attention(poisoned(query), query, cache, meta.block_tables, meta.seq_lens,
                             meta.query_start_loc, meta.num_seqs, 0.088)
    assert rel_err(out2, reference(query, fk, fv, meta, 0.088)) < TOL[dtype]


def test_cuda_graph_decode_replay():
    """Capture the decode path once with a max_seq_len bound of 8192; replay with new contexts."""
    batch, hkv, group, d, bs, dtype = 16, 8, 2, 128, 16, torch.bfloat16
    sizes = {"num_blocks": batch * (8192 // bs) + 8, "max_blocks": 8192 // bs + 2}
    backend = TritonAttentionBackend(max_seq_len_bound=8192)
    lens = torch.randint(1, 8193, (batch,)).tolist()
    query, key, value, cache, meta, _, _ = make_batch([1] * batch, lens, hkv, group, d, bs, dtype, **sizes)
    backend.forward(query, key, value, cache.clone(), meta, 0.088)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(query, key, value, cache, meta, 0.088)
    for hi in (600, 8193, 40):
        lens = torch.randint(1, hi, (batch,)).tolist()
        q, k, v, cache2, meta2, fk, fv = make_batch([1] * batch, lens, hkv, group, d, bs, dtype, **sizes)
        for dst, src in ((query, q), (key, k), (value, v), (cache, cache2), (meta.seq_lens, meta2.seq_lens),
                         (meta.slot_mapping, meta2.slot_mapping), (meta.block_tables, meta2.block_tables)):
            dst.copy_(src)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference(q, fk, fv, meta2, 0.088)
        assert rel_err(out, ref) < 1e-2
        eager = backend.forward(q, k, v, cache2, meta2, 0.088)
        assert torch.equal(eager, out), "graph replay differs from the eager run"


def test_matches_torch_backend():
    attention = pytest.importorskip("slicelm.layers.attention")
    torch_backend = attention.TorchAttentionBackend()
    for q_lens, seq_lens in (([1, 1, 1], [5, 700, 3000]), ([40, 1, 300], [100, 900, 300])):
        for dtype in (torch.bfloat16, torch.float32):
            query, key, value, cache, meta, _, _ = make_batch(q_lens, seq_lens, 8, 4, 128, 16, dtype)
            cache2 = cache.clone()
            ours = TritonAttentionBackend().forward(query, key, value, cache, meta, 0.088)
            theirs = torch_backend.forward(query, key, value, cache2, meta, 0.088)
            err = ((ours.double() - theirs.double()).norm() / theirs.double().norm()).item()
            assert err < 2 * TOL[dtype], (q_lens, dtype, err)
