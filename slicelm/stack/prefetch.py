"""``slicelm up`` fetches every model named by Hub id once, before any replica starts.

Each distinct (modelURL, revision, tokenizer, cache, token) is resolved here with huggingface_hub's progress bars
(online: downloaded; offline: found in the cache, or a ``HubError`` naming the id), so that N replicas of one
model share one snapshot and none of them downloads. The replicas are then pinned to the fetched commits
(``--revision`` / ``--tokenizer-revision`` appended to their command lines). ``slicelm plan`` never calls this.
The replica's own environment (``servingEngineSpec.env``, the modelSpec's ``env`` and ``hf_token``) applies
while fetching: its ``HF_HOME``, ``HF_TOKEN``, ``HF_ENDPOINT``… are the ones the replica will use.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from slicelm.loader import hub
from slicelm.stack.serve_args import model_env
from slicelm.stack.spec import ModelSpec, StackSpec

_ENV_PREFIXES = ("HF_", "HUGGING_FACE_", "TRANSFORMERS_OFFLINE", "VLLM_USE_MODELSCOPE", "SLICELM_USE_MODELSCOPE",
                 "MODELSCOPE_")


@dataclass(frozen=True)
class ModelFetch:
    name: str  # the modelURL (or --tokenizer) as typed
    options: hub.HubOptions
    weights: bool
    env: tuple[tuple[str, str], ...]  # the replica's Hub-related environment


def _hub_flags(extra: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(add_help=False)
    for flag in ("--revision", "--tokenizer", "--tokenizer-revision", "--download-dir", "--load-format"):
        p.add_argument(flag, default=None)
    p.add_argument("--hf-token", nargs="?", const=True, default=None)
    p.add_argument("--ignore-patterns", nargs="+", default=list(hub.DEFAULT_IGNORE))
    return p.parse_known_args(extra)[0]


def fetches_of(spec: StackSpec, model: ModelSpec) -> list[ModelFetch]:
    """What a replica of ``model`` will resolve: its model and, if separate, its tokenizer (Hub ids only)."""
    extra = model.vllmConfig.extraArgs if model.vllmConfig else []
    f = _hub_flags(list(extra))
    env = tuple(sorted((k, v) for k, v in model_env(spec.servingEngineSpec.env, model, None).items()
                       if k.startswith(_ENV_PREFIXES)))
    revision = f.revision
    out = []
    if hub.is_hub_id(model.modelURL) and not _local(model.modelURL):
        options = hub.HubOptions(revision, f.download_dir, f.hf_token, tuple(f.ignore_patterns))
        out.append(ModelFetch(model.modelURL, options, f.load_format != "dummy", env))
    tokenizer = f.tokenizer
    if tokenizer and tokenizer != model.modelURL and hub.is_hub_id(tokenizer) and not _local(tokenizer):
        options = hub.HubOptions(f.tokenizer_revision, f.download_dir, f.hf_token, tuple(f.ignore_patterns))
        out.append(ModelFetch(tokenizer, options, False, env))
    return out


def _local(name: str) -> bool:
    from slicelm.loader.bundled import is_bundled_name

    return os.path.exists(os.path.expanduser(name)) or is_bundled_name(name)


def prefetch(spec: StackSpec) -> dict[str, list[str]]:
    """Fetches every Hub model of the stack once; returns per modelSpec name the flags that pin its replicas."""
    done: dict[ModelFetch, str] = {}
    pins: dict[str, list[str]] = {}
    for model in spec.models():
        flags: list[str] = []
        for i, fetch in enumerate(fetches_of(spec, model)):
            if fetch not in done:
                with _environ(dict(fetch.env)):
                    done[fetch] = hub.fetch(fetch.name, fetch.options, weights=fetch.weights).commit
            # the model's own tokenizer follows --revision; a separate one has its own flag
            is_model = i == 0 and fetch.name == model.modelURL
            flags += ["--revision" if is_model else "--tokenizer-revision", done[fetch]]
        if flags:
            pins[model.name] = flags
    return pins


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
