"""Request models of the OpenAI-compatible API (pydantic v2), with vLLM's policies.

As vLLM: unknown fields are ignored with a logged warning (``test_extra_fields_allowed``), any message
role is accepted, and pydantic's lax coercions apply (``"true"`` is a boolean, ``"5"`` an integer).
Fields that would change the output's meaning and that slicelm does not implement (beam search,
multimodal inputs, prompt embeddings …) are refused with a 400 naming them.
``request_id`` must be 1-256 printable ASCII characters (it is echoed in headers and ids).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

logger = logging.getLogger("slicelm.server")
_LAX = ConfigDict(extra="allow", allow_inf_nan=False)
_STRICT = _LAX  # kept for modules that import it
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # int64, as vLLM
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,256}")
# vLLM request fields slicelm cannot honour; present and not null/false/empty -> 400 naming the field
UNSUPPORTED_FIELDS = {
    "use_beam_search": "beam search is not supported",
    "prompt_embeds": "prompt embeddings are not supported",
    "bad_words": "bad_words is not supported yet",
    "logits_processors": "custom logits processors are not supported",
    "lora_request": "LoRA adapters are not supported",
    "mm_processor_kwargs": "multimodal inputs are not supported",
    "multi_modal_data": "multimodal inputs are not supported",
}


# vLLM's text; its parameter is continue_final_message
CONTINUE_AND_GENERATION_PROMPT = ("continue_final_message: Cannot set both `continue_final_message` and "
                                  "`add_generation_prompt` to True.")


def check_request_id(value: str | None) -> str | None:
    if value is not None and not REQUEST_ID.fullmatch(value):
        raise ValueError("request_id: must be 1 to 256 printable ASCII characters without spaces "
                         f"(got {value[:40]!r})")
    return value


class LaxModel(BaseModel):
    """vLLM's request policy: extra fields are logged and ignored, unsupported features refused."""

    model_config = _LAX

    @model_validator(mode="after")
    def _extras(self) -> LaxModel:
        extra = self.model_extra or {}
        for name, value in extra.items():
            if name in UNSUPPORTED_FIELDS and value not in (None, False, [], {}, ""):
                raise ValueError(f"{name}: {UNSUPPORTED_FIELDS[name]}")
        ignored = [k for k in extra if k not in UNSUPPORTED_FIELDS]
        if ignored:
            logger.warning("The following fields were present in the request but ignored: %s", sorted(ignored))
        return self


class StreamOptions(LaxModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    refusal: str | None = None
    reasoning_content: str | None = None


class SamplingFields(LaxModel):
    """Fields shared by chat and completions (OpenAI + vLLM extras)."""

    model: str | None = None  # vLLM: optional (the first served name)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    n: int | None = Field(default=1, ge=1, le=128)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, ge=1e-6, le=1e6)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)
    truncation_side: Literal["left", "right"] | None = None  # which end truncate_prompt_tokens cuts (vLLM: left)
    priority: int | None = 0
    request_id: str | None = None
    return_token_ids: bool | None = False
    return_tokens_as_token_ids: bool | None = None
    prompt_logprobs: int | None = None
    allowed_token_ids: list[int] | None = None  # sample only among these ids
    logprob_token_ids: list[int] | None = None  # logprobs of these ids in place of the top-k (needs logprobs)
    cache_salt: str | None = None
    # structured outputs (vLLM's field, and the older guided_* aliases): see server/structured.py
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None  # legacy: must name the server's backend (structured.py)

    @field_validator("request_id")
    @classmethod
    def _check_id(cls, v: str | None) -> str | None:
        return check_request_id(v)

    @model_validator(mode="after")
    def _check_common(self) -> SamplingFields:
        if isinstance(self.stop, list) and any(not s for s in self.stop):
            raise ValueError("stop: stop strings must be non-empty")
        if isinstance(self.stop, str) and not self.stop:
            raise ValueError("stop: stop strings must be non-empty")
        bad_keys = [k for k in self.logit_bias or {} if not re.fullmatch(r"-?[0-9]{1,12}", k)]
        if bad_keys:  # vLLM's text, every bad key named (values are clamped to [-100, 100] as vLLM's)
            raise ValueError("logit_bias: logit_bias contains key(s) that cannot be converted to integer token IDs: "
                             f"{bad_keys!r}")
        if self.response_format is not None and self.response_format.type not in (
                "text", "json_object", "json_schema", "structural_tag"):
            raise ValueError(f"response_format: type must be 'text', 'json_object', 'json_schema' or "
                             f"'structural_tag', got {self.response_format.type!r}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        if self.prompt_logprobs is not None and self.prompt_logprobs < -1:
            raise ValueError(f"prompt_logprobs: must be >= 0, or -1 for the whole vocabulary; got "
                             f"{self.prompt_logprobs}")
        return self


class ChatFields(SamplingFields):
    """Everything of a chat request but its messages."""

    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=-1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    reasoning_effort: str | None = None
    prediction: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    verbosity: str | None = None
    # vLLM extras
    echo: bool | None = False
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    add_special_tokens: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, str]] | None = None
    kv_transfer_params: dict[str, Any] | None = None  # its prompt_token_ids: a prefill stage's, used verbatim

    @model_validator(mode="after")
    def _check_chat(self) -> ChatFields:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        if self.logprob_token_ids and not self.logprobs:  # vLLM's text
            raise ValueError("logprob_token_ids: when using `logprob_token_ids`, `logprobs` must be set to true.")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError(CONTINUE_AND_GENERATION_PROMPT)
        if self.functions:
            raise ValueError("functions: function calling is not supported yet")
        if self.modalities and any(m != "text" for m in self.modalities):
            raise ValueError("modalities: only 'text' is supported")
        if self.audio is not None:
            raise ValueError("audio: audio output is not supported")
        return self

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatCompletionRequest(ChatFields):
    messages: list[ChatMessage] = Field(min_length=1)


class BatchChatCompletionRequest(ChatFields):
    """``/v1/chat/completions/batch``: several conversations, one choice each (no streaming, ``n`` = 1)."""

    messages: list[list[ChatMessage]] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_batch(self) -> BatchChatCompletionRequest:
        if any(not conv for conv in self.messages):
            raise ValueError("messages: every conversation needs at least one message")
        if self.stream:
            raise ValueError("stream: batch chat completions do not support streaming")
        if (self.n or 1) != 1:  # vLLM's text
            raise ValueError("n: Batch chat completions do not support `n > 1`. Please set `n` to 1.")
        return self

    def conversation(self, i: int) -> ChatCompletionRequest:
        """The single-conversation request of conversation ``i``."""
        return ChatCompletionRequest.model_validate(
            {**self.model_dump(exclude={"messages"}, exclude_unset=True), "messages": self.messages[i]})


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: Prompt | None = None  # required: a missing prompt gets vLLM's text
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=-1)
    echo: bool | None = False
    best_of: int | None = Field(default=None, ge=1, le=128)
    suffix: str | None = None
    # vLLM extras
    add_special_tokens: bool | None = True

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        p = self.prompt
        if p is None or (isinstance(p, str | list) and len(p) == 0):  # vLLM's text
            raise ValueError("prompt: Either prompt or prompt_embeds must be provided and non-empty.")
        if isinstance(p, list) and any(isinstance(x, list | str) and len(x) == 0 for x in p):
            raise ValueError("prompt: Either prompt or prompt_embeds must be provided and non-empty.")
        if self.logprob_token_ids and self.logprobs is None:  # vLLM's text
            raise ValueError("logprob_token_ids: when using `logprob_token_ids`, `logprobs` must be set.")
        if self.suffix:
            raise ValueError("suffix: is not supported")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of: only best_of == n is supported")
        return self


class TokenizeRequest(LaxModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool | None = False
    tools: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _check(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give exactly one of prompt or messages")
        return self


class DetokenizeRequest(LaxModel):
    model: str | None = None
    tokens: list[int]


Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
ROLES: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool", "function")  # others pass through
