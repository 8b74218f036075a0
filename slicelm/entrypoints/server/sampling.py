"""Request fields -> ``SamplingParams``; engine logprobs -> OpenAI's chat and legacy-completion shapes."""

from __future__ import annotations

from typing import Any

from slicelm.engine.request import Logprob
from slicelm.entrypoints.server.errors import bad_request
from slicelm.entrypoints.server.protocol import SamplingFields
from slicelm.entrypoints.server.state import ServerState
from slicelm.sampling_params import SamplingParams


def build_sampling_params(state: ServerState, req: SamplingFields, max_tokens: int,
                          logprobs: int | None) -> SamplingParams:
    """Validated ``SamplingParams`` (``SamplingParamsError`` names the field -> 400)."""
    vocab = state.tokenizer.vocab_size if state.engine.tokenizer is not None else None
    bias: dict[int, float] | None = None
    if req.logit_bias:
        bias = {int(k): float(v) for k, v in req.logit_bias.items()}
        if vocab is not None:
            bad = [t for t in bias if not 0 <= t < vocab]
            if bad:
                raise bad_request(f"logit_bias: token id {bad[0]} is out of range [0, {vocab})", param="logit_bias")
    if vocab is not None and req.stop_token_ids:
        bad = [t for t in req.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"stop_token_ids: token id {bad[0]} is out of range [0, {vocab})",
                              param="stop_token_ids")
    return SamplingParams.from_optional(
        n=req.n, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, temperature=req.temperature, top_p=req.top_p,
        top_k=req.top_k, min_p=req.min_p, seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos, max_tokens=max_tokens, min_tokens=req.min_tokens, logprobs=logprobs,
        include_stop_str_in_output=req.include_stop_str_in_output, skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens, logit_bias=bias,
    )


def _ranked(entry: dict[int, Logprob], token_id: int, top_n: int) -> list[tuple[int, Logprob]]:
    """The ``top_n`` alternatives of one position, best first (the sampled token only if it ranks there)."""
    items = sorted(entry.items(), key=lambda kv: (-kv[1].logprob, kv[0]))
    if top_n <= 0:
        return []
    return items[:top_n]


def _text(state: ServerState, token_id: int, lp: Logprob | None) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return state.token_text(token_id)


def chat_logprobs(state: ServerState, token_ids: list[int], logprobs: list[dict[int, Logprob]] | None,
                  top_n: int) -> dict[str, Any]:
    content = []
    for tid, entry in zip(token_ids, logprobs or []):
        own = entry.get(tid)
        token = _text(state, tid, own)
        content.append({
            "token": token,
            "logprob": max(own.logprob, -9999.0) if own is not None else -9999.0,
            "bytes": list(token.encode("utf-8")),
            "top_logprobs": [
                {"token": (t := _text(state, i, lp)), "logprob": max(lp.logprob, -9999.0),
                 "bytes": list(t.encode("utf-8"))}
                for i, lp in _ranked(entry, tid, top_n)
            ],
        })
    return {"content": content}


def completion_logprobs(state: ServerState, token_ids: list[int], logprobs: list[dict[int, Logprob]] | None,
                        top_n: int, text_offset: int, echo_ids: list[int] | None = None) -> dict[str, Any]:
    """OpenAI's legacy shape; echoed prompt tokens carry ``None`` log-probabilities."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for tid in echo_ids or []:
        t = state.token_text(tid)
        tokens.append(t)
        token_logprobs.append(None)
        top.append(None)
        offsets.append(text_offset)
        text_offset += len(t)
    for tid, entry in zip(token_ids, logprobs or []):
        own = entry.get(tid)
        t = _text(state, tid, own)
        tokens.append(t)
        token_logprobs.append(max(own.logprob, -9999.0) if own is not None else None)
        top.append({_text(state, i, lp): max(lp.logprob, -9999.0) for i, lp in _ranked(entry, tid, top_n)})
        offsets.append(text_offset)
        text_offset += len(t)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    u: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        u["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return u
