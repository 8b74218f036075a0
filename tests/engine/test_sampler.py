import math

import pytest
import torch

from slicelm.engine.sampler import Sampler, SamplingMetadata, make_generator
from slicelm.sampling_params import SamplingParams

CPU = torch.device("cpu")


def run(logits, params, outputs=None, prompts=None, generators=None, eos=frozenset(), device=CPU):
    b, v = logits.shape
    meta = SamplingMetadata.build(
        params,
        prompts or [[] for _ in range(b)],
        outputs or [[] for _ in range(b)],
        generators or [None] * b,
        vocab_size=v,
        device=device,
        eos_token_ids=eos,
    )
    return Sampler()(logits.to(device), meta)


def test_greedy_is_argmax_in_mixed_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 100)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)] * 3
    before = logits.clone()
    out = run(logits, params)
    assert torch.equal(logits, before)  # input untouched
    assert out.sampled_token_ids.dtype == torch.int64 and out.sampled_token_ids.shape == (6,)
    assert torch.equal(out.sampled_token_ids[0::2], logits[0::2].argmax(-1))
    assert out.logprobs is None and out.ranks is None
    all_greedy = run(logits, [SamplingParams(temperature=0.0)] * 6)
    assert torch.equal(all_greedy.sampled_token_ids, logits.argmax(-1))


@pytest.mark.parametrize("kw", [{"top_k": 1}, {"top_p": 1e-6}, {"top_k": 1, "top_p": 0.5, "min_p": 0.1}])
def test_truncation_to_one_token_equals_greedy(kw):
    torch.manual_seed(1)
    logits = torch.randn(64, 300) * 3
    out = run(logits, [SamplingParams(temperature=1.3, **kw)] * 64)
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))


def _chi_square(counts: torch.Tensor, probs: torch.Tensor, n: int) -> float:
    expected = probs * n
    keep = expected > 0
    assert counts[~keep].sum() == 0, "sampled a token of probability 0"
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


def _draw(logits_row, params, n):
    torch.manual_seed(1234)
    out = run(logits_row.expand(n, -1).contiguous(), [params] * n)
    return torch.bincount(out.sampled_token_ids, minlength=logits_row.numel()).double()


def test_temperature_distribution_matches_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0])
    n = 40000
    counts = _draw(logits, SamplingParams(temperature=0.7), n)
    probs = torch.softmax(logits.double() / 0.7, -1)
    # 5 degrees of freedom: P(chi2 > 25) < 2e-4
    assert _chi_square(counts, probs, n) < 25.0
    # and it can fail: the untempered softmax is far off
    assert _chi_square(counts, torch.softmax(logits.double(), -1), n) > 100.0


def test_top_k_top_p_min_p_distribution_matches_reference():
    logits = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.5, 0.2, -1.0, -3.0])
    n = 40000
    # reference: top-k=5 keeps 5, then top-p=0.9 on the renormalized probs
    p = torch.softmax(logits.double(), -1)[:5]
    p = p / p.sum()
    cum_before = torch.cumsum(p, 0) - p
    keep = cum_before < 0.9
    ref = torch.zeros(8, dtype=torch.float64)
    ref[:5] = torch.where(keep, p, 0)
    ref = ref / ref.sum()
    counts = _draw(logits, SamplingParams(top_k=5, top_p=0.9), n)
    assert _chi_square(counts, ref, n) < 30.0
    # min-p: tokens below 0.2 * max prob are dropped
    p = torch.softmax(logits.double(), -1)
    ref = torch.where(p >= 0.2 * p.max(), p, 0)
    ref = ref / ref.sum()
    counts = _draw(logits, SamplingParams(min_p=0.2), n)
    assert int((ref > 0).sum()) < 8
    assert _chi_square(counts, ref, n) < 30.0


def test_seeded_request_is_independent_of_batch():
    torch.manual_seed(7)
    v, steps = 500, 12
    target = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    step_logits = [torch.randn(8, v) * 2 for _ in range(steps)]

    def sequence(alone: bool, seed: int, row: int) -> list[int]:
        g_target = make_generator(seed, CPU)
        others = [make_generator(99 + i, CPU) if i % 2 else None for i in range(8)]
        toks = []
        for logits in step_logits:
            torch.manual_seed(len(toks) + 1000 * row)  # perturb the batched (unseeded) draw
            if alone:
                out = run(logits[row : row + 1], [target], generators=[g_target])
                toks.append(int(out.sampled_token_ids[0]))
            else:
                params = [SamplingParams(temperature=0.5 + 0.1 * i, seed=99 + i if i % 2 else None)
                          for i in range(8)]
                params[row] = target
                gens = list(others)
                gens[row] = g_target
                out = run(logits, params, generators=gens)
                toks.append(int(out.sampled_token_ids[row]))
        return toks

    alone = sequence(True, 1234, 5)
    assert sequence(False, 1234, 5) == alone
    assert sequence(True, 1234, 5) == alone
    assert sequence(True, 4321, 5) != alone  # a different seed changes the tokens


def test_seed_without_generator_rejected():
    with pytest.raises(ValueError, match="seed"):
        run(torch.randn(1, 10), [SamplingParams(seed=1)])


def _naive_penalties(logits, prompt, output, p: SamplingParams):
    logits = logits.clone().double()
    for tok in set(prompt) | set(output):
        x = logits[tok]
        logits[tok] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
    for tok in set(output):
        logits[tok] -= p.frequency_penalty * output.count(tok) + p.presence_penalty
    return logits


def test_penalties_match_naive_reference():
    torch.manual_seed(3)
    v = 40
    logits = torch.randn(4, v) * 3
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, presence_penalty=1.5, frequency_penalty=-0.7),
        SamplingParams(temperature=0.0, repetition_penalty=0.8, presence_penalty=-1.0, frequency_penalty=2.0),
        SamplingParams(temperature=0.0),
    ]
    prompts = [[1, 2, 3, 3], [5, 6], [7, 8, 9, 10, 11], [0]]
    outputs = [[3, 4, 4], [6, 6, 12, 13, 13, 13], [10, 20, 20], []]
    meta = SamplingMetadata.build(params, prompts, outputs, [None] * 4, v, CPU)
    from slicelm.engine.sampler import apply_penalties

    got = apply_penalties(logits.clone(), meta)
    for i in range(4):
        ref = _naive_penalties(logits[i], prompts[i], outputs[i], params[i])
        torch.testing.assert_close(got[i].double(), ref, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got, logits)
    out = run(logits, params, outputs=outputs, prompts=prompts)
    assert torch.equal(out.sampled_token_ids, got.argmax(-1))


def test_no_penalty_work_when_unused():
    meta = SamplingMetadata.build([SamplingParams()] * 2, [[1], [2]], [[3], []], [None] * 2, 10, CPU)
    assert meta.no_penalties and meta.prompt_token_ids is None and meta.output_token_ids is None
    assert meta.top_k is None and meta.top_p is None and meta.min_p is None
    assert meta.min_tokens_rows is None and meta.logit_bias_rows is None and meta.max_num_logprobs is None


def test_logit_bias_forces_and_bans_tokens():
    torch.manual_seed(4)
    logits = torch.randn(16, 50)
    low = logits.argmin(-1)
    params = [SamplingParams(temperature=t, logit_bias={int(low[i]): 100}) for i, t in
              enumerate([0.0, 1.0] * 8)]
    out = run(logits, params)
    assert torch.equal(out.sampled_token_ids, low)
    top = logits.argmax(-1)
    params = [SamplingParams(temperature=0.0, logit_bias={int(top[i]): -100}) for i in range(16)]
    out = run(logits, params)
    assert not (out.sampled_token_ids == top).any()
    with pytest.raises(ValueError, match="logit_bias"):
        run(logits, [SamplingParams(logit_bias={50: 1.0})] * 16)


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(3, 10)
    logits[:, 2] = 10.0  # eos most likely
    logits[:, 7] = 9.0  # a stop token id next
    logits[:, 4] = 8.0
    params = [SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[7])] * 3
    outputs = [[1], [1, 1], [1, 1, 1]]
    out = run(logits, params, outputs=outputs, eos={2})
    assert out.sampled_token_ids.tolist() == [4, 4, 2]
    # eos from the generation config, recorded on the params
    p = SamplingParams(temperature=0.0, min_tokens=2)
    p.update_from_generation_config({}, model_eos_token_id=2)
    assert run(logits[:1], [p]).sampled_token_ids.tolist() == [7]


def test_logprobs_are_raw_log_softmax_with_ranks():
    torch.manual_seed(5)
    logits = torch.randn(5, 64) * 2
    params = [
        SamplingParams(temperature=0.5, logprobs=3, repetition_penalty=1.5, logit_bias={1: 50}),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=2.0, top_k=10),
        SamplingParams(temperature=1.0, logprobs=5),
        SamplingParams(temperature=0.0, logprobs=2, logit_bias={0: 100}),
    ]
    out = run(logits, params, prompts=[[1, 2]] * 5, outputs=[[3]] * 5)
    ref = torch.log_softmax(logits, -1)
    k = 5
    assert out.logprobs.shape == (5, k + 1) and out.logprob_token_ids.shape == (5, k + 1)
    sampled = out.sampled_token_ids
    assert torch.equal(out.logprob_token_ids[:, 0], sampled)
    assert sampled[0] == 1 and sampled[4] == 0
    torch.testing.assert_close(out.logprobs[:, 0], ref.gather(1, sampled[:, None])[:, 0])
    top_lp, top_ids = ref.topk(k, -1)
    assert torch.equal(out.logprob_token_ids[:, 1:], top_ids)
    torch.testing.assert_close(out.logprobs[:, 1:], top_lp)
    for i in range(5):
        order = ref[i].argsort(descending=True).tolist()
        assert int(out.ranks[i]) == order.index(int(sampled[i])) + 1
    only_sampled = run(logits[1:2], [params[1]])
    assert only_sampled.logprobs.shape == (1, 1) and int(only_sampled.ranks[0]) == 1


def test_allowed_token_ids_and_logprob_token_ids():
    """allowed_token_ids restrict sampling (greedy and random rows); logprob_token_ids replace a row's top-k
    with the raw logprobs of those ids (other rows keep their top-k)."""
    torch.manual_seed(6)
    logits = torch.randn(4, 64)
    params = [
        SamplingParams(temperature=0.0, allowed_token_ids=[7], logprob_token_ids=[3, 50, 9]),
        SamplingParams(temperature=1.0, allowed_token_ids=[1, 2]),
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=0.0, logprob_token_ids=[11]),
    ]
    out = run(logits, params)
    ref = torch.log_softmax(logits, -1)
    sampled = out.sampled_token_ids.tolist()
    assert sampled[0] == 7 and sampled[1] in (1, 2) and sampled[2:] == logits[2:].argmax(-1).tolist()
    assert out.logprob_token_ids.shape == (4, 4)  # the widest request: 3 chosen ids
    assert out.logprob_token_ids[0, :4].tolist() == [7, 3, 50, 9]
    torch.testing.assert_close(out.logprobs[0, :4], ref[0, [7, 3, 50, 9]])
    assert out.logprob_token_ids[3, :2].tolist() == [sampled[3], 11]
    torch.testing.assert_close(out.logprobs[3, 1], ref[3, 11])
    assert out.logprob_token_ids[2, 1:3].tolist() == ref[2].topk(2).indices.tolist()
    with pytest.raises(ValueError, match="allowed_token_ids is not None and empty!"):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(ValueError, match="logprobs must equal len"):
        SamplingParams(logprobs=5, logprob_token_ids=[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_seeded_and_greedy():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    logits = torch.randn(8, 32000)
    params = [SamplingParams(temperature=0.0)] + [SamplingParams(seed=i, top_p=0.9) for i in range(7)]
    a = run(logits, params, generators=[None] + [make_generator(i, dev) for i in range(7)], device=dev)
    b = run(logits[3:4], [params[3]], generators=[make_generator(2, dev)], device=dev)
    assert a.sampled_token_ids.device.type == "cuda"
    assert int(a.sampled_token_ids[0]) == int(logits[0].argmax())
    assert int(a.sampled_token_ids[3]) == int(b.sampled_token_ids[0])
    assert not math.isnan(float(a.sampled_token_ids.float().sum()))
