"""The ``slicelm`` console script: argument parsing and a one-shot offline generation."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import MODEL, ROOT

from slicelm.entrypoints.cli import make_parser
from slicelm.entrypoints.cli_args import normalize_argv


def test_serve_parses_vllm_flags() -> None:
    args = make_parser().parse_args([
        "serve", MODEL, "--port", "9000", "--api-key", "k", "--served-model-name", "a", "b",
        "--max-num-seqs", "8", "--max-model-len", "1024", "--no-enable-prefix-caching", "--max-waiting-requests",
        "5", "--shutdown-timeout", "2", "--scheduling-policy", "priority", "--block-size", "32"])
    assert (args.port, args.api_key, args.served_model_name) == (9000, "k", ["a", "b"])
    assert (args.max_num_seqs, args.max_model_len, args.enable_prefix_caching) == (8, 1024, False)
    assert (args.max_waiting_requests, args.shutdown_timeout, args.block_size) == (5, 2.0, 32)


def test_vllm_spellings_underscores_and_json_keys() -> None:
    """As vLLM's parser: ``--flag_name`` is ``--flag-name``; ``--json-flag.key value`` sets one key (dots nest,
    values parse as JSON else strings) and merges into the flag's JSON given whole."""
    argv = normalize_argv(["serve", MODEL, "--max_model_len=64", "--pooler-config", '{"normalize": false}',
                           "--pooler-config.max_embed_len", "100", "--pooler-config.task=embed", "--x.a.b", "c"])
    assert argv == ["serve", MODEL, "--max-model-len=64", "--pooler-config",
                    '{"normalize": false, "max_embed_len": 100, "task": "embed"}', "--x", '{"a": {"b": "c"}}']
    args = make_parser().parse_args(normalize_argv(["serve", MODEL, "--max_num_seqs", "3",
                                                    "--pooler-config.enable_chunked_processing", "true"]))
    assert args.max_num_seqs == 3 and args.pooler_config == '{"enable_chunked_processing": true}'
    assert normalize_argv(["--", "--a_b"]) == ["--", "--a_b"]


def test_api_key_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    assert make_parser().parse_args(["serve", MODEL]).api_key == "from-env"


@pytest.mark.slow
def test_generate_one_shot() -> None:
    out = subprocess.run([sys.executable, "-m", "slicelm.entrypoints.cli", "generate", MODEL, "--device", "cpu",
                          "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "12"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Paris" in out.stdout


def test_unknown_model_is_one_clean_error() -> None:
    out = subprocess.run([sys.executable, "-m", "slicelm.entrypoints.cli", "generate", "/nonexistent/model",
                          "--prompt", "x"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
