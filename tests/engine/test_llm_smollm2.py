"""The offline API on the real bundled SmolLM2 (GGUF Q4_1): logits, answers, sampling, n > 1, errors."""

from __future__ import annotations

import pytest
import torch
from utils_parity import assert_matches_transformers_gguf

from slicelm import LLM, SamplingParams
from slicelm.engine.request import EmptyPromptError, PromptTooLongError
from slicelm.sampling_params import SamplingParamsError

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("smollm2-135m-instruct", max_model_len=512, max_num_seqs=16)


@pytest.mark.slow
def test_logits_match_transformers_gguf_load(llm, monkeypatch):
    texts = ("The capital of France is", "def fibonacci(n):\n    ", "Hello")
    assert_matches_transformers_gguf(llm, "smollm2-135m-instruct", list(texts), monkeypatch)


def test_chat_answer_contains_paris(llm):
    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # ended on <|im_end|>


def test_seeded_sampling_is_reproducible_across_batches(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(["Once upon a time"], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True) for n in (3, 9, 20)]
    mixed = llm.generate(
        ["The weather today", "Once upon a time", "1, 2, 3,", "In a hole in the ground"],
        [others[0], params, others[1], others[2]],
        use_tqdm=False,
    )
    assert mixed[1].outputs[0].token_ids == alone
    again = llm.generate(["Once upon a time"] * 3, params, use_tqdm=False)
    assert all(o.outputs[0].token_ids == alone for o in again)


def test_n_samples_are_distinct_and_share_prompt_blocks(llm):
    engine = llm.engine
    kv = engine.scheduler.kv_cache
    tok = llm.get_tokenizer()
    prompt = tok.encode("Write a list of ten fruits, one per line, with a short note about each of them: " * 2)
    assert 32 < len(prompt) < 48  # two full blocks of 16 and a partial one
    kv.reset_prefix_cache()
    params = SamplingParams(n=4, temperature=1.0, max_tokens=8, ignore_eos=True, seed=7)
    engine.add_request("n4", {"prompt_token_ids": prompt}, params, stream=False)
    free_before = kv.num_free_blocks
    engine.step()  # prefill of the four sequences, all in one step
    used = free_before - kv.num_free_blocks
    assert used == 2 + 4  # the two full prompt blocks once, plus one partial block per sample
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    texts = [c.text for c in outs[0].outputs]
    assert len(texts) == 4 and len(set(texts)) == 4
    assert [c.index for c in outs[0].outputs] == [0, 1, 2, 3]
    assert kv.usage() == 0.0


def test_stop_strings_and_logprobs(llm):
    params = SamplingParams(temperature=0, max_tokens=32, stop=["Paris"], logprobs=3)
    out = llm.chat(QUESTION, params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "Paris"
    assert "Paris" not in out.text and out.text.strip()
    assert len(out.logprobs) == len(out.token_ids)
    for tid, entry in zip(out.token_ids, out.logprobs):
        assert tid in entry and entry[tid].rank == 1  # greedy: the chosen token ranks first
        assert 3 <= len(entry) <= 4
    inc = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=32, stop=["Paris"],
                                            include_stop_str_in_output=True), use_tqdm=False)
    assert inc[0].outputs[0].text.endswith("Paris")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(SamplingParamsError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_are_rejected_and_leave_nothing_behind(llm):
    engine = llm.engine
    with pytest.raises(PromptTooLongError, match="max_model_len"):
        llm.generate([{"prompt_token_ids": [1] * 600}], use_tqdm=False)
    with pytest.raises(EmptyPromptError, match="empty"):
        llm.generate([""], use_tqdm=False)
    with pytest.raises(EmptyPromptError):
        llm.generate([{"prompt_token_ids": []}], use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate([{"prompt_token_ids": [10**9]}], use_tqdm=False)
    # a bad prompt in the middle of a batch: the good ones before it are withdrawn too
    with pytest.raises(PromptTooLongError):
        llm.generate(["fine", {"prompt_token_ids": [1] * 600}], use_tqdm=False)
    assert not engine.has_unfinished_requests() and engine.scheduler.kv_cache.usage() == 0.0


def test_unknown_architecture_lists_supported_ones(tmp_path):
    import json

    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "vocab_size": 8}))
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"FooForCausalLM.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        LLM(str(tmp_path), skip_tokenizer_init=True)


def test_missing_and_corrupt_weights_are_clear_errors(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="safetensors"):
        LLM(str(tmp_path), skip_tokenizer_init=True)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        LLM(str(tmp_path), skip_tokenizer_init=True)
    with pytest.raises(ValueError, match=r"does not exist|not found|no such"):
        LLM(str(tmp_path / "nope"))


def test_async_scheduling_gives_the_same_results(llm):
    """Overlapped scheduling (reading step N back after launching N+1) changes nothing a user sees:
    EOS, stop strings, max_tokens, logprobs, n > 1 and seeds all land exactly as without it."""
    fast = LLM("smollm2-135m-instruct", max_model_len=512, max_num_seqs=16, async_scheduling=True)
    assert fast.engine.async_scheduling and not llm.engine.async_scheduling
    cases = [
        (QUESTION, SamplingParams(temperature=0, max_tokens=40, logprobs=2)),  # ends on EOS
        (QUESTION, SamplingParams(temperature=0, max_tokens=40, stop=["France"])),
        (QUESTION, SamplingParams(temperature=0, max_tokens=3)),
        (QUESTION, SamplingParams(temperature=0.8, seed=5, n=3, max_tokens=12)),
        (QUESTION, SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3, presence_penalty=0.5)),
    ]
    for messages, params in cases:
        a = llm.chat(messages, params, use_tqdm=False)[0]
        b = fast.chat(messages, params, use_tqdm=False)[0]
        for x, y in zip(a.outputs, b.outputs):
            assert (x.token_ids, x.text, x.finish_reason, x.stop_reason) == (y.token_ids, y.text, y.finish_reason,
                                                                                y.stop_reason)
            assert (x.logprobs is None) == (y.logprobs is None)
            if x.logprobs:
                assert [sorted(e) for e in x.logprobs] == [sorted(e) for e in y.logprobs]
    assert fast.engine.scheduler.kv_cache.usage() == 0.0 and not fast.engine.scheduler.running
