"""A request's life inside the engine, and what the engine hands back to callers."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from slicelm.engine.structured_output import StructuredOutputRequest
    from slicelm.pooling_params import PoolingParams
    from slicelm.sampling_params import SamplingParams


# Stands in for a token that the GPU has sampled but the host has not read yet (async scheduling).
PLACEHOLDER = -1


class RequestStatus(enum.IntEnum):
    WAITING = 0
    WAITING_FOR_FSM = 1  # its structured-output grammar is still compiling
    RUNNING = 2
    PREEMPTED = 3
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {4: "stop", 5: "length", 6: "abort"}.get(int(self))


class PromptTooLongError(ValueError):
    """The prompt (plus at least one generated token) does not fit in ``max_model_len``."""


class EmptyPromptError(ValueError):
    """The prompt has no tokens."""


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (``time.time()``) of one request and how often it was preempted, for histograms."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    num_preemptions_sent: int = 0  # core side: the part of ``num_preemptions`` already sent to the API process

    def take_unsent_preemptions(self) -> int:
        """Preemptions since the last call (what the sequence's next output carries)."""
        new, self.num_preemptions_sent = self.num_preemptions - self.num_preemptions_sent, self.num_preemptions
        return new


@dataclass(eq=False)
class Request:
    """One sequence being computed. ``n > 1`` requests are fanned out into ``n`` of these."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None = None
    pooling_params: PoolingParams | None = None
    eos_token_ids: frozenset[int] = frozenset()
    priority: int = 0
    arrival_time: float = field(default_factory=time.time)
    prompt: str | None = None
    token_type_ids: list[int] | None = None  # cross-encoder pairs
    generator: torch.Generator | None = None
    structured: StructuredOutputRequest | None = None  # its grammar and matcher (structured outputs)
    warmup: bool = False  # an API server's own warm-up request: in no counter

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_pending: int = 0  # trailing PLACEHOLDER tokens, sampled on the device but not read back yet
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first schedule
    stop_reason: int | str | None = None
    block_hashes: list[bytes] = field(default_factory=list)  # chained sha256 hashes of full blocks
    # prompt_logprobs requests: (ids [token, top-k..], logprobs, rank) of prompt tokens 1, 2, ... so far
    prompt_logprobs: list[tuple[list[int], list[float], int]] = field(default_factory=list)
    metrics: RequestMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        self.all_token_ids: list[int] = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_pooling(self) -> bool:
        return self.pooling_params is not None

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling_params is not None and self.sampling_params.prompt_logprobs is not None

    @property
    def num_known_output_tokens(self) -> int:
        return len(self.output_token_ids) - self.num_pending

    def known_output_token_ids(self) -> list[int]:
        return self.output_token_ids[: len(self.output_token_ids) - self.num_pending]

    def reached_limit(self, max_model_len: int) -> bool:
        """Its next token (pending included) would be past max_tokens or max_model_len: nothing to schedule."""
        p = self.sampling_params
        if p is not None and p.max_tokens is not None and len(self.output_token_ids) >= p.max_tokens:
            return True
        return self.num_tokens >= max_model_len

    def append_output_token(self, token_id: int) -> None:
        assert self.num_pending == 0
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def append_placeholder(self) -> None:
        self.output_token_ids.append(PLACEHOLDER)
        self.all_token_ids.append(PLACEHOLDER)
        self.num_pending += 1

    def resolve_placeholder(self, token_id: int) -> None:
        """The oldest pending token became known."""
        assert self.num_pending > 0, f"{self.request_id}: no pending token"
        self.output_token_ids[len(self.output_token_ids) - self.num_pending] = token_id
        self.all_token_ids[len(self.all_token_ids) - self.num_pending] = token_id
        self.num_pending -= 1

    def drop_placeholders(self) -> None:
        """A finished request's tokens sampled past its end are discarded."""
        if self.num_pending:
            del self.output_token_ids[-self.num_pending :]
            del self.all_token_ids[-self.num_pending :]
            self.num_pending = 0


@dataclass
class Logprob:
    """vLLM's shape: the log-probability of one token, its rank in the distribution, its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """What a request produced: a delta (streams: only what is new since its previous output) or, for
    the offline API's ``stream=False`` requests, everything once it has finished."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    # vLLM's shape: None for the first prompt token, then per token {id: Logprob} (the token and the top-k)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclass
class PoolingOutput:
    """Result of an embedding or score request. ``data`` is a 1-D float32 CPU tensor."""

    request_id: str
    prompt_token_ids: list[int]
    data: torch.Tensor
    finished: bool = True
    metrics: RequestMetrics | None = None
