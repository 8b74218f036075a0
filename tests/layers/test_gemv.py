"""Triton GEMV (``layers/triton/gemv.py``) on the CPU through Triton's interpreter, and ``Linear``.

As in ``test_triton_interpret.py``: TRITON_INTERPRET must be set before triton is imported, so a
normal session runs the interpreted tests in a child pytest process with TRITON_INTERPRET=1 (run
them directly: ``TRITON_INTERPRET=1 pytest <this file>``). The parent also checks that ``Linear``
on CPU is exactly ``nn.Linear`` and compiles the real bf16 kernel for sm_90 (no GPU needed).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess

import pytest
import torch
from torch import nn

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if INTERPRET:
    from utils_triton import patch_interpreter

    patch_interpreter()

    from slicelm.layers.triton.gemv import gemv

CASES = [  # (M, N, K, block_n, block_k): N not a multiple of block_n, K not a multiple of block_k
    (1, 37, 64, 8, 32),
    (1, 5, 200, 4, 64),
    (1, 130, 96, 16, 128),
    (1, 64, 1024, None, None),  # default config
    (3, 29, 80, 8, 32),  # small M: one W read, one accumulator per x row
    (4, 16, 128, 4, 64),
]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_gemv_matches_linear(case, bias):
    m, n, k, bn, bk = case
    g = torch.Generator().manual_seed(n * k + m)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    out = gemv(x, w, b, block_n=bn, block_k=bk)
    assert out.shape == (m, n) and out.dtype == x.dtype
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_gemv_fp16_and_row_strided_x():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 48, generator=g).half()[:, 1]  # row stride 144
    w = torch.randn(20, 48, generator=g).half()
    out = gemv(x, w, block_n=8, block_k=16)
    assert out.dtype == torch.float16
    ref = torch.nn.functional.linear(x.float(), w.float())
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_gemv_bad_shapes_raise():
    with pytest.raises(ValueError, match="bad shapes"):
        gemv(torch.randn(5, 16), torch.randn(8, 16))
    with pytest.raises(ValueError, match="bias"):
        gemv(torch.randn(1, 16), torch.randn(8, 16), torch.randn(7))


def test_linear_on_cpu_is_nn_linear():
    from slicelm.layers.linear import Linear

    torch.manual_seed(0)
    ref = nn.Linear(64, 40)
    ours = Linear(64, 40)
    ours.load_state_dict(ref.state_dict())
    for shape in ((1, 64), (7, 64), (2, 3, 64)):
        x = torch.randn(shape)
        assert torch.equal(ours(x), ref(x))
    from slicelm.layers.triton.gemv import gemv_supported

    assert not gemv_supported(torch.randn(1, 64), ref.weight)  # CPU tensors never take the GEMV


def test_interpreter_subprocess():
    """Parent session: run the interpreted tests above in a child with TRITON_INTERPRET=1."""
    from utils_triton import run_interpreted

    run_interpreted(__file__, timeout=300)


def test_bf16_gemv_compiles_for_sm90_without_spills():
    """Compile errors and register spills of the real kernel (defaults and sweep corners), on CPU."""
    import re
    import tempfile
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from slicelm.layers.triton import gemv as mod

    fn = mod._gemv_kernel
    names = fn.arg_names
    configs = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
        (1, 4, 512, 4, 2), (1, 8, 512, 4, 3), (1, 32, 128, 4, 2), (1, 16, 1024, 8, 4), (4, 8, 256, 4, 2)]
    for bm, bn, bk, nw, ns in configs:
        consts = {"HAS_BIAS": True, "EVEN_K": True, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
        sig = {n: "constexpr" if n in consts else "*bf16" if n in ("X", "W", "B", "OUT") else "i32" for n in names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
                 if n in ("X", "W", "B", "OUT", "K", "stride_xm", "stride_wn", "stride_om")}
        src = ASTSource(fn=fn, signature=sig, attrs=attrs, constexprs={(names.index(k),): v for k, v in consts.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": nw, "num_stages": ns})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
            report = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
        use = {m[1]: int(m[2]) for m in re.finditer(r"(REG|STACK):(\d+)", report)}
        assert use.get("STACK", 0) == 0, (bm, bn, bk, nw, ns, use)


if INTERPRET:
    del test_interpreter_subprocess, test_bf16_gemv_compiles_for_sm90_without_spills, test_linear_on_cpu_is_nn_linear
else:  # the interpreted tests only run in the child
    _keep = ("test_interpreter_subprocess", "test_bf16_gemv_compiles_for_sm90_without_spills",
             "test_linear_on_cpu_is_nn_linear")
    for _name in [n for n in globals() if n.startswith("test_") and n not in _keep]:
        del globals()[_name]
