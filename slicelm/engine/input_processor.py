"""InputProcessor: turns an API request (prompt + parameters) into validated core sequences, API side.

It tokenizes text prompts, checks token ids, lengths, token types and the task, and fans an ``n > 1``
request out into ``n`` sequences (ids ``<id>#<i>``, seeds ``seed + i``) that share their prompt's
full KV blocks through the prefix cache. Errors raise here, before anything reaches the core.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, NotRequired, TypedDict

from slicelm.engine.core_messages import EngineCoreInfo, EngineCoreRequest
from slicelm.engine.request import EmptyPromptError, PromptTooLongError
from slicelm.pooling_params import PoolingParams
from slicelm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from slicelm.loader.tokenizer import Tokenizer


class TextPrompt(TypedDict):
    """A text prompt, tokenized here (vLLM's ``TextPrompt``)."""

    prompt: str
    token_type_ids: NotRequired[list[int]]


class TokensPrompt(TypedDict):
    """A prompt already tokenized (vLLM's ``TokensPrompt``); ``token_type_ids`` for BERT-style encoders."""

    prompt_token_ids: list[int]
    token_type_ids: NotRequired[list[int]]


PromptType = str | list[int] | TextPrompt | TokensPrompt


@dataclass
class ProcessedRequest:
    """One validated API request and its core sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams | PoolingParams
    arrival_time: float
    sequences: list[EngineCoreRequest]


def child_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}#{index}"


class InputProcessor:
    def __init__(self, info: EngineCoreInfo, tokenizer: Tokenizer | None) -> None:
        self.info = info
        self.model_config = info.model_config
        self.tokenizer = tokenizer
        eos = set(info.eos_token_ids)
        if tokenizer is not None:
            eos |= set(tokenizer.eos_token_ids)
        self.eos_token_ids = sorted(eos)

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams | PoolingParams | None,
                arrival_time: float | None = None, priority: int = 0,
                token_type_ids: list[int] | None = None) -> ProcessedRequest:
        params = params if params is not None else SamplingParams()
        pooling = isinstance(params, PoolingParams)
        mc = self.model_config
        if pooling != mc.is_pooling:
            raise ValueError(
                f"model {mc.model!r} serves task {mc.task!r}; "
                f"{'pooling' if pooling else 'generation'} requests are not supported by it"
            )
        max_len = mc.max_model_len
        truncate = params.truncate_prompt_tokens
        if pooling:
            params.verify(self.info.hidden_size or 1 << 30, max_len)
            allowed = ("score", "classify") if mc.task == "score" else ("embed",)
            if params.task not in allowed:
                raise ValueError(f"task: model {mc.model!r} serves task {mc.task!r}; "
                                 f"pooling task {params.task!r} is not supported by it (use {allowed[0]!r})")
        if isinstance(prompt, dict) and prompt.get("token_type_ids") is not None:
            token_type_ids = list(prompt["token_type_ids"])
        text, ids = self._tokenize(prompt, max_len if truncate == -1 else truncate)
        token_type_ids = self._check_token_types(token_type_ids, ids, truncate)
        if not ids:
            raise EmptyPromptError("prompt: the prompt is empty")
        limit = max_len if pooling else max_len - 1
        if len(ids) > limit:
            raise PromptTooLongError(
                f"prompt: {len(ids)} tokens do not fit in max_model_len={max_len}"
                + ("" if pooling else " with at least one generated token")
            )
        arrival_time = arrival_time if arrival_time is not None else time.time()
        n = 1 if pooling else params.n
        seqs = [
            EngineCoreRequest(
                child_id(request_id, i, n), ids,
                sampling_params=None if pooling else params,
                pooling_params=params if pooling else None,
                eos_token_ids=self.eos_token_ids, arrival_time=arrival_time, priority=priority,
                token_type_ids=token_type_ids,
                seed=None if pooling or params.seed is None else params.seed + i,
            )
            for i in range(n)
        ]
        return ProcessedRequest(request_id, text, ids, params, arrival_time, seqs)

    def _tokenize(self, prompt: PromptType, truncate: int | None) -> tuple[str | None, list[int]]:
        text: str | None = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                return self._tokenize(prompt["prompt"], truncate)
            else:
                raise ValueError("prompt dict needs 'prompt' or 'prompt_token_ids'")
        elif isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text prompts need a tokenizer (skip_tokenizer_init=True was set)")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            ids = prompt
        if not isinstance(ids, list | tuple) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt_token_ids must be a list of integers")
        vocab = self.info.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt_token_ids: every token id must be in [0, {vocab})")
        ids = list(ids)
        if truncate is not None:
            ids = ids[-truncate:]
        return text, ids

    def _check_token_types(self, token_type_ids: list[int] | None, ids: list[int],
                           truncate: int | None) -> list[int] | None:
        if token_type_ids is None:
            return None
        if truncate is not None:
            token_type_ids = token_type_ids[-len(ids):]
        if len(token_type_ids) != len(ids):
            raise ValueError("token_type_ids must be as long as prompt_token_ids")
        num_types = int(self.model_config.hf_config.get("type_vocab_size") or 2)
        if any(not isinstance(t, int) or not 0 <= t < num_types for t in token_type_ids):
            raise ValueError(f"token_type_ids: every id must be in [0, {num_types})")
        return list(token_type_ids)
