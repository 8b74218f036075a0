"""Stands in for vLLM's ``tests/conftest.py`` in the harness: the HF references the pooling tests compare with
(sentence-transformers on the substituted local models) and tokenizer look-ups by the names the tests use."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers
from tests.substitutions import kind_of, substitute, tokenizer_dir

_auto_tok = transformers.AutoTokenizer.from_pretrained.__func__


def _from_pretrained(cls, name, *a, **k):
    if isinstance(name, str) and "/" in name and not name.startswith("/"):
        name = tokenizer_dir(name)
        k.pop("revision", None)
    return _auto_tok(cls, name, *a, **k)


transformers.AutoTokenizer.from_pretrained = classmethod(_from_pretrained)

import vllm.tokenizers as _vt  # noqa: E402

_get_tok = _vt.get_tokenizer


def _get_tokenizer(name=None, *a, **k):
    name = name if name is not None else k.pop("tokenizer_name")
    if isinstance(name, str) and "/" in name and not name.startswith("/"):
        name = tokenizer_dir(name)
    k.pop("tokenizer_mode", None)
    keep = {x: y for x, y in k.items() if x == "trust_remote_code"}
    return transformers.AutoTokenizer.from_pretrained(name, **keep)


_vt.get_tokenizer = _get_tokenizer

import vllm.model_executor.model_loader.weight_utils as _weight_utils  # noqa: E402
import vllm.transformers_utils.repo_utils as _repo_utils  # noqa: E402


def _no_hub_folder(repo_id: str, *a: object, **k: object) -> str:
    """An empty local folder named after ``repo_id`` instead of a Hub download (offline): the server serves the
    repo's substitute under that path (``substitutions.py``)."""
    path = Path(os.environ.get("HARNESS_MODELS", "/tmp")) / "no-hub" / repo_id.replace("/", "--")
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


class _NoHubApi:
    """The LoRA fixtures' ``hf_api().snapshot_download``: the harness drops the LoRA flags, so the tests of
    those modules that do not use an adapter run; those that name one are out of scope."""

    def snapshot_download(self, repo_id: str, **kwargs: object) -> str:
        return _no_hub_folder(repo_id)


_repo_utils.hf_api = lambda *a, **k: _NoHubApi()
_weight_utils.download_weights_from_hf = _no_hub_folder  # test_token_in_token_out: the config of a dummy model


class HfRunner:
    """Only what the entrypoint tests use: sentence-transformers ``encode`` and cross-encoder ``predict``."""

    def __init__(self, model_name: str, dtype: str = "float32", *, is_sentence_transformer: bool = False,
                 is_cross_encoder: bool = False, **kwargs: object) -> None:
        import sentence_transformers as st
        local = substitute(model_name)
        if kind_of(model_name) == "embed":
            local = tokenizer_dir(model_name)
        if is_cross_encoder:
            self.model = st.CrossEncoder(local, device="cpu")
        else:
            self.model = st.SentenceTransformer(local, device="cpu")

    def encode(self, prompts: list[str], *a: object, **k: object) -> list[list[float]]:
        return [list(map(float, e)) for e in self.model.encode(prompts, convert_to_numpy=True)]

    def predict(self, pairs: list[list[str]], *a: object, **k: object) -> torch.Tensor:
        return torch.tensor(self.model.predict(pairs, *a, **k))

    def __enter__(self) -> HfRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.fixture(autouse=True)
def _substitute_vocab_size(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test module's ``get_vocab_size(name)`` helper (vLLM's ``ModelConfig`` of the Hub model, offline here):
    the vocabulary of the model that serves ``name``."""
    if request.module is not None and hasattr(request.module, "get_vocab_size"):
        monkeypatch.setattr(request.module, "get_vocab_size",
                            lambda name: len(transformers.AutoTokenizer.from_pretrained(tokenizer_dir(name))))


@pytest.fixture(scope="session")
def hf_runner():
    return HfRunner


class LocalAssetServer:
    """Multimodal assets: nothing is served (the tests that send them are out of scope); text-only variants of
    those tests only need the fixture to exist."""

    def url_for(self, name: str) -> str:
        return f"http://127.0.0.1:9/{name}"


@pytest.fixture(scope="session")
def local_asset_server() -> LocalAssetServer:
    return LocalAssetServer()
