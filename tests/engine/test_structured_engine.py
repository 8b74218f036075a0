"""Structured outputs through the engine on the real SmolLM2: a request whose grammar still compiles waits as
WAITING_FOR_FSM while the others run; preemption and chunked prefill (small KV cache, async scheduling on the
CPU) keep every output valid and every matcher in step with its sequence (and each request's output says how often it
was preempted); ``n > 1`` gives each sequence its own matcher."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest

from slicelm import SamplingParams
from slicelm.config import EngineArgs
from slicelm.engine.engine import LLMEngine
from slicelm.engine.request import RequestStatus
from slicelm.sampling_params import StructuredOutputsParams

pytestmark = pytest.mark.slow
# 5 blocks of 16 tokens, 16 tokens per step: three 23-33-token sequences cannot all stay, so some are preempted
ARGS = {"max_model_len": 80, "max_num_seqs": 4, "num_gpu_blocks_override": 5, "max_num_batched_tokens": 16,
        "async_scheduling": True}
NUMBERS = {"type": "array", "items": {"type": "integer", "minimum": 100, "maximum": 999}, "minItems": 3,
           "maxItems": 3}


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine.from_engine_args(EngineArgs("smollm2-135m-instruct", **ARGS))


def run(engine: LLMEngine, check=None, preemptions: dict[str, int] | None = None) -> dict[str, list]:
    """Steps until every request finished (added with ``stream=False``); ``check`` runs after each step;
    ``preemptions`` gets each finished request's count."""
    done: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs
                if preemptions is not None:
                    preemptions[out.request_id] = out.metrics.num_preemptions
        if check is not None:
            check()
    return done


def matchers_in_step(engine: LLMEngine) -> None:
    """Every live matcher consumed exactly its sequence's known output tokens, and never rejected one."""
    for req in engine.core.requests.values():
        so = req.structured
        if so is not None and so.grammar is not None:
            assert not so.failed and so.num_accepted == req.num_known_output_tokens, req.request_id


def test_a_compiling_grammar_waits_while_others_run(engine, monkeypatch) -> None:
    manager = engine.core.structured
    gate = threading.Event()
    compile_spec = manager._compile
    monkeypatch.setattr(manager, "_compile", lambda spec: gate.wait(120) and compile_spec(spec))
    regex = r"(red|green|blue)-[0-9]{2}"
    engine.add_request("plain", "Once upon a time", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                       stream=False)
    so = StructuredOutputsParams(regex=regex)
    engine.add_request("so", "A color code:", SamplingParams(temperature=0, max_tokens=12, structured_outputs=so),
                       stream=False)
    waiting = engine.core.requests["so"]
    done: dict[str, list] = {}
    while "plain" not in done:
        done.update({o.request_id: o.outputs for o in engine.step() if o.finished})
        assert waiting.status == RequestStatus.WAITING_FOR_FSM and waiting.num_output_tokens == 0
    assert len(done["plain"][0].token_ids) == 6
    gate.set()
    done.update(run(engine))
    assert re.fullmatch(regex, done["so"][0].text) and done["so"][0].finish_reason == "stop"


def test_preemption_and_chunked_prefill_keep_outputs_valid(engine) -> None:
    preempted_before = engine.get_stats().num_preemptions
    phone = r"[0-9]{3}(-[0-9]{3}){2}"
    for i in range(3):
        so = StructuredOutputsParams(regex=phone) if i % 2 else StructuredOutputsParams(json=NUMBERS,
                                                                                         disable_any_whitespace=True)
        engine.add_request(f"r{i}", "Here are some numbers: " * (2 + i), SamplingParams(
            temperature=0.8, seed=i, max_tokens=24, structured_outputs=so), stream=False)
    deferred = []  # steps left in flight with their masks still filling on the mask thread
    preemptions: dict[str, int] = {}
    done = run(engine, check=lambda: (matchers_in_step(engine),
                                      deferred.append(getattr(engine.core._inflight, "finish", None) is not None)),
               preemptions=preemptions)
    assert engine.get_stats().num_preemptions > preempted_before
    # each request's count (vllm:request_num_preemptions) came with its outputs and adds up to the engine's
    assert sum(preemptions.values()) == engine.get_stats().num_preemptions - preempted_before
    assert any(deferred)  # async scheduling: sampling waited for a mask filled while the host built the next step
    for i in range(3):
        (out,) = done[f"r{i}"]
        assert out.finish_reason == "stop", out
        if i % 2:
            assert re.fullmatch(phone, out.text)
        else:
            jsonschema.validate(json.loads(out.text), NUMBERS)
    assert engine.core.structured.num_live == 0


def test_n_sequences_each_follow_the_grammar(engine) -> None:
    regex = r"(red|green|blue|black|white)( (red|green|blue|black|white)){3}"
    engine.add_request("n", "Colors:", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=16,
                                                      structured_outputs=StructuredOutputsParams(regex=regex)),
                       stream=False)
    outs = run(engine, check=lambda: matchers_in_step(engine))["n"]
    assert len(outs) == 3 and all(re.fullmatch(regex, o.text) for o in outs)
    assert len({o.text for o in outs}) > 1  # sampled independently, each under its own matcher
