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
