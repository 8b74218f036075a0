"""Hub-style repos of the bundled models (and tiny random ones) for ``hub_server.FakeHub``, and running ``slicelm``
against it in a subprocess (huggingface_hub reads ``HF_HUB_OFFLINE`` / ``HF_ENDPOINT`` when it is imported)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from hub_server import FakeHub, Source
from utils_models import minilm_dir

from slicelm.loader.bundled import bundled_model_path

ROOT = Path(__file__).resolve().parents[1]
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM_ID = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
SMOLLM_Q4 = "smollm2-135m-instruct-q4_1.gguf"
SMOLLM_Q8 = "smollm2-135m-instruct-q8_0.gguf"


def dir_files(path: Path) -> dict[str, Source]:
    return {str(p.relative_to(path)): p for p in sorted(path.rglob("*")) if p.is_file()}


def add_minilm(hub: FakeHub) -> tuple[str, str]:
    """MiniLM as the Hub has it (plus files slicelm must not fetch) at ``main``, and an older commit tagged ``v1``
    whose sentence_bert_config.json says max_seq_length 128. Returns (main commit, v1 commit)."""
    files = dir_files(minilm_dir())
    files |= {"pytorch_model.bin": b"torch pickle", "onnx/model.onnx": b"onnx", "original/params.json": b"{}",
              "original/consolidated.safetensors": b"not a weight file slicelm reads"}
    old = dict(files, **{"sentence_bert_config.json": json.dumps({"max_seq_length": 128}).encode()})
    v1 = hub.add(MINILM_ID, old, refs=("v1",))
    main = hub.add(MINILM_ID, files, refs=("main",))
    return main, v1


def add_smollm_gguf(hub: FakeHub) -> str:
    """The bundled SmolLM2 GGUF as a GGUF repo with two quantizations (the second is never fetched)."""
    return hub.add(SMOLLM_ID, {SMOLLM_Q4: bundled_model_path("smollm2-135m-instruct"),
                               SMOLLM_Q8: b"a quantization nobody asked for", "README.md": b"# SmolLM2 GGUF"})


def _rag_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rag_bench", ROOT / "benchmarks" / "rag.py")
    assert spec is not None and spec.loader is not None
    rag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rag)
    return rag


def write_tiny_xlmr(out: Path, reranker: bool, max_positions: int) -> Path:
    """A tiny random XLM-R written by benchmarks/rag.py (bge-m3: CLS pooling + Normalize; bge-reranker-v2-m3: one
    label) with MiniLM's real tokenizer; ``max_positions`` usable positions (XLM-R's config adds 2)."""
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 vocab_size=30522, max_position_embeddings=max_positions + 2)
    embed, rerank = _rag_benchmark().write_random_models(out, minilm_dir(), shape=shape)
    return rerank if reranker else embed


def add_seed_models(hub: FakeHub, tmp: Path) -> dict[str, str]:
    """BAAI/bge-m3 (8192 positions) and BAAI/bge-reranker-v2-m3 (512) as tiny random XLM-R repos."""
    commits = {}
    for repo_id, reranker, positions in (("BAAI/bge-m3", False, 8192), ("BAAI/bge-reranker-v2-m3", True, 512)):
        path = write_tiny_xlmr(tmp / repo_id.replace("/", "--"), reranker, positions)
        files = dir_files(path) | {"pytorch_model.bin": b"torch pickle", "colbert_linear.pt": b"pt"}
        commits[repo_id] = hub.add(repo_id, files)
    return commits


def hub_env(hub: FakeHub | None, home: Path, offline: bool, **extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1" if offline else "0",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1", **extra}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_TOKEN", None)
    if hub is not None:
        env["HF_ENDPOINT"] = hub.url
    return env


def slicelm(*args: str, env: dict[str, str], timeout: float = 300, **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slicelm.entrypoints.cli", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout, **kw)  # type: ignore[call-overload]


def add_sharded_minilm(hub: FakeHub, tmp: Path, repo_id: str = "org/minilm-sharded") -> str:
    """MiniLM's weights in two shards named by model.safetensors.index.json, plus a stale third shard the index
    does not name (vLLM and slicelm never fetch it)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(minilm_dir() / "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    out = tmp / "sharded"
    out.mkdir(parents=True, exist_ok=True)
    files = {k: v for k, v in dir_files(minilm_dir()).items() if k != "model.safetensors"}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(out / shard))
        files[shard] = out / shard
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {}, "weight_map": {k: shard for shard, keys in halves.items() for k in keys}}).encode()
    files["model-00003-of-00003.safetensors"] = out / "model-00001-of-00002.safetensors"
    return hub.add(repo_id, files)
