"""The grammar bitmask applied to logits: the numpy CPU path, the torch path and the Triton kernel (on the CPU
through Triton's interpreter) against a reference built from explicit allowed-token lists.

As in ``tests/layers/test_gemv.py``: TRITON_INTERPRET must be set before triton is imported, so a normal session
runs the kernel's tests in a child pytest process with TRITON_INTERPRET=1 (run them directly:
``TRITON_INTERPRET=1 pytest <this file>``). The GPU version is ``tests/gpu/test_grammar_bitmask_gpu.py``.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from utils_triton import keep_tests_for_this_process

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
if INTERPRET:
    from utils_triton import patch_interpreter

    patch_interpreter()

from slicelm.engine.structured_output import bitmask as bm  # noqa: E402

# (rows, vocab): a vocabulary that is not a multiple of 32, one not a multiple of the kernel's block, a tiny one
SHAPES = [(3, 1000), (2, 4096 + 33), (5, 31)]


def make_case(rows: int, vocab: int, seed: int, dtype: torch.dtype = torch.float32, row_stride: int | None = None):
    """Logits (optionally a row-strided view), an allowed set per row (row 1 unconstrained), its bitmask."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, row_stride or vocab, generator=g).to(dtype)
    logits = base[:, :vocab]
    allowed = [torch.nonzero(torch.rand(vocab, generator=g) < 0.3).flatten().tolist() for _ in range(rows)]
    allowed[min(1, rows - 1)] = list(range(vocab))
    bits = np.zeros((rows, bm.num_words(vocab) * 32), dtype=np.uint8)
    for r, toks in enumerate(allowed):
        bits[r, toks] = 1
    # bit t % 32 of (little-endian) word t // 32 is bit t % 8 of byte t // 8, as the backends fill it
    mask = torch.from_numpy(np.packbits(bits, axis=1, bitorder="little").view(np.int32).copy())
    return logits, allowed, mask


def reference(logits: torch.Tensor, allowed: list[list[int]]) -> torch.Tensor:
    out = torch.full_like(logits, float("-inf"))
    for r, toks in enumerate(allowed):
        out[r, toks] = logits[r, toks]
    return out


@pytest.mark.parametrize(("rows", "vocab"), SHAPES)
@pytest.mark.parametrize("path", ["cpu", "torch"])
def test_host_paths_match_reference(rows: int, vocab: int, path: str) -> None:
    logits, allowed, mask = make_case(rows, vocab, seed=vocab)
    expected = reference(logits, allowed)
    {"cpu": bm.apply_bitmask_cpu, "torch": bm.apply_bitmask_torch}[path](logits, mask)
    assert torch.equal(logits, expected)


def test_dispatch_handles_half_precision_and_strided_rows() -> None:
    logits, allowed, mask = make_case(4, 777, seed=5, dtype=torch.bfloat16, row_stride=800)
    expected = reference(logits, allowed)
    bm.apply_bitmask_(logits, mask)
    assert torch.equal(logits, expected)
    with pytest.raises(AssertionError):
        bm.apply_bitmask_(logits, mask[:, :-1])  # a mask of the wrong width


@pytest.mark.parametrize(("rows", "vocab"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernel_matches_reference(rows: int, vocab: int, dtype: torch.dtype) -> None:
    logits, allowed, mask = make_case(rows, vocab, seed=vocab + 1, dtype=dtype, row_stride=vocab + 7)
    expected = reference(logits, allowed)
    bm.apply_bitmask_triton(logits, mask)
    assert torch.equal(logits, expected)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_interpreter_subprocess() -> None:
    """Parent session: run the interpreted kernel tests in a child with TRITON_INTERPRET=1."""
    from utils_triton import run_interpreted

    run_interpreted(__file__, timeout=300)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernel_compiles_for_sm90_without_spills() -> None:
    from utils_triton import sm90_usage

    usage = sm90_usage(bm._apply_bitmask_kernel, "fp32", {"BLOCK": bm._BLOCK}, {"mask_ptr": "*i32"})
    assert usage.get("STACK", 0) == 0 and 0 < usage["REG"] <= 64, usage


keep_tests_for_this_process(globals(), ("test_host_paths_match_reference",
                                        "test_dispatch_handles_half_precision_and_strided_rows",
                                        "test_interpreter_subprocess", "test_kernel_compiles_for_sm90_without_spills"),
                            INTERPRET)
