"""Chunked processing of embedding inputs longer than ``max_model_len`` (vLLM's ``--pooler-config``
``{"enable_chunked_processing": true, "max_embed_len": N}``).

An input of more than ``max_model_len`` tokens (at most ``max_embed_len``) is cut into consecutive
chunks of ``max_model_len`` tokens; each chunk is embedded without normalization, and the chunk
embeddings are averaged with each chunk's token count as its weight, as vLLM does for MEAN pooling.
Matryoshka ``dimensions`` and normalization apply to the combined vector. Only MEAN pooling
combines this way (a weighted mean of chunk means is the mean over all tokens); CLS and LAST pooling
are refused.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from slicelm.engine.request import PoolingOutput
from slicelm.entrypoints.server.errors import bad_request
from slicelm.pooling_params import PoolingParams, apply_dimensions

Prompt = dict[str, list[int]]
RunFn = Callable[[list[Prompt], PoolingParams], Awaitable[list[PoolingOutput]]]

POOLER_CONFIG_KEYS = ("enable_chunked_processing", "max_embed_len", "pooling_type", "seq_pooling_type",
                      "normalize", "use_activation", "task")
POOLER_TASKS = ("embed", "classify", "score")


@dataclass(frozen=True)
class PoolerConfig:
    enable_chunked_processing: bool = False
    max_embed_len: int | None = None
    pooling_type: str | None = None  # forwarded to the engine (--pooling-type)
    normalize: bool | None = None  # forwarded to the engine (--normalize); vLLM's use_activation is the same
    task: str | None = None  # /pooling's default task (a task the model cannot run: 400 there)

    @classmethod
    def parse(cls, text: str | None) -> PoolerConfig:
        """``--pooler-config`` JSON; ``ValueError`` naming the flag for anything else."""
        if not text:
            return cls()
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--pooler-config: not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise ValueError("--pooler-config: must be a JSON object")
        unknown = sorted(set(raw) - set(POOLER_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"--pooler-config: unsupported key(s) {unknown}; supported: {list(POOLER_CONFIG_KEYS)}")
        chunked = raw.get("enable_chunked_processing", False)
        max_len = raw.get("max_embed_len")
        if not isinstance(chunked, bool):
            raise ValueError("--pooler-config: enable_chunked_processing must be true or false")
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"--pooler-config: max_embed_len must be a positive integer, got {max_len!r}")
        pt = raw.get("pooling_type", raw.get("seq_pooling_type"))
        if pt is not None and pt not in ("MEAN", "CLS", "LAST"):
            raise ValueError(f"--pooler-config: pooling_type must be MEAN, CLS or LAST, got {pt!r}")
        norm = raw.get("normalize", raw.get("use_activation"))
        if norm is not None and not isinstance(norm, bool):
            raise ValueError("--pooler-config: normalize / use_activation must be true or false")
        task = raw.get("task")
        if task is not None and task not in POOLER_TASKS:
            raise ValueError(f"--pooler-config: task must be one of {list(POOLER_TASKS)}, got {task!r}")
        return cls(chunked, max_len, pt, norm, task)


def split_chunks(ids: list[int], size: int) -> list[list[int]]:
    assert size > 0
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def combine_chunks(chunks: list[torch.Tensor], lengths: list[int], dimensions: int | None,
                   normalize: bool) -> torch.Tensor:
    """Token-count-weighted mean of unnormalized chunk embeddings, then ``dimensions`` and normalization."""
    assert chunks and len(chunks) == len(lengths)
    weights = torch.tensor(lengths, dtype=torch.float32).unsqueeze(1)
    mean = (torch.stack([c.float() for c in chunks]) * weights).sum(0) / weights.sum()
    return apply_dimensions(mean, dimensions, normalize)


async def run_chunked(prompts: list[Prompt], run: RunFn, max_model_len: int, pooling_type: str | None,
                      default_normalize: bool | None, dimensions: int | None, normalize: bool | None,
                      resp_id: str) -> list[PoolingOutput]:
    """Embeds ``prompts`` (some longer than ``max_model_len``) chunk by chunk through ``run``; one combined
    output per prompt. 400 unless the model pools with MEAN."""
    if pooling_type != "MEAN":
        raise bad_request(f"input: longer than max_model_len {max_model_len} tokens, and chunked processing can "
                          f"only combine MEAN pooling; this model uses {pooling_type} pooling", param="input",
                          code="context_length_exceeded")
    chunks: list[Prompt] = []
    owner: list[int] = []
    for i, p in enumerate(prompts):
        for c in split_chunks(p["prompt_token_ids"], max_model_len):
            chunks.append({"prompt_token_ids": c})
            owner.append(i)
    outs = await run(chunks, PoolingParams(normalize=False, task="embed"))
    norm = normalize if normalize is not None else (default_normalize if default_normalize is not None else True)
    combined = []
    for i, p in enumerate(prompts):
        mine = [(o.data, len(c["prompt_token_ids"])) for o, c, k in zip(outs, chunks, owner) if k == i]
        data = combine_chunks([d for d, _ in mine], [n for _, n in mine], dimensions, norm)
        combined.append(PoolingOutput(f"{resp_id}-{i}", p["prompt_token_ids"], data, True, outs[0].metrics))
    return combined
