"""Structured outputs (JSON schema, regex, choice, grammar, structural tag) in the engine core.

``spec``: request constraint -> ``GrammarSpec`` (plain data, also used by the API side to validate);
``guidance`` (llguidance, default) and ``xgrammar_backend`` (optional): compile specs, one matcher per
sequence, batched masks; ``manager``: asynchronous compilation, per-step bitmask, accept / rollback;
``bitmask``: the int32 mask and its in-place application to the logits (Triton on CUDA, torch on CPU).
"""

from slicelm.engine.structured_output.manager import BACKENDS, StructuredOutputManager, StructuredOutputRequest
from slicelm.engine.structured_output.spec import GrammarError, GrammarSpec, grammar_spec

__all__ = ["BACKENDS", "GrammarError", "GrammarSpec", "StructuredOutputManager", "StructuredOutputRequest",
           "grammar_spec"]
