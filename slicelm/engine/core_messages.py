"""What the API process and the engine core send each other (msgspec structs, msgpack on the wire).

Requests go in whole (``EngineCoreRequest``: token ids and parameters, already validated); outputs come
back once per step as **deltas** (``EngineCoreOutput``: only the token ids sampled since the last
output, the finish reason, the new tokens' logprobs or a pooling result, the preemptions since) together with
the engine's stats snapshot. Nothing cumulative travels per step, so a stream of L tokens costs O(L) bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from slicelm.config import CacheConfig, ModelConfig, SchedulerConfig
from slicelm.engine.stats import EngineStats
from slicelm.pooling_params import PoolingParams
from slicelm.sampling_params import SamplingParams

# Message kinds (first zmq frame) from the client to the core.
ADD = b"A"
ABORT = b"X"
SHUTDOWN = b"S"
WARMUP_DONE = b"W"  # an API server's warm-up requests are over: once idle, the core empties its prefix cache
UTILITY = b"U"  # a call answered in ``EngineCoreOutputs.utility`` (sleep, wake_up, is_sleeping)

# One sampled token's logprobs: (token ids [chosen, top-1 .. top-k], their logprobs, rank of the chosen).
LogprobEntry = tuple[list[int], list[float], int | None]


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    """One sequence for the core (an ``n > 1`` request is ``n`` of these, ids ``<id>#<i>``)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None = None
    pooling_params: PoolingParams | None = None
    eos_token_ids: list[int] = []
    arrival_time: float = 0.0
    priority: int = 0
    token_type_ids: list[int] | None = None
    seed: int | None = None  # this sequence's sampler seed (the request's seed + its index)
    warmup: bool = False  # an API server's own warm-up request: the core counts it in no stats


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one sequence produced since its last output."""

    request_id: str
    new_token_ids: list[int] = []
    finish_reason: str | None = None  # "stop" (eos / stop token) | "length" | "abort" | "error"
    stop_reason: int | None = None  # the stop token id that ended it
    new_logprobs: list[LogprobEntry] | None = None
    pooled: bytes | None = None  # float32 values of a pooling result
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None  # sent with a sequence's first output
    error: str | None = None  # the core refused or failed this sequence
    # with its first token, for requests with prompt_logprobs: one entry per prompt token after the first
    prompt_logprobs: list[LogprobEntry] | None = None
    num_preemptions: int = 0  # times it was preempted since its previous output (a delta: 0 is not sent)


class UtilityCall(msgspec.Struct, array_like=True):
    call_id: int
    method: str
    args: list[Any] = []


class UtilityReply(msgspec.Struct, array_like=True, omit_defaults=True):
    call_id: int
    result: Any = None
    error: str | None = None  # "ValueError: ..." when the call failed


def utility_error(error: str) -> Exception:
    """The exception a failed utility call raises on the caller's side (the core's ValueError stays one)."""
    kind, _, text = error.partition(": ")
    return ValueError(text) if kind == "ValueError" else RuntimeError(error)


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True):
    """One message from the core: a step's outputs, its stats, how many adds it has taken so far."""

    outputs: list[EngineCoreOutput] = []
    stats: EngineStats | None = None
    num_adds: int = 0
    timestamp: float = 0.0
    dead_error: str | None = None  # the core is going down with this error
    num_resets: int = 0  # how many ``WARMUP_DONE`` prefix-cache resets the core has done (the API side waits)
    utility: list[UtilityReply] = []


@dataclass
class EngineCoreInfo:
    """What the core resolved at start-up; the API process validates and tokenizes with it."""

    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    vocab_size: int
    hidden_size: int
    eos_token_ids: list[int]  # from config.json / generation_config.json (the tokenizer adds its own)
    device_type: str
    async_scheduling: bool
    pooling_type: str | None = None  # pooling models: the resolved "MEAN" | "CLS" | "LAST"
    pooling_normalize: bool | None = None  # pooling models: whether embeddings are normalized by default


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def make_encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder(enc_hook=_enc_hook)


def request_decoder() -> msgspec.msgpack.Decoder[EngineCoreRequest]:
    return msgspec.msgpack.Decoder(EngineCoreRequest)


def outputs_decoder() -> msgspec.msgpack.Decoder[EngineCoreOutputs]:
    return msgspec.msgpack.Decoder(EngineCoreOutputs)


def ids_decoder() -> msgspec.msgpack.Decoder[list[str]]:
    return msgspec.msgpack.Decoder(list[str])


def utility_decoder() -> msgspec.msgpack.Decoder[UtilityCall]:
    return msgspec.msgpack.Decoder(UtilityCall)
