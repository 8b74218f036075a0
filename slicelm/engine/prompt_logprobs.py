"""Logprobs of prompt tokens (``prompt_logprobs``), core side.

The hidden state at prompt position ``p`` predicts prompt token ``p + 1``: for a request that asks, a
step computes logits at the prompt positions of its chunk and keeps, per position, the next prompt
token's log-probability and rank plus the top-k (vLLM's order: the token first, then the top-k).
Requests that ask skip the prefix cache (``Scheduler``), so every position is computed once;
positions already done (a request recomputed after preemption) are not redone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slicelm.engine.request import Request

ROWS_PER_CHUNK = 64  # bounds the [rows, vocab] float32 logits held at once (not in the memory profile)


@dataclass
class PromptLogprobsJob:
    """The rows of one step's hidden states that give one request's next prompt-token logprobs. Other
    tensor-parallel ranks get the job without its request: they compute the same logits (their
    collectives must match the driver's) and keep nothing."""

    request: Request | None
    rows: np.ndarray  # int64 indices into the step's flattened tokens
    targets: np.ndarray  # int64: the prompt token each row predicts
    k: int


def plan_jobs(scheduled: list, query_start_loc: np.ndarray, vocab_size: int) -> list[PromptLogprobsJob]:
    """Jobs for the scheduled requests with prompt_logprobs whose chunk covers prompt positions."""
    jobs = []
    for s, a in zip(scheduled, query_start_loc[:-1]):
        r: Request = s.request
        if not r.wants_prompt_logprobs:
            continue
        start = r.num_computed_tokens
        first = max(start, len(r.prompt_logprobs))  # positions before it are done
        end = min(start + s.num_new_tokens, r.num_prompt_tokens - 1)
        if first >= end:
            continue
        positions = np.arange(first, end, dtype=np.int64)
        targets = np.asarray(r.prompt_token_ids, dtype=np.int64)[positions + 1]
        k = min(int(r.sampling_params.prompt_logprobs), vocab_size)
        jobs.append(PromptLogprobsJob(r, positions - start + int(a), targets, k))
    return jobs


def run_jobs(model: torch.nn.Module, hidden: torch.Tensor, jobs: list[PromptLogprobsJob]) -> None:
    """Computes the jobs' entries and appends them to their requests (synchronously: a host copy)."""
    for job in jobs:
        for lo in range(0, len(job.rows), ROWS_PER_CHUNK):
            rows = torch.from_numpy(job.rows[lo : lo + ROWS_PER_CHUNK]).to(hidden.device)
            targets = torch.from_numpy(job.targets[lo : lo + ROWS_PER_CHUNK]).to(hidden.device)
            logits = model.compute_logits(hidden[rows])
            if job.request is None:
                continue
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            own = logprobs.gather(1, targets.unsqueeze(1))
            ranks = (logprobs > own).sum(dim=1) + 1
            ids, lps = targets.unsqueeze(1), own
            if job.k > 0:
                top_lps, top_ids = logprobs.topk(job.k, dim=-1)
                ids, lps = torch.cat([ids, top_ids], dim=1), torch.cat([lps, top_lps], dim=1)
            for row_ids, row_lps, rank in zip(ids.tolist(), lps.tolist(), ranks.tolist()):
                job.request.prompt_logprobs.append((row_ids, row_lps, rank))
