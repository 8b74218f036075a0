"""ModelScope instead of the Hugging Face Hub (``VLLM_USE_MODELSCOPE=True`` or ``SLICELM_USE_MODELSCOPE=1``).

``modelscope`` is an optional extra (``pip install 'slicelm[modelscope]'``), imported only here and only then.
Its ``snapshot_download`` lays out its own cache (``--download-dir``, else ``MODELSCOPE_CACHE``); the same files
are asked for as from the Hub: config / tokenizer / chat-template files plus ``*.safetensors`` or one GGUF quant.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from slicelm.loader.errors import HubError, ModelNotCachedError

if TYPE_CHECKING:
    from slicelm.loader.hub import HubOptions


def fetch_modelscope(repo_id: str, quant: str | None, options: HubOptions, weights: bool, offline: bool,
                     meta_patterns: tuple[str, ...], lock: AbstractContextManager[None]) -> Path:
    """The local ModelScope snapshot of ``repo_id``: metadata files plus the weights (``*.safetensors``, or the GGUF
    of ``quant``), fetched under ``lock`` (hub.py's per-repo file lock)."""
    try:
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError:
        raise HubError(repo_id, f"model {repo_id!r}: VLLM_USE_MODELSCOPE / SLICELM_USE_MODELSCOPE is set but "
                                "modelscope is not installed; run `pip install 'slicelm[modelscope]'` (or `pip install "
                                "modelscope`), or unset the variable to use the Hugging Face Hub") from None
    allow = list(meta_patterns)
    if quant:
        allow += [f"*{quant}*.gguf", f"*{quant.lower()}*.gguf"]
    elif weights:
        allow += ["*.safetensors", "*.gguf"]
    kwargs = {"revision": options.revision} if options.revision else {}
    try:
        with lock:
            path = snapshot_download(repo_id, cache_dir=options.download_dir, local_files_only=offline,
                                     allow_file_pattern=allow, ignore_file_pattern=list(options.ignore_patterns),
                                     **kwargs)
    except Exception as e:  # modelscope raises its own HTTP / not-found / file errors
        if offline:
            raise ModelNotCachedError(repo_id, f"model {repo_id!r} is not in the ModelScope cache "
                                               f"({options.download_dir or 'MODELSCOPE_CACHE'}) and HF_HUB_OFFLINE=1: "
                                               f"{type(e).__name__}: {e}") from None
        raise HubError(repo_id, f"model {repo_id!r} from ModelScope: {type(e).__name__}: {e}") from None
    return Path(path)
