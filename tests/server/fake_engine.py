"""Fakes for fast tests of the server's paths (no model weights).

``FakeEngineCore`` stands in for ``EngineCore`` (same interface: sequences in, per-step deltas out); the
real ``AsyncLLM`` runs it in a thread (``make_fake_engine``), so admission, aborts, stop strings,
detokenization and death handling are the real ones. ``EchoEngineClient`` implements ``EngineClient``
directly, without ``AsyncLLM``, to show the server depends on nothing more than that protocol.

Tokens are bytes + 3 (0 = eos, 1 = bos, 2 = pad). Each step every running sequence gets one token: the
next letter of the alphabet after its last token (shifted by the sequence's index for ``n > 1``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as HFTokenizer

from slicelm.config import CacheConfig
from slicelm.engine.async_llm import AsyncLLM
from slicelm.engine.core_messages import EngineCoreInfo, EngineCoreOutput, EngineCoreRequest
from slicelm.engine.request import CompletionOutput, RequestOutput
from slicelm.engine.request_stream import RequestStream
from slicelm.engine.stats import EngineStats


def _byte_tokenizer() -> HFTokenizer:
    vocab = {"<eos>": 0, "<bos>": 1, "<pad>": 2, **{f"<0x{b:02X}>": b + 3 for b in range(256)}}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<eos>", "<bos>", "<pad>")])
    return tok


class FakeTokenizer:
    eos_token_id = 0
    bos_token_id = 1
    eos_token_ids = frozenset({0})
    vocab_size = 259
    chat_template = "<role>content, one line per message"  # what apply_chat_template renders

    def __init__(self) -> None:
        self.hf = _byte_tokenizer()  # what the detokenizer streams through

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [b + 3 for b in text.encode()]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.decode([i], skip_special_tokens=False) for i in ids]

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, chat_template: str | None = None,
                            tools: Any = None, **kwargs: Any) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclass
class _Seq:
    req: EngineCoreRequest
    index: int
    last: int
    num_out: int = 0
    scheduled: float | None = None


def _next_letter(last: int, index: int) -> int:
    return 3 + ord("a") + ((last - 3 - ord("a") + 1 + index) % 26)


class FakeEngineCore:
    """The ``EngineCore`` interface with a deterministic 'model' (see the module docstring)."""

    def __init__(self, max_model_len: int = 128, max_num_seqs: int = 4, step_delay: float = 0.01,
                 num_blocks: int = 64) -> None:
        self.model_config = SimpleNamespace(model="fake", served_model_names=["fake-model"], hf_config={},
                                            max_model_len=max_model_len, task="generate", architecture="Fake",
                                            is_pooling=False)
        self.cache_config = CacheConfig(block_size=16, num_blocks=num_blocks, enable_prefix_caching=True)
        self.scheduler_config = SimpleNamespace(max_num_seqs=max_num_seqs)
        self.step_delay = step_delay
        self.fail_on_step = False
        self.reqs: dict[str, _Seq] = {}
        self.aborted: list[str] = []
        self.num_generation_tokens = 0
        self.resets = 0

    def info(self) -> EngineCoreInfo:
        return EngineCoreInfo(self.model_config, self.cache_config, self.scheduler_config,  # type: ignore[arg-type]
                              FakeTokenizer.vocab_size, 0, [0], "cpu", False)

    def add_request(self, req: EngineCoreRequest) -> None:
        if req.request_id in self.reqs:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        index = int(req.request_id.rsplit("#", 1)[1]) if "#" in req.request_id else 0
        self.reqs[req.request_id] = _Seq(req, index, req.prompt_token_ids[-1])

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            if self.reqs.pop(rid, None) is not None:
                self.aborted.append(rid)

    def has_unfinished_requests(self) -> bool:
        return bool(self.reqs)

    def reset_after_warmup(self) -> None:
        assert not self.reqs, "reset while sequences run"
        self.resets += 1

    def step(self) -> list[EngineCoreOutput]:
        if self.fail_on_step:
            raise RuntimeError("fake engine failure")
        time.sleep(self.step_delay)
        now = time.time()
        outputs = []
        for rid in list(self.reqs)[: self.scheduler_config.max_num_seqs]:
            s = self.reqs[rid]
            params = s.req.sampling_params
            assert params is not None
            token = _next_letter(s.last, s.index)
            s.last, s.num_out = token, s.num_out + 1
            self.num_generation_tokens += not s.req.warmup  # as the real core: a server's warm-up counts nowhere
            out = EngineCoreOutput(rid, [token])
            if s.scheduled is None:
                s.scheduled = out.first_scheduled_time = now
            if params.logprobs is not None:
                out.new_logprobs = [([token], [-0.5], 1)]
            if s.num_out >= (params.max_tokens or 16):
                out.finish_reason = "length"
                del self.reqs[rid]
            outputs.append(out)
        return outputs

    def get_stats(self) -> EngineStats:
        running = min(len(self.reqs), self.scheduler_config.max_num_seqs)
        return EngineStats(num_running=running, num_waiting=len(self.reqs) - running,
                           kv_cache_usage=min(1.0, running / self.cache_config.num_blocks),
                           num_generation_tokens=self.num_generation_tokens)


def make_fake_engine(max_waiting_requests: int | None = None, **kw: Any) -> tuple[AsyncLLM, FakeEngineCore]:
    """The real ``AsyncLLM`` over a ``FakeEngineCore`` run in a thread."""
    core = FakeEngineCore(**kw)
    return AsyncLLM.from_core(core, FakeTokenizer(), max_waiting_requests=max_waiting_requests), core


class EchoEngineClient:
    """An ``EngineClient`` without ``AsyncLLM``: echoes the prompt back, one token per output."""

    def __init__(self, max_model_len: int = 128) -> None:
        self.tokenizer = FakeTokenizer()
        self.model_config = SimpleNamespace(model="echo", served_model_names=["echo-model"], hf_config={},
                                            max_model_len=max_model_len, task="generate", is_pooling=False)
        self.cache_config = CacheConfig(block_size=16, num_blocks=1, enable_prefix_caching=False)
        self.max_num_seqs = 4
        self.info = EngineCoreInfo(self.model_config, self.cache_config,  # type: ignore[arg-type]
                                   SimpleNamespace(max_num_seqs=self.max_num_seqs),  # type: ignore[arg-type]
                                   FakeTokenizer.vocab_size, 0, [0], "cpu", False)
        self._active = 0
        self._listeners: list[Any] = []
        self.is_running = True
        self.errored = False
        self.dead_error = None

    @property
    def num_active_requests(self) -> int:
        return self._active

    def add_stat_listener(self, listener: Any) -> None:
        self._listeners.append(listener)

    async def add_request(self, request_id: str, prompt: Any, params: Any, arrival_time: float | None = None,
                          priority: int = 0) -> RequestStream:
        ids = list(prompt["prompt_token_ids"])[-(params.max_tokens or 16):]
        stream = RequestStream(request_id, 1, asyncio.get_running_loop())
        self._active += 1
        for k, t in enumerate(ids):
            done = k == len(ids) - 1
            stream.put(RequestOutput(request_id, None, ids, [
                CompletionOutput(0, self.tokenizer.decode([t]), [t], finish_reason="length" if done else None)],
                done))
        return stream

    async def _iterate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[Any]:
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for out in stream:
                yield out
        finally:
            self.release(stream)

    def generate(self, prompt: Any, params: Any, request_id: str, priority: int = 0,
                 arrival_time: float | None = None) -> AsyncIterator[Any]:
        return self._iterate(prompt, params, request_id)

    def encode(self, prompt: Any, params: Any, request_id: str, priority: int = 0,
               arrival_time: float | None = None) -> AsyncIterator[Any]:
        raise NotImplementedError("the echo client serves text generation only")

    def release(self, stream: Any) -> None:
        if not stream.released:
            stream.released = True
            self._active -= 1

    def abort(self, request_ids: Any) -> None:
        pass

    def abort_all(self) -> None:
        pass

    async def wait_idle(self, timeout: float) -> bool:
        return self._active == 0

    async def sleep(self, level: int = 1, mode: str = "abort") -> None:
        raise ValueError("this engine has no sleep mode")

    async def wake_up(self, tags: list[str] | None = None) -> float:
        raise ValueError("this engine has no sleep mode")

    async def is_sleeping(self) -> bool:
        return False

    async def end_warmup(self, timeout: float = 10.0) -> bool:
        return True  # no prefix cache to empty

    def shutdown(self, timeout: float = 10.0) -> None:
        self.is_running = False


__all__ = ["EchoEngineClient", "FakeEngineCore", "FakeTokenizer", "make_fake_engine"]
