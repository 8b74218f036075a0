"""Sampling parameters for text generation (vLLM's field names and defaults).

All validation lives here: a bad value raises `SamplingParamsError` (a `ValueError`) whose message
names the field and the value, so servers can turn it into a 400 with `param` set.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field, fields
from typing import Any

_SAMPLING_EPS = 1e-5
MAX_LOGPROBS = 20  # the servers' default --max-logprobs
MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's bound on logprob_token_ids
MAX_LOGIT_BIAS = 100.0


class SamplingParamsError(ValueError):
    """Invalid sampling parameter; `field` names the offending parameter."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """vLLM's ``structured_outputs``: exactly one constraint (``json`` schema, ``regex``, ``choice``, a
    ``grammar`` in Lark or GBNF, ``json_object``, or a ``structural_tag``), plus whitespace options. The
    engine core compiles it (``slicelm.engine.structured_output``); here it is plain data."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise SamplingParamsError("structured_outputs", "give exactly one of json, regex, choice, grammar, "
                                      f"json_object, structural_tag; got {given or 'none'}")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise SamplingParamsError("structured_outputs.choice", "must be a non-empty list of strings")

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled (normalized to 0)
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None  # normalized to list[str]
    stop_token_ids: list[int] | None = None  # normalized to list[int]
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # logprobs of the prompt tokens: the token and the top-k
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # sample only among these ids
    logprob_token_ids: list[int] | None = None  # logprobs of these ids (and the sampled one) instead of the top-k
    truncate_prompt_tokens: int | None = None
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    # eos ids of the model / generation config; filled by update_from_generation_config.
    _all_stop_token_ids: set[int] = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._normalize()
        self._verify()
        if self.sampling_type == SamplingType.GREEDY:
            # Greedy ignores the truncation knobs; reset them so nobody does needless work.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        self._all_stop_token_ids = set(self.stop_token_ids)

    @classmethod
    def from_optional(cls, **kwargs: Any) -> SamplingParams:
        """Build from keyword arguments, dropping those that are None (optional API fields)."""
        names = {f.name for f in fields(cls) if not f.name.startswith("_")}
        unknown = set(kwargs) - names
        if unknown:
            raise SamplingParamsError(sorted(unknown)[0], "unknown sampling parameter")
        return cls(**{k: v for k, v in kwargs.items() if v is not None})

    def _normalize(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise SamplingParamsError("stop", f"must be a string or a list of strings, got {self.stop!r}")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = list(self.stop_token_ids)
        else:
            raise SamplingParamsError(
                "stop_token_ids", f"must be a list of ints, got {self.stop_token_ids!r}"
            )
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise SamplingParamsError(
                    "logit_bias", f"must be a dict of token id -> bias, got {self.logit_bias!r}"
                )
            bias: dict[int, float] = {}
            for k, v in self.logit_bias.items():
                # JSON object keys arrive as strings ("50256"); accept those that are integers.
                key = int(k) if isinstance(k, str) and k.strip().lstrip("-").isdigit() else k
                if not _is_int(key):
                    raise SamplingParamsError("logit_bias", f"keys must be integer token ids, got {k!r}")
                if not _is_number(v):
                    raise SamplingParamsError(
                        "logit_bias", f"value for token {key} must be a number, got {v!r}"
                    )
                bias[key] = float(v)
            self.logit_bias = bias

    def _verify(self) -> None:
        def bad(name: str, why: str) -> SamplingParamsError:
            return SamplingParamsError(name, f"{why}, got {getattr(self, name)!r}")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2.0 <= v <= 2.0:
                raise bad(name, "must be in [-2, 2]")
        if not _is_number(self.repetition_penalty) or not self.repetition_penalty > 0.0:
            raise bad("repetition_penalty", "must be > 0")
        if not _is_number(self.temperature) or not self.temperature >= 0.0:
            raise bad("temperature", "must be >= 0")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "must be an integer >= 1, or 0 / -1 to disable")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "must be an integer")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(
                "min_tokens", f"must be <= max_tokens={self.max_tokens}, got {self.min_tokens}"
            )
        lp = self.logprobs
        if lp is not None and (not _is_int(lp) or not lp >= 0):  # servers cap it (--max-logprobs)
            raise bad("logprobs", "must be an integer >= 0")
        plp = self.prompt_logprobs
        if plp is not None and (not _is_int(plp) or not plp >= 0):  # servers cap it (--max-logprobs)
            raise bad("prompt_logprobs", "must be an integer >= 0")
        if self.truncate_prompt_tokens is not None and (
            not _is_int(self.truncate_prompt_tokens) or self.truncate_prompt_tokens < 1
        ):
            raise bad("truncate_prompt_tokens", "must be an integer >= 1")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingParamsError("stop", f"stop strings must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise SamplingParamsError("stop_token_ids", f"must be non-negative integers, got {t!r}")
        self._verify_token_lists()
        for tok, v in (self.logit_bias or {}).items():
            if tok < 0:
                raise SamplingParamsError("logit_bias", f"token ids must be >= 0, got {tok}")
            if not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS:
                raise SamplingParamsError(
                    "logit_bias", f"bias for token {tok} must be in [-100, 100], got {v!r}"
                )

    def _verify_token_lists(self) -> None:
        """vLLM's checks of ``allowed_token_ids`` / ``logprob_token_ids`` (the servers check the vocabulary)."""
        allowed = self.allowed_token_ids
        if allowed is not None:
            if not isinstance(allowed, list) or not allowed:
                raise SamplingParamsError("allowed_token_ids", "allowed_token_ids is not None and empty!")
            if not all(_is_int(t) and t >= 0 for t in allowed):
                raise SamplingParamsError("allowed_token_ids", "allowed_token_ids contains out-of-vocab token id!")
        ids = self.logprob_token_ids
        if ids is None:
            return
        if not isinstance(ids, list) or not all(_is_int(t) and t >= 0 for t in ids):
            raise SamplingParamsError("logprob_token_ids", f"must be a list of token ids >= 0, got {ids!r}")
        if len(ids) > MAX_LOGPROB_TOKEN_IDS:
            raise SamplingParamsError("logprob_token_ids", f"Requested logprob_token_ids of length {len(ids)}, "
                                      f"which is greater than max allowed: {MAX_LOGPROB_TOKEN_IDS}")
        if self.logprobs is not None and self.logprobs != len(ids):
            raise SamplingParamsError("logprob_token_ids", "When both logprobs and logprob_token_ids are set, "
                                      f"logprobs must equal len(logprob_token_ids). Got logprobs={self.logprobs}, "
                                      f"len(logprob_token_ids)={len(ids)}.")

    @property
    def num_logprobs(self) -> int | None:
        """Logprobs to return per output token besides the sampled one (vLLM's): ``logprobs``, or the number
        of ``logprob_token_ids``; None when none were asked for."""
        if self.logprobs is not None:
            return self.logprobs
        return len(self.logprob_token_ids) if self.logprob_token_ids else None

    def update_from_generation_config(
        self, generation_config: dict[str, Any] | None, model_eos_token_id: int | None = None
    ) -> None:
        """Record the model's eos ids (as vLLM): they count as stop ids for min_tokens, and
        generation-config eos ids become stop_token_ids unless ignore_eos."""
        if model_eos_token_id is not None:
            self._all_stop_token_ids.add(model_eos_token_id)
        eos = (generation_config or {}).get("eos_token_id")
        if eos is None:
            return
        eos_ids = {eos} if isinstance(eos, int) else set(eos)
        if model_eos_token_id is not None:
            eos_ids.discard(model_eos_token_id)
        if eos_ids:
            self._all_stop_token_ids.update(eos_ids)
            if not self.ignore_eos:
                assert isinstance(self.stop_token_ids, list)
                self.stop_token_ids = self.stop_token_ids + sorted(eos_ids - set(self.stop_token_ids))

    @property
    def needs_output_history(self) -> bool:
        """Penalties read the values of all output tokens so far."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def all_stop_token_ids(self) -> set[int]:
        """stop_token_ids plus eos ids recorded by update_from_generation_config."""
        return self._all_stop_token_ids

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)
