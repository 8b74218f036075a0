import pytest

from slicelm.sampling_params import SamplingParams, SamplingParamsError, SamplingType

INVALID = [
    ("temperature", -0.1),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_k", -2),
    ("top_k", 2.5),
    ("min_p", -0.01),
    ("min_p", 1.01),
    ("n", 0),
    ("max_tokens", 0),
    ("min_tokens", -1),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0),
    ("frequency_penalty", -3.0),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("logprobs", -1),
    ("logprobs", -2),  # the upper bound is the server's --max-logprobs
    ("prompt_logprobs", -1),
    ("seed", 1.5),
    ("seed", "42"),
    ("logit_bias", {1: 100.5}),
    ("logit_bias", {1: -101}),
    ("logit_bias", {"abc": 1.0}),
    ("logit_bias", {1.5: 1.0}),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("truncate_prompt_tokens", 0),
]


@pytest.mark.parametrize(("name", "value"), INVALID)
def test_invalid_field_named(name, value):
    with pytest.raises(SamplingParamsError) as exc:
        SamplingParams(**{name: value})
    assert exc.value.field == name
    assert name in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_min_tokens_above_max_tokens():
    with pytest.raises(SamplingParamsError, match="min_tokens") as exc:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert "5" in str(exc.value)
    SamplingParams(max_tokens=None, min_tokens=5)  # no limit: fine


def test_prompt_logprobs_accepted():
    assert SamplingParams(prompt_logprobs=0).prompt_logprobs == 0
    assert SamplingParams(prompt_logprobs=5).prompt_logprobs == 5


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.repetition_penalty) == (16, 0, 1.0)
    assert p.stop == [] and p.stop_token_ids == [] and p.logprobs is None
    assert p.skip_special_tokens and p.spaces_between_special_tokens and p.detokenize
    assert p.sampling_type == SamplingType.RANDOM


def test_normalization():
    p = SamplingParams(stop="###", top_k=-1, logit_bias={"7": 5, 3: -1.5}, stop_token_ids=[9])
    assert p.stop == ["###"] and p.top_k == 0
    assert p.logit_bias == {7: 5.0, 3: -1.5}
    assert p.all_stop_token_ids == {9}


def test_sampling_type_and_greedy_reset():
    g = SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.2)
    assert g.sampling_type == SamplingType.GREEDY
    assert (g.top_k, g.top_p, g.min_p) == (0, 1.0, 0.0)
    assert SamplingParams(temperature=1e-6).sampling_type == SamplingType.GREEDY
    assert SamplingParams(seed=3).sampling_type == SamplingType.RANDOM_SEED


def test_clone_is_deep():
    p = SamplingParams(stop=["a"], logit_bias={1: 2.0})
    q = p.clone()
    q.stop.append("b")
    q.logit_bias[2] = 1.0
    assert p.stop == ["a"] and p.logit_bias == {1: 2.0}
    assert q.all_stop_token_ids is not p.all_stop_token_ids


def test_from_optional_ignores_none():
    p = SamplingParams.from_optional(temperature=None, top_p=0.5, max_tokens=None, stop=None, seed=None)
    assert p.temperature == 1.0 and p.top_p == 0.5 and p.max_tokens == 16 and p.stop == []
    with pytest.raises(SamplingParamsError, match="bogus"):
        SamplingParams.from_optional(bogus=1)
    with pytest.raises(SamplingParamsError, match="top_p"):
        SamplingParams.from_optional(top_p=2.0)


def test_update_from_generation_config():
    p = SamplingParams(stop_token_ids=[5])
    p.update_from_generation_config({"eos_token_id": [2, 7]}, model_eos_token_id=2)
    assert p.all_stop_token_ids == {2, 5, 7}
    assert p.stop_token_ids == [5, 7]
    q = SamplingParams(ignore_eos=True)
    q.update_from_generation_config({"eos_token_id": 7}, model_eos_token_id=2)
    assert q.stop_token_ids == [] and q.all_stop_token_ids == {2, 7}
