"""The multi-model SLO workload (benchmarks.md, "Multi-model SLO trace"): models, arrivals, SLO.

Models: six real shapes from 0.6B to 8B parameters (random bf16 weights), listed in popularity order.
Arrivals, for a total rate R (requests/s) and a window of W seconds, seeded so that every policy sees
the same requests at the same rate:

- popularity: Zipf(s=1) over the models in ``MODELS`` order (weights 1/k, normalised): the 8B shape gets
  41% of the requests, the 1.5B shape 7%;
- bursts: each model's arrivals are a two-state Markov-modulated Poisson process: *calm* (0.5× its mean
  rate) and *burst* (3× its mean rate), dwell times exponential with means 4 s (calm) and 1 s (burst),
  so a model's long-run mean stays its share of R (0.5·0.8 + 3·0.2 = 1); the first state is drawn from
  that stationary mix (burst with probability 0.2);
- requests: prompt length uniform in [PROMPT_MIN, PROMPT_MAX] tokens of random ids, output length uniform
  in [OUT_MIN, OUT_MAX] tokens, greedy, ``ignore_eos`` (exactly that many tokens).

SLO of a request: TTFT <= 5 × the same model's TTFT alone on an idle GPU at that prompt length (linear
between the two measured lengths) and TPOT <= 5 × its TPOT alone; a request that fails or does not finish
misses it. A policy sustains rate R when 99% of the window's requests meet their SLO.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from common import LLAMA_3_1_8B, LLAMA_3_2_3B, QWEN2_5_1_5B, QWEN2_5_7B, QWEN3_0_6B, QWEN3_4B

# Popularity order (Zipf rank 1 first): sizes mixed along the ranks.
MODELS = {"llama-3.1-8b": LLAMA_3_1_8B, "llama-3.2-3b": LLAMA_3_2_3B,
          "qwen2.5-7b": {**QWEN2_5_7B, "torch_dtype": "bfloat16"},  # common's shape, served in bf16 here
          "qwen3-0.6b": QWEN3_0_6B, "qwen3-4b": QWEN3_4B, "qwen2.5-1.5b": QWEN2_5_1_5B}


def tiny(hidden: int, layers: int, family: str = "llama") -> dict:
    """A small random shape of the same families, for the CPU smoke run."""
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    return {"architectures": [arch], "model_type": family, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": hidden // 4,
            "intermediate_size": 2 * hidden, "vocab_size": 512, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 2048, "torch_dtype": "float32"}


SMOKE_MODELS = {"tiny-8": tiny(192, 6), "tiny-3": tiny(128, 4), "tiny-7": tiny(160, 6, "qwen2"),
                "tiny-0.6": tiny(64, 2, "qwen3"), "tiny-4": tiny(128, 5, "qwen3"), "tiny-1.5": tiny(96, 3, "qwen2")}


@dataclass(frozen=True)
class Lengths:
    prompt_min: int = 256
    prompt_max: int = 2048
    out_min: int = 64
    out_max: int = 256


@dataclass(frozen=True)
class Arrival:
    t: float  # seconds after the window starts
    model: str
    prompt: list[int]
    max_tokens: int


CALM, BURST = 0.5, 3.0  # rate multipliers
CALM_S, BURST_S = 4.0, 1.0  # mean dwell times


def popularity(models: list[str]) -> dict[str, float]:
    w = [1.0 / (k + 1) for k in range(len(models))]
    return {m: x / sum(w) for m, x in zip(models, w)}


def make_trace(models: list[str], rate: float, window: float, lengths: Lengths, vocab: int,
               seed: int = 0) -> list[Arrival]:
    """Arrivals of every model in ``[0, window)`` (see the module docstring), sorted by time."""
    out: list[Arrival] = []
    for i, (model, share) in enumerate(popularity(models).items()):
        rng = random.Random(seed * 1000 + i)
        burst = rng.random() < BURST_S / (BURST_S + CALM_S)  # the stationary state: no warm-up bias
        t, switch = 0.0, rng.expovariate(1 / (BURST_S if burst else CALM_S))
        while True:
            nxt = t + rng.expovariate(share * rate * (BURST if burst else CALM))
            if nxt >= switch:  # the state changes first; exponential gaps let the draw restart there
                t, burst = switch, not burst
                switch = t + rng.expovariate(1 / (BURST_S if burst else CALM_S))
                continue
            t = nxt
            if t >= window:
                break
            n = rng.randint(lengths.prompt_min, lengths.prompt_max)
            out.append(Arrival(t, model, [rng.randrange(vocab) for _ in range(n)],
                               rng.randint(lengths.out_min, lengths.out_max)))
    return sorted(out, key=lambda a: a.t)


@dataclass(frozen=True)
class Baseline:
    """A model alone on an idle GPU: TTFT at two prompt lengths, TPOT."""

    short_len: int
    ttft_short: float
    long_len: int
    ttft_long: float
    tpot: float

    def ttft(self, prompt_len: int) -> float:
        f = (prompt_len - self.short_len) / max(1, self.long_len - self.short_len)
        return self.ttft_short + max(0.0, min(1.0, f)) * (self.ttft_long - self.ttft_short)


SLO_FACTOR = 5.0


def slo_misses(ok: bool, ttft: float | None, tpot: float | None, prompt_len: int, base: Baseline) -> list[str]:
    """Why a request missed its SLO: ``["error"]`` (failed or cut before its first token), or any of ``"ttft"``,
    ``"tpot"``; empty when it met it."""
    if not ok or ttft is None:
        return ["error"]
    return [name for name, late in (("ttft", ttft > SLO_FACTOR * base.ttft(prompt_len)),
                                    ("tpot", tpot is not None and tpot > SLO_FACTOR * base.tpot)) if late]
