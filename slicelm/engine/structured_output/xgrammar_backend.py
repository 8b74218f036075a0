"""The optional xgrammar backend (``--structured-outputs-config '{"backend": "xgrammar"}'``).

Same shape as the llguidance backend: compile a spec once (ahead of time, against the vocabulary),
one ``GrammarMatcher`` per sequence, one threaded ``BatchGrammarMatcher`` call per step for the masks.
xgrammar pulls in transformers, triton and apache-tvm-ffi, so it is imported only when asked for.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch

from slicelm.engine.structured_output.spec import GrammarError, GrammarSpec

if TYPE_CHECKING:
    from slicelm.loader.tokenizer import Tokenizer


class XGrammarGrammar:
    def __init__(self, matcher) -> None:  # xgrammar.GrammarMatcher (imported lazily)
        self.matcher = matcher

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()

    def accept(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)

    def error(self) -> str | None:
        return None


class XGrammarCompiled:
    def __init__(self, compiled) -> None:  # xgrammar.CompiledGrammar
        self.compiled = compiled

    def new_grammar(self) -> XGrammarGrammar:
        import xgrammar as xgr

        return XGrammarGrammar(xgr.GrammarMatcher(self.compiled))


class XGrammarBackend:
    name = "xgrammar"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        import xgrammar as xgr

        backend_str = tokenizer.hf.to_str()
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend_str)
        vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
        encoded = [""] * max(vocab_size, max(vocab.values()) + 1)
        for token, i in vocab.items():
            encoded[i] = token
        info = xgr.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=vocab_size,
                                 stop_token_ids=sorted(eos_token_ids), add_prefix_space=meta["add_prefix_space"])
        self.vocab_size = vocab_size
        self.compiler = xgr.GrammarCompiler(info, max_threads=2)
        self.batch = xgr.BatchGrammarMatcher()

    def compile(self, spec: GrammarSpec) -> XGrammarCompiled:
        c = self.compiler
        try:
            if spec.kind == "json":
                compiled = c.compile_json_schema(spec.text, any_whitespace=spec.whitespace_flexible,
                                                 separators=None if spec.whitespace_flexible else (",", ":"))
            elif spec.kind == "json_object":
                compiled = c.compile_builtin_json_grammar()
            elif spec.kind == "regex":
                compiled = c.compile_regex(spec.text)
            elif spec.kind == "choice":
                compiled = c.compile_grammar("root ::= " + " | ".join(json.dumps(x) for x in json.loads(spec.text)))
            elif spec.kind == "grammar":
                compiled = c.compile_grammar(spec.text)
            else:
                compiled = c.compile_structural_tag(json.loads(spec.text))
        except (RuntimeError, ValueError, TypeError) as e:
            raise GrammarError(spec.field, str(e)) from e
        return XGrammarCompiled(compiled)

    def fill_bitmask(self, grammars: list[XGrammarGrammar], rows: list[int], bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask([g.matcher for g in grammars], bitmask, rows)

    def accept_batch(self, grammars: list[XGrammarGrammar], tokens: list[int]) -> list[bool]:
        import xgrammar as xgr

        return xgr.BatchGrammarMatcher.batch_accept_token([g.matcher for g in grammars], tokens)
