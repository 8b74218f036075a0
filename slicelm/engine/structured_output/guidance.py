"""The llguidance backend (default): grammars as llguidance grammars, one ``LLMatcher`` per sequence.

A spec becomes llguidance's grammar text without a tokenizer (``to_llguidance``), so the API process
validates requests cheaply; the core compiles it against the vocabulary once per distinct spec (a
template matcher) and gives each sequence a ``deep_copy`` of it, which shares the compiled lexer and
parser tables. Masks of a whole batch are filled by one ``LLExecutor`` call (native threads, no GIL);
accepted tokens of a whole step are consumed by one parallel call too.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import llguidance
import torch

from slicelm.engine.structured_output.spec import GrammarError, GrammarSpec

if TYPE_CHECKING:
    from slicelm.loader.tokenizer import Tokenizer


def _tag_grammar(text: str, field_name: str) -> str:
    """vLLM's structural tag ``{"structures": [{"begin", "schema", "end"}], "triggers": [...]}``."""
    tag = json.loads(text)
    try:
        triggers = list(tag["triggers"])
        tags = []
        for s in tag["structures"]:
            trigger = next((t for t in triggers if s["begin"].startswith(t)), None)
            if trigger is None:
                raise GrammarError(field_name, f"no trigger is a prefix of begin {s['begin']!r}")
            tags.append(llguidance.StructTag(trigger=trigger, begin=s["begin"], grammar=s["schema"], end=s["end"]))
    except (KeyError, TypeError, AssertionError) as e:
        raise GrammarError(field_name, f"must be {{'structures': [{{'begin', 'schema', 'end'}}], 'triggers': "
                                       f"[...]}} ({type(e).__name__}: {e})") from e
    if not tags:
        raise GrammarError(field_name, "has no structures")
    return llguidance.StructTag.to_grammar(tags)


def to_llguidance(spec: GrammarSpec) -> str:
    """llguidance's grammar text for ``spec`` (no vocabulary needed); ``GrammarError`` when it is invalid."""
    field_name = spec.field
    try:
        if spec.kind in ("json", "json_object"):
            options: dict = {"whitespace_flexible": spec.whitespace_flexible}
            if spec.whitespace_pattern is not None:
                options["whitespace_pattern"] = spec.whitespace_pattern
            grammar = llguidance.LLMatcher.grammar_from_json_schema(spec.text, defaults=options)
        elif spec.kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(spec.text)
        elif spec.kind == "choice":
            grammar = llguidance.grammar_from("choice", spec.text)
        elif spec.kind == "grammar":
            grammar = llguidance.grammar_from("grammar", spec.text)
        else:
            grammar = _tag_grammar(spec.text, field_name)
    except GrammarError:
        raise
    except (ValueError, TypeError) as e:
        raise GrammarError(field_name, str(e)) from e
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(field_name, error.strip())
    return grammar


class GuidanceGrammar:
    """One sequence's matcher. It is terminated once it took an eos token (as vLLM): a matcher that is
    merely stopped (the grammar is complete) still masks every token but eos."""

    def __init__(self, matcher: llguidance.LLMatcher, eos: frozenset[int]) -> None:
        self.matcher = matcher
        self.eos = eos
        self.terminated = False

    def is_terminated(self) -> bool:
        return self.terminated

    def rollback(self, num_tokens: int) -> None:
        assert self.matcher.rollback(num_tokens), self.matcher.get_error()
        self.terminated = False

    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


class GuidanceCompiled:
    """A compiled spec: a template matcher that is never advanced, copied for each sequence."""

    def __init__(self, template: llguidance.LLMatcher, eos: frozenset[int]) -> None:
        self.template = template
        self.eos = eos

    def new_grammar(self) -> GuidanceGrammar:
        return GuidanceGrammar(self.template.deep_copy(), self.eos)


class GuidanceBackend:
    name = "guidance"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        self.eos = frozenset(eos_token_ids)
        self.tokenizer = llguidance.LLTokenizer(tokenizer.hf.to_str(), n_vocab=vocab_size,
                                                eos_token=sorted(eos_token_ids))
        self.executor = llguidance.LLExecutor()

    def compile(self, spec: GrammarSpec) -> GuidanceCompiled:
        matcher = llguidance.LLMatcher(self.tokenizer, to_llguidance(spec), log_level=0)
        if matcher.is_error():
            raise GrammarError(spec.field, matcher.get_error())
        return GuidanceCompiled(matcher, self.eos)

    def fill_bitmask(self, grammars: list[GuidanceGrammar], rows: list[int], bitmask: torch.Tensor) -> None:
        """Fills ``bitmask[rows[i]]`` with ``grammars[i]``'s allowed tokens (one native, threaded call)."""
        assert bitmask.dtype == torch.int32 and bitmask.is_contiguous() and not bitmask.is_cuda
        pairs = [(g.matcher, r) for g, r in zip(grammars, rows)]
        self.executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])

    def accept_batch(self, grammars: list[GuidanceGrammar], tokens: list[int]) -> list[bool]:
        """Consumes one token per matcher (one parallel call); eos terminates, a stopped matcher takes nothing."""
        ok = [True] * len(grammars)
        todo = []
        for i, (g, t) in enumerate(zip(grammars, tokens)):
            if t in self.eos:
                g.terminated = True
            if not g.matcher.is_stopped():
                todo.append(i)
        if todo:
            done = self.executor.consume_token_par([(grammars[i].matcher, tokens[i]) for i in todo])
            for i, accepted in zip(todo, done):
                ok[i] = accepted
        return ok
