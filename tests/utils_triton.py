"""Shared set-up for tests that run Triton kernels on the CPU through the interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations


def patch_interpreter() -> None:
    """triton 3.6's interpreter keeps scalars as 1-element arrays and turns them into loop bounds with
    int(array), which NumPy >= 2.4 rejects for ndim > 0; make such tensors index as their element."""
    import triton.runtime.interpreter as interp

    if getattr(interp, "_slicelm_patched", False):
        return
    orig = interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = _patch_lang_tensor
    interp._slicelm_patched = True


def sm90_usage(fn, dtype: str, consts: dict, types: dict[str, str] | None = None) -> dict[str, int]:
    """Compile ``fn`` for sm_90 without a GPU (ptxas ships in the triton wheel) and return the
    cubin's resource usage (REG, STACK, ...). Pointers and strides get the divisibility-16 hint
    the JIT would give them at run time, so loads vectorise as they will on the device.
    ``types`` overrides the type guessed from an argument's name (e.g. ``{"ids_ptr": "*i32"}``)."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = dict(consts)
    options = {"num_warps": consts.pop("num_warps", 4), "num_stages": consts.pop("num_stages", 2)}
    names = fn.arg_names
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif types and n in types:
            sig[n] = types[n]
        elif n.endswith("_ptr"):
            ints = ("block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr", "pos_ptr", "slots_ptr")
            sig[n] = "*" + ("fp32" if n.startswith("part") else "i32" if n in ints else dtype)
        else:
            sig[n] = "fp32" if n in ("qk_scale", "softcap", "eps") else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in consts and (n.endswith("_ptr") or n.startswith("stride"))}
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        report = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    return {m[1]: int(m[2]) for m in re.finditer(r"(REG|STACK):(\d+)", report)}


def run_interpreted(test_file: str, timeout: int = 600) -> None:
    """Run ``test_file``'s tests in a child pytest process with TRITON_INTERPRET=1 (it must be set before
    triton is first imported, so the parent session cannot run them itself)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def keep_tests_for_this_process(namespace: dict, parent_tests: tuple[str, ...], interpreted: bool) -> None:
    """A module's ``parent_tests`` run in the normal session (they start the interpreted child or need
    no interpreter); every other test runs only in the TRITON_INTERPRET=1 child."""
    for name in [n for n in namespace if n.startswith("test_")]:
        if (name in parent_tests) == interpreted:
            del namespace[name]
