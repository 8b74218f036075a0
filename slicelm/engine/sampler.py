"""Batched sampling on the logits' device (vLLM v1 order of processing).

    logits [B, V] --(raw log_softmax -> logprobs)--> logit bias -> allowed_token_ids mask -> min_tokens mask
      -> penalties
      -> greedy argmax (temperature ~ 0 rows)
      -> / temperature -> min-p -> top-k / top-p (sort based) -> softmax
      -> exponential race: argmax(probs / q), q ~ Exp(1)

Everything works on whole [B, V] tensors. The one per-request loop is the Exp(1) draw of seeded
requests: each seeded request owns a torch.Generator, so its tokens do not depend on which other
requests share the batch.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from slicelm.sampling_params import SamplingParams, SamplingType

_SAMPLING_EPS = 1e-5


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator for one seeded request, on the device the sampler runs on."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _host_to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on ``device`` without a pageable copy: a pageable host-to-device copy would
    wait for all queued GPU work and undo the overlap of scheduling with the running step."""
    t = torch.tensor(data, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _allowed_mask(rows: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[A, V] bool, True where a row's ``allowed_token_ids`` leave a token out."""
    mask = torch.ones(len(rows), vocab_size, dtype=torch.bool)
    for j, ids in enumerate(rows):
        mask[j, [t for t in ids if t < vocab_size]] = False
    return mask.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else mask.to(device)


def _pad(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    data = [list(r) + [pad] * (width - len(r)) for r in rows]
    return _host_to_device(data, torch.int64, device).reshape(len(rows), width)


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [B] float32; 1.0 on greedy rows (their result comes from argmax)
    is_greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    all_random: bool
    top_k: torch.Tensor | None  # [B] int64, V where disabled; None when no row uses top-k
    top_p: torch.Tensor | None  # [B] float32; None when no row uses top-p
    min_p: torch.Tensor | None  # [B] float32; None when no row uses min-p
    generators: dict[int, torch.Generator]  # row -> generator of seeded random rows
    max_num_logprobs: int | None  # None: nobody asked for logprobs
    no_penalties: bool
    prompt_token_ids: torch.Tensor | None  # [B, Lp] int64 padded with vocab_size
    output_token_ids: torch.Tensor | None  # [B, Lo] int64 padded with vocab_size
    presence_penalties: torch.Tensor | None  # [B] float32
    frequency_penalties: torch.Tensor | None  # [B] float32
    repetition_penalties: torch.Tensor | None  # [B] float32
    min_tokens_rows: torch.Tensor | None  # [M] int64 row indices of (row, token) pairs to mask
    min_tokens_cols: torch.Tensor | None  # [M] int64 token ids
    logit_bias_rows: torch.Tensor | None  # [K] int64
    logit_bias_cols: torch.Tensor | None  # [K] int64
    logit_bias_values: torch.Tensor | None  # [K] float32
    allowed_rows: torch.Tensor | None = None  # [A] int64 rows with allowed_token_ids
    disallowed: torch.Tensor | None = None  # [A, V] bool: True where the row may not sample the token
    chosen_rows: torch.Tensor | None = None  # [S] int64 rows with logprob_token_ids
    chosen_ids: torch.Tensor | None = None  # [S, W] int64 their ids, padded with each row's first id
    vocab_size: int = 0
    batch_size: int = 0

    @property
    def plain_greedy(self) -> bool:
        """Every row greedy and nothing that edits or reports logits: the argmax of the raw logits."""
        return (self.all_greedy and self.max_num_logprobs is None and self.no_penalties
                and self.logit_bias_values is None and self.min_tokens_rows is None and self.disallowed is None)

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device,
        eos_token_ids: Collection[int] = frozenset(),
    ) -> SamplingMetadata:
        """Make the small per-batch tensors; rows follow the order of `params`."""
        b = len(params)
        assert b > 0 and len(prompt_token_ids) == len(output_token_ids) == len(generators) == b
        greedy = [p.sampling_type == SamplingType.GREEDY for p in params]
        temperature = [1.0 if g else float(p.temperature) for p, g in zip(params, greedy)]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        use_top_k = any(k < vocab_size for k, g in zip(top_k, greedy) if not g)
        use_top_p = any(p.top_p < 1.0 for p, g in zip(params, greedy) if not g)
        use_min_p = any(p.min_p > _SAMPLING_EPS for p, g in zip(params, greedy) if not g)

        gens: dict[int, torch.Generator] = {}
        for i, (p, g) in enumerate(zip(params, generators)):
            if g is not None and not greedy[i]:
                gens[i] = g
            elif p.sampling_type == SamplingType.RANDOM_SEED and g is None:
                raise ValueError(f"seed: request {i} has seed={p.seed} but no generator was given")

        requested = [p.num_logprobs for p in params if p.num_logprobs is not None]
        max_num_logprobs = min(max(requested), vocab_size) if requested else None
        allowed = [i for i, p in enumerate(params) if p.allowed_token_ids]
        chosen = [i for i, p in enumerate(params) if p.logprob_token_ids]
        chosen_ids = [params[i].logprob_token_ids or [] for i in chosen]
        width = max((len(c) for c in chosen_ids), default=0)

        no_penalties = all(
            p.presence_penalty == 0.0 and p.frequency_penalty == 0.0 and p.repetition_penalty == 1.0
            for p in params
        )
        pen: dict[str, torch.Tensor | None] = dict.fromkeys(
            ("prompt", "output", "presence", "frequency", "repetition")
        )
        if not no_penalties:
            pen["prompt"] = _pad(prompt_token_ids, vocab_size, device)
            pen["output"] = _pad(output_token_ids, vocab_size, device)
            pen["presence"] = _host_to_device([p.presence_penalty for p in params], torch.float32, device)
            pen["frequency"] = _host_to_device([p.frequency_penalty for p in params], torch.float32, device)
            pen["repetition"] = _host_to_device([p.repetition_penalty for p in params], torch.float32, device)

        mt_rows: list[int] = []
        mt_cols: list[int] = []
        eos = set(eos_token_ids)
        for i, (p, out) in enumerate(zip(params, output_token_ids)):
            if len(out) < p.min_tokens:
                ids = sorted(t for t in p.all_stop_token_ids | eos if t < vocab_size)
                mt_rows += [i] * len(ids)
                mt_cols += ids

        lb_rows: list[int] = []
        lb_cols: list[int] = []
        lb_vals: list[float] = []
        for i, p in enumerate(params):
            for tok, val in (p.logit_bias or {}).items():
                if not 0 <= tok < vocab_size:
                    raise ValueError(f"logit_bias: token id {tok} is out of range [0, {vocab_size})")
                lb_rows.append(i)
                lb_cols.append(tok)
                lb_vals.append(val)

        return cls(
            temperature=_host_to_device(temperature, torch.float32, device),
            is_greedy=_host_to_device(greedy, torch.bool, device),
            all_greedy=all(greedy),
            all_random=not any(greedy),
            top_k=_host_to_device(top_k, torch.int64, device) if use_top_k else None,
            top_p=_host_to_device([float(p.top_p) for p in params], torch.float32, device) if use_top_p else None,
            min_p=_host_to_device([float(p.min_p) for p in params], torch.float32, device) if use_min_p else None,
            generators=gens,
            max_num_logprobs=max_num_logprobs,
            no_penalties=no_penalties,
            prompt_token_ids=pen["prompt"],
            output_token_ids=pen["output"],
            presence_penalties=pen["presence"],
            frequency_penalties=pen["frequency"],
            repetition_penalties=pen["repetition"],
            min_tokens_rows=_host_to_device(mt_rows, torch.int64, device) if mt_rows else None,
            min_tokens_cols=_host_to_device(mt_cols, torch.int64, device) if mt_rows else None,
            logit_bias_rows=_host_to_device(lb_rows, torch.int64, device) if lb_rows else None,
            logit_bias_cols=_host_to_device(lb_cols, torch.int64, device) if lb_rows else None,
            logit_bias_values=_host_to_device(lb_vals, torch.float32, device) if lb_rows else None,
            allowed_rows=_host_to_device(allowed, torch.int64, device) if allowed else None,
            disallowed=_allowed_mask([params[i].allowed_token_ids or [] for i in allowed], vocab_size, device)
            if allowed else None,
            chosen_rows=_host_to_device(chosen, torch.int64, device) if chosen else None,
            chosen_ids=_host_to_device([c + [c[0]] * (width - len(c)) for c in chosen_ids], torch.int64, device)
            if chosen else None,
            vocab_size=vocab_size,
            batch_size=b,
        )


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    logprob_token_ids: torch.Tensor | None = None  # [B, k+1] int64: sampled token, then top-k
    logprobs: torch.Tensor | None = None  # [B, k+1] float32, log_softmax of the raw logits
    ranks: torch.Tensor | None = None  # [B] int64, 1-based rank of the sampled token


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, L] ids padded with vocab_size -> [B, V] counts."""
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.int64, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition (HF style, prompt + output tokens), then frequency/presence (OpenAI, output only)."""
    assert meta.prompt_token_ids is not None and meta.output_token_ids is not None
    assert meta.repetition_penalties is not None
    assert meta.frequency_penalties is not None and meta.presence_penalties is not None
    v = logits.shape[1]
    output_counts = _token_counts(meta.output_token_ids, v)
    seen = (_token_counts(meta.prompt_token_ids, v) > 0) | (output_counts > 0)
    rep = meta.repetition_penalties.unsqueeze(1).expand_as(logits)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - meta.frequency_penalties.unsqueeze(1) * output_counts.to(logits.dtype)
    logits = logits - meta.presence_penalties.unsqueeze(1) * (output_counts > 0).to(logits.dtype)
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
    """Sort-based top-k then top-p masks (vLLM's algorithm); k == V / p == 1 leave a row alone."""
    if k is None and p is None:
        return logits
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    if k is not None:
        kth = (logits_sort.shape[1] - k).clamp(min=0).unsqueeze(1)
        threshold = logits_sort.gather(1, kth)
        logits_sort = logits_sort.masked_fill(logits_sort < threshold, float("-inf"))
    if p is not None:
        probs_sort = logits_sort.softmax(dim=-1)
        cum = probs_sort.cumsum(dim=-1)
        mask = cum <= 1 - p.unsqueeze(1)
        mask[:, -1] = False  # always keep the most likely token
        logits_sort = logits_sort.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(1, logits_idx, logits_sort)


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Exponential race: argmax(probs / q), q ~ Exp(1) — equivalent to multinomial sampling."""
    q = torch.empty_like(probs)
    if len(generators) != probs.shape[0]:
        q.exponential_()
    for row, g in generators.items():
        q[row].exponential_(generator=g)
    return probs.div(q.clamp_(min=1e-30)).argmax(dim=-1)


def compute_logprobs(
    raw_logprobs: torch.Tensor, sampled: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sampled = sampled.unsqueeze(1)
    sampled_lp = raw_logprobs.gather(1, sampled)
    ranks = (raw_logprobs >= sampled_lp).sum(dim=-1)
    if k > 0:
        top_lp, top_ids = raw_logprobs.topk(k, dim=-1)
        ids = torch.cat([sampled, top_ids], dim=1)
        lps = torch.cat([sampled_lp, top_lp], dim=1)
    else:
        ids, lps = sampled, sampled_lp
    return ids, lps, ranks


def _put_chosen(out: SamplerOutput, raw_logprobs: torch.Tensor, meta: SamplingMetadata) -> None:
    """Rows with ``logprob_token_ids``: those ids and their logprobs in place of the top-k (after the sampled
    token in column 0; the core keeps ``len(logprob_token_ids)`` columns of such a row)."""
    assert out.logprob_token_ids is not None and out.logprobs is not None
    assert meta.chosen_rows is not None and meta.chosen_ids is not None
    w = meta.chosen_ids.shape[1]
    assert out.logprob_token_ids.shape[1] >= w + 1, "max_num_logprobs counts the chosen ids"
    out.logprob_token_ids[meta.chosen_rows, 1:w + 1] = meta.chosen_ids
    out.logprobs[meta.chosen_rows, 1:w + 1] = raw_logprobs[meta.chosen_rows].gather(1, meta.chosen_ids)


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == meta.batch_size, (logits.shape, meta.batch_size)
        if meta.plain_greedy:  # argmax of the raw logits: no float32 copy (bf16 -> fp32 is exact)
            return SamplerOutput(sampled_token_ids=logits.argmax(dim=-1))
        # A float32 copy: the steps below work in place; leave the caller's tensor alone.
        logits = logits.to(torch.float32, copy=True)
        raw_logprobs = logits.log_softmax(dim=-1) if meta.max_num_logprobs is not None else None

        if meta.logit_bias_values is not None:
            logits.index_put_((meta.logit_bias_rows, meta.logit_bias_cols), meta.logit_bias_values,
                              accumulate=True)
        if meta.disallowed is not None:
            assert meta.allowed_rows is not None
            logits[meta.allowed_rows] = logits[meta.allowed_rows].masked_fill(meta.disallowed, float("-inf"))
        if meta.min_tokens_rows is not None:
            logits.index_put_((meta.min_tokens_rows, meta.min_tokens_cols),
                              torch.full((), float("-inf"), device=logits.device))
        if not meta.no_penalties:
            logits = apply_penalties(logits, meta)

        sampled = self.sample(logits, meta)

        out = SamplerOutput(sampled_token_ids=sampled)
        if raw_logprobs is not None:
            assert meta.max_num_logprobs is not None
            out.logprob_token_ids, out.logprobs, out.ranks = compute_logprobs(
                raw_logprobs, sampled, meta.max_num_logprobs
            )
            if meta.chosen_rows is not None:
                _put_chosen(out, raw_logprobs, meta)
        return out

    @staticmethod
    def sample(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        greedy = None if meta.all_random else logits.argmax(dim=-1)
        if meta.all_greedy:
            assert greedy is not None
            return greedy
        logits = logits.div_(meta.temperature.unsqueeze(1))
        if meta.min_p is not None:
            logits = apply_min_p(logits, meta.min_p)
        logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
        probs = logits.softmax(dim=-1)
        sampled = random_sample(probs, meta.generators)
        if greedy is None:
            return sampled
        return torch.where(meta.is_greedy, greedy, sampled)
