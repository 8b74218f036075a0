"""Request fields -> ``SamplingParams``; engine logprobs -> OpenAI's chat and legacy-completion shapes."""

from __future__ import annotations

from typing import Any

from slicelm.engine.request import Logprob
from slicelm.entrypoints.server.errors import bad_request
from slicelm.entrypoints.server.protocol import SamplingFields
from slicelm.entrypoints.server.state import ServerState
from slicelm.sampling_params import SamplingParams


def resolve_num_logprobs(state: ServerState, value: int | None, param: str) -> int | None:
    """-1 means the whole vocabulary; the result must not exceed ``--max-logprobs``."""
    if value is None:
        return None
    vocab = state.tokenizer.vocab_size if state.engine.tokenizer is not None else None
    num = vocab if value == -1 and vocab is not None else value
    if num < 0:
        raise bad_request(f"{param}: must be >= 0, or -1 for the whole vocabulary; got {value}", param=param)
    limit = state.options.max_logprobs
    if limit != -1 and num > limit:
        raise bad_request(f"{param}: requested {num} logprobs, which is greater than max allowed: {limit} "
                          "(--max-logprobs)", param=param)
    return num


def shown_logprobs(state: ServerState, req: SamplingFields, value: int | None, param: str) -> int | None:
    """How many candidates each position shows: the request's count (checked by ``resolve_num_logprobs``),
    or all of them (the sampled token and every id) with ``logprob_token_ids``, as vLLM."""
    num = resolve_num_logprobs(state, value, param)
    return len(req.logprob_token_ids) + 1 if req.logprob_token_ids else num


def resolve_prompt_logprobs(state: ServerState, req: SamplingFields) -> int | None:
    """The request's ``prompt_logprobs`` count (-1: vocabulary), capped by ``--max-logprobs``; not with
    ``stream`` (vLLM refuses it there too)."""
    if req.prompt_logprobs is None:
        return None
    if req.stream:
        raise bad_request("prompt_logprobs: `prompt_logprobs` are not available when `stream=True`.",
                          param="prompt_logprobs")
    return resolve_num_logprobs(state, req.prompt_logprobs, "prompt_logprobs")


def prompt_logprobs_json(state: ServerState, entries: list[dict[int, Logprob] | None] | None,
                         as_ids: bool = False) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's ``prompt_logprobs`` field: per prompt token None (the first) or {id: {logprob, rank,
    decoded_token}}, -inf clamped to -9999."""
    if entries is None:
        return None
    return [None if e is None else {
        str(tid): {"logprob": max(lp.logprob, -9999.0), "rank": lp.rank,
                   "decoded_token": token_label(state, tid, lp, as_ids)}
        for tid, lp in e.items()} for e in entries]


def build_sampling_params(state: ServerState, req: SamplingFields, max_tokens: int,
                          logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
    """Validated ``SamplingParams`` (``SamplingParamsError`` names the field -> 400). ``prompt_logprobs``
    is the already resolved count (``resolve_prompt_logprobs``); ``logprobs`` is dropped for
    ``logprob_token_ids`` (those ids take the top-k's place, as vLLM)."""
    if req.logprob_token_ids:
        logprobs = None
    vocab = state.tokenizer.vocab_size if state.engine.tokenizer is not None else None
    bias: dict[int, float] | None = None
    if req.logit_bias:
        bias = {int(k): min(100.0, max(-100.0, float(v))) for k, v in req.logit_bias.items()}  # vLLM clamps
        if vocab is not None:
            bad = [t for t in bias if not 0 <= t < vocab]
            if bad:
                raise bad_request(f"logit_bias: token_id(s) {bad} in logit_bias contain out-of-vocab token ids. "
                                  f"Vocabulary size: {vocab}", param="logit_bias")
    if vocab is not None and req.stop_token_ids:
        bad = [t for t in req.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"stop_token_ids: token id {bad[0]} is out of range [0, {vocab})",
                              param="stop_token_ids")
    _check_token_lists(req, vocab)
    return SamplingParams.from_optional(
        n=req.n, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, temperature=req.temperature, top_p=req.top_p,
        top_k=req.top_k, min_p=req.min_p, seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos, max_tokens=max_tokens, min_tokens=req.min_tokens, logprobs=logprobs,
        include_stop_str_in_output=req.include_stop_str_in_output, skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens, logit_bias=bias,
        prompt_logprobs=prompt_logprobs, allowed_token_ids=req.allowed_token_ids,
        logprob_token_ids=req.logprob_token_ids or None,
    )


def _check_token_lists(req: SamplingFields, vocab: int | None) -> None:
    """``allowed_token_ids`` / ``logprob_token_ids`` inside the vocabulary (vLLM's texts)."""
    if vocab is None:
        return
    if req.allowed_token_ids and any(not 0 <= t < vocab for t in req.allowed_token_ids):
        raise bad_request("allowed_token_ids: allowed_token_ids contains out-of-vocab token id!",
                          param="allowed_token_ids")
    bad = [t for t in req.logprob_token_ids or [] if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"logprob_token_ids: token_id(s) {bad} in logprob_token_ids contain out-of-vocab token "
                          f"ids. Vocabulary size: {vocab}", param="logprob_token_ids")


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
                  top_n: int, as_ids: bool = False) -> dict[str, Any]:
    content = []
    for tid, entry in zip(token_ids, logprobs or []):
        own = entry.get(tid)
        token = token_label(state, tid, own, as_ids)
        content.append({
            "token": token,
            "logprob": max(own.logprob, -9999.0) if own is not None else -9999.0,
            "bytes": list(token.encode("utf-8")),
            "top_logprobs": [
                {"token": (t := token_label(state, i, lp, as_ids)), "logprob": max(lp.logprob, -9999.0),
                 "bytes": list(t.encode("utf-8"))}
                for i, lp in _ranked(entry, tid, top_n)
            ],
        })
    return {"content": content}


def completion_logprobs(state: ServerState, token_ids: list[int], logprobs: list[dict[int, Logprob]] | None,
                        top_n: int, text_offset: int, echo_ids: list[int] | None = None,
                        echo_logprobs: list[dict[int, Logprob] | None] | None = None,
                        as_ids: bool = False) -> dict[str, Any]:
    """OpenAI's legacy shape, as vLLM fills it: each ``top_logprobs`` entry holds the chosen token and the
    ``top_n`` best (so ``logprobs=0`` still gives the chosen token's log-probability). Echoed prompt tokens
    carry their prompt logprobs when known (the first prompt token has none)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for j, tid in enumerate(echo_ids or []):
        entry = echo_logprobs[j] if echo_logprobs is not None and j < len(echo_logprobs) else None
        t = state.token_text(tid) if not as_ids else f"token_id:{tid}"
        tokens.append(t)
        own = entry.get(tid) if entry else None
        token_logprobs.append(max(own.logprob, -9999.0) if own is not None else None)
        top.append(_top_dict(state, entry, tid, top_n, as_ids) if entry else None)
        offsets.append(text_offset)
        text_offset += len(t)
    for tid, entry in zip(token_ids, logprobs or []):
        own = entry.get(tid)
        t = token_label(state, tid, own, as_ids)
        tokens.append(t)
        token_logprobs.append(max(own.logprob, -9999.0) if own is not None else None)
        top.append(_top_dict(state, entry, tid, top_n, as_ids))
        offsets.append(text_offset)
        text_offset += len(t)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _top_dict(state: ServerState, entry: dict[int, Logprob], tid: int, top_n: int, as_ids: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    own = entry.get(tid)
    if own is not None:
        out[token_label(state, tid, own, as_ids)] = max(own.logprob, -9999.0)
    for i, lp in _ranked(entry, tid, top_n):
        out.setdefault(token_label(state, i, lp, as_ids), max(lp.logprob, -9999.0))
    return out


def truncate_prompt(ids: list[int], req: SamplingFields) -> list[int]:
    """``truncate_prompt_tokens``: the prompt's last tokens, or its first with ``truncation_side: right``."""
    n = req.truncate_prompt_tokens
    if n is None or n >= len(ids):
        return ids
    return ids[:n] if req.truncation_side == "right" else ids[-n:]


def tokens_as_ids(state: ServerState, req: SamplingFields) -> bool:
    """``return_tokens_as_token_ids``: the request's, else the server's ``--return-tokens-as-token-ids``."""
    flag = req.return_tokens_as_token_ids
    return bool(state.options.return_tokens_as_token_ids if flag is None else flag)


def token_label(state: ServerState, token_id: int, lp: Logprob | None, as_ids: bool) -> str:
    """A token as logprobs show it: its text, or ``token_id:{id}`` with ``return_tokens_as_token_ids``."""
    return f"token_id:{token_id}" if as_ids else _text(state, token_id, lp)
