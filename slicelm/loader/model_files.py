"""Locating a model's files: bundled short names, HF-style directories and single `.gguf` files.

`resolve_model` validates eagerly (config, weight files, safetensors headers / GGUF metadata) so
bad input fails before any engine state is built; `ModelSource.iter_weights` streams tensors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from tqdm.auto import tqdm

from slicelm.loader.bundled import BUNDLED_MODELS, ModelNotFoundError, bundled_model_path, is_bundled_name
from slicelm.loader.errors import CorruptModelFileError as CorruptModelFileError
from slicelm.loader.errors import InvalidModelDirError as InvalidModelDirError
from slicelm.loader.errors import MissingWeightsError as MissingWeightsError
from slicelm.loader.lazy_tensor import LazyTensor

if TYPE_CHECKING:
    from slicelm.config import EngineArgs
    from slicelm.loader.gguf_loader import GGUFModel
    from slicelm.loader.hub import HubOptions

__all__ = [
    "CorruptModelFileError",
    "InvalidModelDirError",
    "MissingWeightsError",
    "ModelNotFoundError",
    "ModelSource",
    "locate_model",
    "pin_hub_snapshots",
    "resolve_model",
]

SAFETENSORS_INDEX = "model.safetensors.index.json"
QUANT_CONFIG_FILES = ("quant_config.json", "quantize_config.json")
_POOLING_MODES = {  # sentence-transformers Pooling config key -> our pooling_mode
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "lasttoken",
}


def _read_json(path: Path, error: type[ValueError] = InvalidModelDirError) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"cannot read {path}: {e}") from e


@dataclass
class ModelSource:
    path: Path  # the HF directory or the .gguf file
    kind: Literal["hf", "gguf"]
    weight_files: list[Path] = field(default_factory=list)  # safetensors files ("hf" only)
    gguf: GGUFModel | None = None  # the parsed GGUF file ("gguf" only)

    @property
    def model_dir(self) -> Path:
        """Directory holding the model (and its tokenizer files for "hf")."""
        return self.path if self.kind == "hf" else self.path.parent

    @cached_property
    def config(self) -> dict[str, Any]:
        """HF config.json as a dict (synthesized from metadata for GGUF)."""
        if self.gguf is not None:
            return dict(self.gguf.config)
        config = _read_json(self.path / "config.json")
        if not isinstance(config, dict):
            raise InvalidModelDirError(f"{self.path / 'config.json'} must hold a JSON object")
        if not config.get("quantization_config"):  # AutoAWQ / AutoGPTQ keep it in a file of its own
            for name in QUANT_CONFIG_FILES:
                if (self.path / name).is_file():
                    config["quantization_config"] = _read_json(self.path / name)
                    break
        return config

    @cached_property
    def generation_config(self) -> dict[str, Any]:
        if self.gguf is not None:
            return dict(self.gguf.generation_config)
        path = self.path / "generation_config.json"
        return _read_json(path) if path.is_file() else {}

    @property
    def tokenizer_path(self) -> Path | None:
        """tokenizer.json of an HF directory; None for GGUF (the tokenizer lives in its metadata)."""
        if self.kind != "hf":
            return None
        path = self.path / "tokenizer.json"
        return path if path.is_file() else None

    @cached_property
    def st_pooling(self) -> dict[str, Any] | None:
        """sentence-transformers pooling: {"pooling_mode": "mean"|"cls"|"lasttoken", "normalize": bool}."""
        modules_path = self.model_dir / "modules.json"
        if self.kind != "hf" or not modules_path.is_file():
            return None
        modules = _read_json(modules_path)
        pooling = next((m for m in modules if m.get("type", "").endswith("models.Pooling")), None)
        if pooling is None:
            return None
        pool_config = _read_json(self.model_dir / pooling.get("path", "") / "config.json")
        modes = [mode for key, mode in _POOLING_MODES.items() if pool_config.get(key)]
        if len(modes) != 1:
            raise InvalidModelDirError(
                f"{self.model_dir / pooling.get('path', '')}/config.json: exactly one of "
                f"{', '.join(_POOLING_MODES)} must be true (got {modes or 'none'})"
            )
        normalize = any(m.get("type", "").endswith("models.Normalize") for m in modules)
        return {"pooling_mode": modes[0], "normalize": normalize}

    @cached_property
    def max_seq_length(self) -> int | None:
        """max_seq_length from sentence_bert_config.json, if present."""
        path = self.model_dir / "sentence_bert_config.json"
        if self.kind != "hf" or not path.is_file():
            return None
        value = _read_json(path).get("max_seq_length")
        return int(value) if value is not None else None

    def iter_weights(self, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor | LazyTensor]]:
        """(HF parameter name, tensor) pairs, with a tqdm progress bar. ``lazy``: safetensors tensors come as
        ``LazyTensor`` (read where narrowed; valid until the next pair is asked for); GGUF tensors stay whole."""
        if self.gguf is not None:
            with tqdm(total=self.gguf.num_weights(), desc="Loading GGUF weights", unit="tensor") as bar:
                for item in self.gguf.iter_weights():
                    yield item
                    bar.update(1)
            return
        from safetensors import safe_open

        total = sum(len(_safetensors_keys(f)) for f in self.weight_files)
        with tqdm(total=total, desc="Loading safetensors weights", unit="tensor") as bar:
            for file in self.weight_files:
                try:
                    with safe_open(str(file), framework="pt") as f:
                        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                            yield name, LazyTensor(f.get_slice(name)) if lazy else f.get_tensor(name)
                            bar.update(1)
                except (OSError, RuntimeError, ValueError) as e:
                    if isinstance(e, CorruptModelFileError):
                        raise
                    raise CorruptModelFileError(f"cannot read safetensors file {file}: {e}") from e


def _safetensors_keys(file: Path) -> list[str]:
    """Tensor names of a safetensors file; parses (and so validates) its header."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # SafetensorError, OSError, ...
        raise CorruptModelFileError(f"cannot read safetensors file {file}: {type(e).__name__}: {e}") from e


def _hf_weight_files(directory: Path) -> list[Path]:
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = _read_json(index, MissingWeightsError).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MissingWeightsError(f"{index} has no weight_map")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MissingWeightsError(f"{index} names shard files that do not exist: {', '.join(missing)}")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" (found {', '.join(others)}; only safetensors are supported)" if others else ""
        raise MissingWeightsError(f"model directory {directory} has no *.safetensors weight files{hint}")
    return files


def locate_model(name_or_path: str, load_format: str = "auto", hub: HubOptions | None = None) -> Path:
    """vLLM's order: an existing path, a bundled short name, else a Hub repo id (fetched or found in the cache).
    ``load_format="dummy"`` fetches config and tokenizer files only."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if is_bundled_name(name_or_path):
        return bundled_model_path(name_or_path)
    from slicelm.loader import hub as hub_mod

    if hub_mod.is_hub_id(name_or_path):
        return hub_mod.fetch(name_or_path, hub, weights=load_format != "dummy").model_path
    raise ModelNotFoundError(
        f"model {name_or_path!r}: no such file or directory, not a bundled model "
        f"(short names: {', '.join(sorted(BUNDLED_MODELS))}) and not a Hub repo id (org/name)"
    )


def resolve_model(name_or_path: str, load_format: str = "auto", hub: HubOptions | None = None) -> ModelSource:
    """Find and validate a model: a path (HF directory or `.gguf` file), a bundled short name or a Hub id.

    ``load_format="dummy"`` (vLLM's name) needs only ``config.json``: weights are random, for benchmarks.
    """
    path = locate_model(name_or_path, load_format, hub)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return _gguf_source(ggufs[0])
            raise InvalidModelDirError(
                f"model directory {path} has no config.json (expected a Hugging Face model directory "
                "or a single .gguf file)"
            )
        if load_format == "dummy":
            source = ModelSource(path=path, kind="hf", weight_files=[])
            _ = source.config
            return source
        source = ModelSource(path=path, kind="hf", weight_files=_hf_weight_files(path))
        for file in source.weight_files:
            _safetensors_keys(file)
        _ = source.config  # validate config.json now
        return source
    if path.suffix.lower() == ".gguf":
        return _gguf_source(path)
    raise ModelNotFoundError(
        f"model file {path} is not supported: pass a .gguf file or a directory with config.json"
    )


def _gguf_source(path: Path) -> ModelSource:
    from slicelm.loader.gguf_loader import GGUFModel

    model = GGUFModel(path)
    source = ModelSource(path=path, kind="gguf", gguf=model)
    _ = source.config  # validate metadata now
    return source


def pin_hub_snapshots(args: EngineArgs) -> EngineArgs:
    """Front ends call this before starting an engine core: a model or tokenizer named by Hub id is fetched here,
    once (with huggingface_hub's progress bars, and its errors raised here), and its revision is pinned to the
    snapshot's commit so that the core loads exactly these files from the cache."""
    import dataclasses

    from slicelm.loader import hub

    def pinned(name: str, options: HubOptions, weights: bool) -> str | None:
        if Path(name).expanduser().exists() or is_bundled_name(name) or not hub.is_hub_id(name):
            return None
        return hub.fetch(name, options, weights=weights).commit

    changes: dict[str, str] = {}
    if (commit := pinned(args.model, hub.HubOptions.for_model(args), args.load_format != "dummy")) is not None:
        changes["revision"] = commit
    tokenizer = args.tokenizer or args.model
    if not args.skip_tokenizer_init:
        tok_commit = pinned(tokenizer, hub.HubOptions.for_tokenizer(args), weights=False)
        if tok_commit is not None:
            changes["tokenizer_revision"] = tok_commit
    return dataclasses.replace(args, **changes) if changes else args
