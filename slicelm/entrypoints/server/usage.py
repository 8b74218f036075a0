"""vLLM's ``usage`` blocks: the full one of a response body and the two a stream sends.

vLLM serializes a response with every key, a streamed chunk with only the keys it set (so the usage riding
on each chunk with continuous usage stats has three), and the final usage chunk without null keys (so
``prompt_tokens_details`` appears there only with ``--enable-prompt-tokens-details``).
"""

from __future__ import annotations

from typing import Any


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None,
          details: bool = False) -> dict[str, Any]:
    """A response body's usage (every key); ``prompt_tokens_details`` only with ``--enable-prompt-tokens-details``,
    ``completion_tokens_details`` (reasoning tokens) stays null as vLLM's without a reasoning parser."""
    u: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": None,
                         "completion_tokens_details": None}
    if details:
        u["prompt_tokens_details"] = {"cached_tokens": cached_tokens or 0, "created_cache_tokens": None,
                                      "multimodal_tokens": None}
    return u


def chunk_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The usage on every streamed chunk with continuous usage stats."""
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens}


def final_chunk_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int,
                      details: bool) -> dict[str, Any]:
    """The last streamed chunk's usage: the cached prompt tokens only with ``--enable-prompt-tokens-details``."""
    u: dict[str, Any] = chunk_usage(prompt_tokens, completion_tokens)
    if details:
        u["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return u
