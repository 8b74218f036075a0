"""Request models of the pooling endpoints (pydantic v2): embeddings (OpenAI), score (vLLM), rerank (Jina / Cohere).

Same policy as ``protocol.py`` (vLLM's): unknown fields are logged and ignored, lax coercions.
vLLM extras accepted on every endpoint: ``truncate_prompt_tokens`` (>= 1, or -1 for the model's
maximum), ``priority``, ``request_id``, ``add_special_tokens``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slicelm.entrypoints.server.protocol import (
    CONTINUE_AND_GENERATION_PROMPT,
    ChatMessage,
    LaxModel,
    check_request_id,
)

MAX_INPUTS = 2048  # OpenAI's limit on embedding inputs per request; also the documents / pairs limit here


class PoolingFields(LaxModel):
    model: str | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None
    add_special_tokens: bool | None = True
    priority: int | None = 0
    request_id: str | None = None
    padding: Literal["max_length", "do_not_pad"] | None = None  # vLLM: "max_length" pads to the model's length
    truncation_side: Literal["left", "right"] | None = None  # with truncate_prompt_tokens; None: text on the right

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _check_truncate(cls, v: int | None) -> int | None:
        if v is not None and v < 1 and v != -1:
            raise ValueError(f"truncate_prompt_tokens: must be >= 1, or -1 for the model's maximum; got {v}")
        return v

    @field_validator("request_id")
    @classmethod
    def _check_id(cls, v: str | None) -> str | None:
        return check_request_id(v)


def _check_count(name: str, n: int) -> None:
    if n == 0:
        raise ValueError(f"{name}: must not be empty")
    if n > MAX_INPUTS:
        raise ValueError(f"{name}: at most {MAX_INPUTS} items per request, got {n}")


class EmbeddingRequest(PoolingFields):
    """OpenAI's ``input``, or vLLM's chat-style ``messages`` (rendered with the chat template; then
    ``add_special_tokens`` defaults to false, as vLLM)."""

    input: str | list[str] | list[int] | list[list[int]] | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool | None = False
    continue_final_message: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    encoding_format: Literal["float", "base64", "bytes", "bytes_only"] = "float"
    dimensions: int | None = None
    normalize: bool | None = None  # vLLM extra: None = the model's default
    use_activation: bool | None = None  # vLLM: for embeddings, the same as normalize
    embed_dtype: Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"] = "float32"
    endianness: Literal["native", "big", "little"] = "native"

    @model_validator(mode="after")
    def _check(self) -> EmbeddingRequest:
        if self.dimensions is not None and self.dimensions < 1:
            raise ValueError(f"dimensions: must be >= 1, got {self.dimensions}")
        if (self.input is None) == (self.messages is None):
            raise ValueError("input: give exactly one of input or messages")
        if self.messages is not None:
            _check_count("messages", len(self.messages))
            if self.continue_final_message and self.add_generation_prompt:
                raise ValueError(CONTINUE_AND_GENERATION_PROMPT)
            if "add_special_tokens" not in self.model_fields_set:
                self.add_special_tokens = False
            return self
        items = self.inputs()
        _check_count("input", len(items))
        for i, item in enumerate(items):
            if len(item) == 0:
                what = "an empty string" if isinstance(item, str) else "an empty list of token ids"
                raise ValueError(f"input[{i}]: {what} cannot be embedded")
        return self

    def inputs(self) -> list[str | list[int]]:
        """One entry per embedding: a string or a list of token ids."""
        x = self.input
        if x is None:
            return []
        if isinstance(x, str):
            return [x]
        if x and isinstance(x[0], int):
            return [list(x)]  # type: ignore[arg-type]
        return list(x)  # type: ignore[arg-type]


class PoolingRequest(EmbeddingRequest):
    """vLLM's ``/pooling``: an embedding request with the pooling ``task`` (default: the model's)."""

    task: str | None = None


class ScoreRequest(PoolingFields):
    """vLLM's ``/score``: left vs right texts as 1:1, 1:N or N:N. The sides are named ``queries`` +
    ``documents`` (or ``items``), or ``data_1`` + ``data_2``, or ``text_1`` + ``text_2``."""

    text_1: str | list[str] | None = None
    text_2: str | list[str] | None = None
    use_activation: bool | None = None  # cross-encoders: None/True = the configured activation

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for left, right in (("queries", "documents"), ("queries", "items"), ("data_1", "data_2")):
            if left in data and right in data and "text_1" not in data:
                data = dict(data)
                data["text_1"], data["text_2"] = data.pop(left), data.pop(right)
                break
        if "text_1" not in data or "text_2" not in data:
            raise ValueError("text_1: give the two sides as queries + documents, queries + items, data_1 + data_2 "
                             "or text_1 + text_2")
        return data

    @model_validator(mode="after")
    def _check(self) -> ScoreRequest:
        t1, t2 = self.lists()
        _check_count("text_1", len(t1))
        _check_count("text_2", len(t2))
        if len(t1) > 1 and len(t1) != len(t2):
            raise ValueError(f"text_1: {len(t1)} texts cannot be paired with {len(t2)} texts of text_2 "
                             "(give one text_1, or as many as text_2)")
        return self

    def lists(self) -> tuple[list[str], list[str]]:
        assert self.text_1 is not None and self.text_2 is not None
        t1 = [self.text_1] if isinstance(self.text_1, str) else list(self.text_1)
        t2 = [self.text_2] if isinstance(self.text_2, str) else list(self.text_2)
        return t1, t2


class RerankDocument(BaseModel):
    """Cohere v1 / Jina document object; only ``text`` is ranked (other fields are kept out of the result)."""

    model_config = ConfigDict(extra="allow")
    text: str


class RerankRequest(PoolingFields):
    """Jina / Cohere rerank: ``query`` against ``documents``; ``top_n`` 0 or unset: all (as vLLM);
    ``max_tokens_per_doc`` truncates each document."""

    query: str
    documents: list[str] | list[RerankDocument]
    top_n: int | None = Field(default=None)
    return_documents: bool | None = None  # default depends on the route (Cohere v2: false; Jina / vLLM: true)
    use_activation: bool | None = None
    max_tokens_per_doc: int | None = None

    @model_validator(mode="after")
    def _check(self) -> RerankRequest:
        _check_count("documents", len(self.documents))
        if self.top_n is not None and self.top_n < 0:
            raise ValueError(f"top_n: must be >= 0 (0: all documents), got {self.top_n}")
        if self.max_tokens_per_doc is not None and self.max_tokens_per_doc < 0:  # vLLM's text; 0: no truncation
            raise ValueError("max_tokens_per_doc: max_tokens_per_doc must be a non-negative integer")
        return self

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]
