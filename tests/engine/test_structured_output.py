"""The grammar backends (llguidance, xgrammar) and the manager on SmolLM2's real tokenizer, without the model:
masks allow exactly the tokens a valid output can continue with, matchers advance by accepted tokens and roll
back to an earlier state, equal specs share one compile, a bad spec fails its future (not the core)."""

from __future__ import annotations

import importlib.util
import re
import threading

import pytest
import torch

from slicelm.config import StructuredOutputsConfig
from slicelm.engine.request import Request
from slicelm.engine.structured_output import GrammarError, StructuredOutputManager, grammar_spec
from slicelm.engine.structured_output.manager import make_backend
from slicelm.loader.tokenizer import load_tokenizer_from
from slicelm.sampling_params import SamplingParams, StructuredOutputsParams

MODEL = "smollm2-135m-instruct"
VOCAB = 49152
BACKENDS = ["guidance"] + (["xgrammar"] if importlib.util.find_spec("xgrammar") else [])
PHONE = StructuredOutputsParams(regex=r"[0-9]{3}-[0-9]{4}")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer_from(MODEL)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, tokenizer):
    return make_backend(request.param, tokenizer, VOCAB, sorted(tokenizer.eos_token_ids))


def allowed(bitmask_row: torch.Tensor) -> set[int]:
    bits = (bitmask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return set(torch.nonzero(bits.reshape(-1)[:VOCAB]).flatten().tolist())


def masks_along(backend, grammar, tokens: list[int]) -> list[set[int]]:
    """The allowed set before each token of ``tokens`` and after the last, accepting them one by one."""
    out = []
    mask = torch.full((1, (VOCAB + 31) // 32), -1, dtype=torch.int32)
    for t in [*tokens, None]:
        backend.fill_bitmask([grammar], [0], mask)
        out.append(allowed(mask[0]))
        if t is not None:
            assert backend.accept_batch([grammar], [t]) == [True]
    return out


def test_masks_follow_a_valid_output_and_roll_back(backend, tokenizer) -> None:
    compiled = backend.compile(grammar_spec(PHONE))
    tokens = tokenizer.encode("555-0199", add_special_tokens=False)
    eos = tokenizer.eos_token_id
    grammar = compiled.new_grammar()
    steps = masks_along(backend, grammar, tokens)
    for t, ok in zip(tokens, steps):
        assert t in ok and eos not in ok  # the output's own token is allowed, ending early is not
        assert all(re.fullmatch(r"[0-9-]+", tokenizer.decode([a])) for a in list(ok)[:200])
    assert eos in steps[-1] and not steps[-1] - {eos} - tokenizer.eos_token_ids  # complete: only eos
    grammar.rollback(3)  # back to after len - 3 tokens: the same mask as then
    mask = torch.full((1, (VOCAB + 31) // 32), -1, dtype=torch.int32)
    backend.fill_bitmask([grammar], [0], mask)
    assert allowed(mask[0]) == steps[len(tokens) - 3]
    other = compiled.new_grammar()  # a second sequence of the same compile has its own state
    backend.fill_bitmask([other], [0], mask)
    assert allowed(mask[0]) == steps[0]


def test_one_batched_call_fills_only_the_given_rows(backend, tokenizer) -> None:
    compiled = backend.compile(grammar_spec(StructuredOutputsParams(choice=["yes", "no"])))
    grammars = [compiled.new_grammar(), compiled.new_grammar()]
    mask = torch.full((4, (VOCAB + 31) // 32), -1, dtype=torch.int32)
    backend.fill_bitmask(grammars, [1, 3], mask)
    assert (mask[0] == -1).all() and (mask[2] == -1).all()  # unconstrained rows stay all-ones
    first = {tokenizer.encode(w, add_special_tokens=False)[0] for w in ("yes", "no")}
    assert first <= allowed(mask[1]) and allowed(mask[1]) == allowed(mask[3]) and len(allowed(mask[1])) < 50


def test_a_filled_row_is_written_whole(backend, tokenizer) -> None:
    """The manager resets a step's mask to all-ones only when some row is unconstrained: a constrained row must
    come out the same over whatever the buffer held (here, the bits of another grammar and garbage)."""
    compiled = backend.compile(grammar_spec(PHONE))
    clean = torch.full((1, (VOCAB + 31) // 32), -1, dtype=torch.int32)
    backend.fill_bitmask([compiled.new_grammar()], [0], clean)
    dirty = torch.randint(-2**31, 2**31 - 1, clean.shape, dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    backend.fill_bitmask([compiled.new_grammar()], [0], dirty)
    assert torch.equal(clean, dirty)


def test_bad_specs_name_their_field(backend) -> None:
    with pytest.raises(GrammarError) as e:
        backend.compile(grammar_spec(StructuredOutputsParams(grammar="root ::= ( unclosed")))
    assert e.value.field == "structured_outputs.grammar"


def make_request(rid: str, so: StructuredOutputsParams | None) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(max_tokens=8, structured_outputs=so))


def test_manager_shares_compiles_and_reports_errors(tokenizer) -> None:
    loads = []
    gate = threading.Event()

    def load():
        loads.append(1)
        gate.wait(30)  # the tokenizer "loads" until the test lets it
        return tokenizer

    mgr = StructuredOutputManager(StructuredOutputsConfig(), load, VOCAB, set(tokenizer.eos_token_ids), 4, pin=False)
    a, b = mgr.add(PHONE), mgr.add(PHONE)
    bad = mgr.add(StructuredOutputsParams(grammar="root ::= ( unclosed"))
    assert a.compiled is b.compiled and not a.ready  # one compile for equal specs, in the background
    gate.set()
    for so in (a, b, bad):
        so.compiled.exception(timeout=60)
    assert loads == [1] and mgr.activate(a) is None and mgr.activate(b) is None
    assert "structured_outputs.grammar" in mgr.activate(bad)
    reqs = [make_request("plain", None), make_request("a", None), make_request("b", None)]
    reqs[1].structured, reqs[2].structured = a, b
    mask = mgr.bitmask(reqs)
    assert mask is not None and (mask[0] == -1).all() and allowed(mask[1]) == allowed(mask[2])
    digit = tokenizer.encode("5", add_special_tokens=False)
    assert len(digit) == 1
    for _ in range(3):
        reqs[1].output_token_ids.append(digit[0])
        mgr.accept(reqs[1:2], digit)  # only a advances: three digits, so a dash must follow
    assert (a.num_accepted, b.num_accepted) == (3, 0)
    mask = mgr.bitmask(reqs)
    assert allowed(mask[1]) == {tokenizer.encode("-", add_special_tokens=False)[0]} != allowed(mask[2])
    del reqs[1].output_token_ids[1:]  # two of a's tokens were dropped: sync rolls its matcher back to one digit
    mgr.sync(reqs[1])
    mask = mgr.bitmask(reqs)
    assert a.num_accepted == 1 and allowed(mask[1]) == allowed(mask[2])
    for so in (a, b, bad):
        mgr.release(so)
    assert mgr.num_live == 0
    mgr.shutdown()


def test_a_fill_on_the_mask_thread_keeps_the_matchers_it_was_given(tokenizer) -> None:
    """With async scheduling the masks fill on the mask thread while the host goes on: a sequence the core
    finished (and released) after the fill was queued is still filled from its matcher, never a crash."""
    mgr = StructuredOutputManager(StructuredOutputsConfig(), lambda: tokenizer, VOCAB, set(tokenizer.eos_token_ids),
                                  4, pin=False)
    a = mgr.add(PHONE)
    a.compiled.result(timeout=60)
    assert mgr.activate(a) is None
    req, plain = make_request("a", None), make_request("plain", None)
    req.structured = a
    digit, dash = (tokenizer.encode(c, add_special_tokens=False)[0] for c in "5-")
    for _ in range(3):  # three digits: a dash must follow
        mgr.accept([req], [digit])
    gate = threading.Event()
    first = mgr.bitmask_async([plain])  # creates the mask thread
    assert first.result(timeout=30) is None  # no constrained row: no mask
    mgr._mask_pool.submit(gate.wait, 30)  # the mask thread is busy: the next fill waits in its queue
    pending = mgr.bitmask_async([plain, req])
    req.structured = None  # the core released it after queueing the fill
    gate.set()
    mask = pending.result(timeout=30)
    assert (mask[0] == -1).all() and allowed(mask[1]) == {dash}
    mgr.shutdown()

