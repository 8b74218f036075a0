"""The grammar-bitmask Triton kernel on the GPU against the torch path and the host (numpy) path, at Qwen's
151k vocabulary and engine batch sizes, with the mask coming from pinned host memory as the runner sends it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from slicelm.engine.structured_output import bitmask as bm  # noqa: E402

VOCAB = 151936


def random_mask(rows: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    """A pinned int32 mask: random words, every other row unconstrained (all ones)."""
    words = torch.randint(-(2**31), 2**31, (rows, bm.num_words(vocab)), generator=g, dtype=torch.int64)
    mask = bm.allocate(rows, vocab, pin=True)
    mask.copy_(words.to(torch.int32))
    mask[1::2] = -1
    return mask


@pytest.mark.parametrize("rows", [1, 7, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_torch_and_host_paths(rows: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(rows)
    mask = random_mask(rows, VOCAB, g)
    logits = torch.randn(rows, VOCAB, generator=g).to(dtype)
    host = logits.clone()
    bm.apply_bitmask_cpu(host, mask)
    gpu = logits.cuda()
    ref = gpu.clone()
    bm.apply_bitmask_(gpu, mask.to("cuda", non_blocking=True))  # CUDA: the Triton kernel
    bm.apply_bitmask_torch(ref, mask.cuda())
    torch.cuda.synchronize()
    assert torch.equal(gpu, ref) and torch.equal(gpu.cpu(), host)
    banned = np.unpackbits(mask.numpy().view(np.uint8), axis=1, count=VOCAB, bitorder="little") == 0
    assert torch.isinf(gpu.cpu()[torch.from_numpy(banned)]).all()
    assert torch.equal(gpu[1::2].cpu(), logits[1::2])  # unconstrained rows untouched


def test_kernel_on_a_row_strided_view() -> None:
    g = torch.Generator().manual_seed(9)
    mask = random_mask(4, VOCAB, g)
    base = torch.randn(4, VOCAB + 64, generator=g, device="cpu").cuda()
    view = base[:, :VOCAB]
    ref = view.clone()
    bm.apply_bitmask_(view, mask.cuda())
    bm.apply_bitmask_torch(ref, mask.cuda())
    assert torch.equal(view, ref) and torch.isfinite(base[:, VOCAB:]).all()  # nothing written past the vocab
