"""Incremental detokenization with stop strings and streaming holdback (vLLM v1 semantics).

`tokenizers.decoders.DecodeStream` does the incremental decoding: it is primed with the prompt ids
so the first generated token gets the right leading space, and it buffers tokens until their bytes
form valid UTF-8 (emoji / CJK split across byte-level tokens).
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from slicelm.sampling_params import SamplingParams

# The prompt tail that primes the decode stream; enough context for leading-space handling.
_PRIME_TOKENS = 8


def detokenize_logprob_token(tokenizer: Tokenizer, token_id: int) -> str:
    """Text of one token on its own (logprobs' `decoded_token`); partial UTF-8 shows as U+FFFD."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def check_stop_strings(
    output_text: str, new_char_count: int, stop: list[str], include_in_output: bool
) -> tuple[str, int] | None:
    """Find the earliest stop string that overlaps the last `new_char_count` characters.

    Returns (stop_string, truncate_to) where truncate_to == -1 means keep the whole text.
    """
    if not new_char_count or not stop:
        return None
    best: tuple[int, str] | None = None
    for stop_str in stop:
        start = max(0, len(output_text) - new_char_count - len(stop_str) + 1)
        idx = output_text.find(stop_str, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop_str)
    if best is None:
        return None
    idx, stop_str = best
    if include_in_output:
        idx += len(stop_str)
        if idx >= len(output_text):
            return stop_str, -1
    return stop_str, idx


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, prompt_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.params = params
        self.stop: list[str] = list(params.stop or [])
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.detokenize = params.detokenize
        # Hold back this many trailing characters while streaming, so a partial stop string is
        # never sent (it might be cut off once the rest of it arrives).
        self.stop_buffer_length = (
            max(len(s) for s in self.stop) - 1 if self.stop and not self.include_stop_str_in_output else 0
        )
        self.output_token_ids: list[int] = []
        self.output_text = ""
        self._last_output_text_offset = 0
        self._ids = list(prompt_token_ids[-_PRIME_TOKENS:])  # prime + output ids (for the fallback)
        self._stream = DecodeStream(ids=self._ids or None, skip_special_tokens=params.skip_special_tokens)

    def decode_next(self, token_id: int) -> str:
        self._ids.append(token_id)
        try:
            return self._stream.step(self.tokenizer, token_id) or ""
        except Exception:
            # DecodeStream refuses when a decoder rewrites already-decoded text (InvalidPrefix):
            # diff two window decodes instead and restart the stream after this token.
            window = self._ids[-(_PRIME_TOKENS + 1) :]
            skip = self.params.skip_special_tokens
            prev = self.tokenizer.decode(window[:-1], skip_special_tokens=skip)
            new = self.tokenizer.decode(window, skip_special_tokens=skip)
            self._stream = DecodeStream(ids=window, skip_special_tokens=skip)
            return new[len(prev) :]

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Append new tokens' text; return the stop string that matched (text is then truncated).

        `stop_terminated`: the last id is a stop token / eos; its text is left out unless
        include_stop_str_in_output.
        """
        if not new_token_ids:
            return None
        skipped: int | None = None
        if stop_terminated and not self.include_stop_str_in_output:
            skipped, new_token_ids = new_token_ids[-1], new_token_ids[:-1]
        if not self.detokenize:
            self.output_token_ids.extend(new_token_ids)
            if skipped is not None:
                self.output_token_ids.append(skipped)
            return None

        stop_check_offset = len(self.output_text)
        for token_id in new_token_ids:
            self.output_token_ids.append(token_id)
            self.output_text += self.decode_next(token_id)
            if self.min_tokens and len(self.output_token_ids) <= self.min_tokens:
                stop_check_offset = len(self.output_text)  # no stop strings before min_tokens
        if skipped is not None:
            self.output_token_ids.append(skipped)

        if not self.stop or len(self.output_token_ids) <= self.min_tokens:
            return None
        match = check_stop_strings(
            self.output_text,
            len(self.output_text) - stop_check_offset,
            self.stop,
            self.include_stop_str_in_output,
        )
        if match is None:
            return None
        stop_str, truncate_to = match
        if truncate_to != -1:
            self.output_text = self.output_text[:truncate_to]
        return stop_str

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text to send now: the whole text so far, or (delta) what is new since the last call.

        While not finished, the last `stop_buffer_length` characters are held back.
        """
        buffer_length = 0 if finished else self.stop_buffer_length
        length = max(0, len(self.output_text) - buffer_length)
        if not delta:
            return self.output_text[:length]
        last = self._last_output_text_offset
        if last < length:
            self._last_output_text_offset = length
            return self.output_text[last:length]
        return ""
