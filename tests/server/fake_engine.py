"""A tiny stand-in for ``LLMEngine`` (same interface) for fast tests of AsyncLLM and the server's paths.

Tokens are bytes + 3 (0 = eos, 1 = bos, 2 = pad). Each step every request gets one token: the next
letter of the alphabet after its last token, so outputs are deterministic and easy to check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from slicelm.engine.request import (
    CompletionOutput,
    EmptyPromptError,
    Logprob,
    PromptTooLongError,
    RequestMetrics,
    RequestOutput,
)
from slicelm.engine.stats import EngineStats
from slicelm.sampling_params import SamplingParams


class FakeTokenizer:
    eos_token_id = 0
    bos_token_id = 1
    eos_token_ids = frozenset({0})
    vocab_size = 259

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [b + 3 for b in text.encode()]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        special = {0: "<eos>", 1: "<bos>", 2: "<pad>"}
        out = bytearray()
        for i in ids:
            if i < 3:
                if not skip_special_tokens:
                    out += special[i].encode()
            else:
                out.append(i - 3)
        return out.decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.decode([i], skip_special_tokens=False) for i in ids]

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, chat_template: str | None = None,
                            tools: Any = None, **kwargs: Any) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclass
class _Req:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    outs: list[list[int]] = field(default_factory=list)
    finished: list[str | None] = field(default_factory=list)


class FakeEngine:
    def __init__(self, max_model_len: int = 128, max_num_seqs: int = 4, step_delay: float = 0.01,
                 num_blocks: int = 64) -> None:
        self.tokenizer = FakeTokenizer()
        self.model_config = SimpleNamespace(model="fake", served_model_names=["fake-model"],
                                            max_model_len=max_model_len, task="generate", architecture="Fake")
        self.cache_config = SimpleNamespace(block_size=16, num_blocks=num_blocks, enable_prefix_caching=True)
        self.scheduler_config = SimpleNamespace(max_num_seqs=max_num_seqs)
        self.step_delay = step_delay
        self.fail_on_step = False
        self.reqs: dict[str, _Req] = {}
        self.order: list[str] = []
        self.stats = EngineStats()
        self.aborted: list[str] = []

    def add_request(self, request_id: str, prompt: Any, params: Any, arrival_time: float | None = None,
                    priority: int = 0) -> None:
        if request_id in self.reqs:
            raise ValueError(f"request_id {request_id!r} is already in use")
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else (
            self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt))
        if not ids:
            raise EmptyPromptError("prompt: the prompt is empty")
        if len(ids) >= self.model_config.max_model_len:
            raise PromptTooLongError(f"prompt: {len(ids)} tokens do not fit in max_model_len")
        n = params.n
        self.reqs[request_id] = _Req(request_id, list(ids), params, RequestMetrics(arrival_time or time.time()),
                                     [[] for _ in range(n)], [None] * n)
        self.order.append(request_id)

    def abort_request(self, request_ids: Any) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for rid in ids:
            if self.reqs.pop(rid, None) is not None:
                self.order.remove(rid)
                self.aborted.append(rid)

    def has_unfinished_requests(self) -> bool:
        return bool(self.reqs)

    def get_num_unfinished_requests(self) -> int:
        return len(self.reqs)

    def _running(self) -> list[str]:
        return self.order[: self.scheduler_config.max_num_seqs]

    def step(self) -> list[RequestOutput]:
        if self.fail_on_step:
            raise RuntimeError("fake engine failure")
        time.sleep(self.step_delay)
        now = time.time()
        outputs = []
        for rid in list(self._running()):
            r = self.reqs[rid]
            r.metrics.first_scheduled_time = r.metrics.first_scheduled_time or now
            for i, toks in enumerate(r.outs):
                if r.finished[i]:
                    continue
                last = toks[-1] if toks else r.prompt_ids[-1]
                toks.append(3 + ord("a") + ((last - 3 - ord("a") + 1 + i) % 26))
                self.stats.num_generation_tokens += 1
                if len(toks) >= (r.params.max_tokens or 16):
                    r.finished[i] = "length"
            r.metrics.first_token_time = r.metrics.first_token_time or now
            r.metrics.last_token_time = now
            done = all(r.finished)
            outs = [CompletionOutput(i, self.tokenizer.decode(t), list(t),
                                     logprobs=[{x: Logprob(-0.5, 1)} for x in t] if r.params.logprobs is not None
                                     else None, finish_reason=r.finished[i]) for i, t in enumerate(r.outs)]
            outputs.append(RequestOutput(rid, None, r.prompt_ids, outs, done, r.metrics))
            if done:
                del self.reqs[rid]
                self.order.remove(rid)
        return outputs

    def get_stats(self) -> EngineStats:
        running = len(self._running())
        return EngineStats(num_running=running, num_waiting=len(self.order) - running,
                           kv_cache_usage=min(1.0, running / self.cache_config.num_blocks),
                           num_generation_tokens=self.stats.num_generation_tokens)
