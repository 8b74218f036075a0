"""Starting ``slicelm serve`` on a pooling model (MiniLM or a random cross-encoder) for the pooling tests."""

from __future__ import annotations

from pathlib import Path

import httpx
import transformers
from conftest import Server, start_server
from utils_models import write_random_cross_encoder

MINILM = "all-minilm-l6-v2"


def start_model_server(tmp_dir: Path, model: str, *flags: str, timeout: float = 180.0) -> Server:
    return start_server(tmp_dir, *flags, timeout=timeout, model=model)


def write_random_xlmr_cross_encoder(path: Path, seed: int = 0) -> transformers.PreTrainedModel:
    return write_random_cross_encoder(path, "xlmr", seed)


def error_of(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and err["type"]
    return err
