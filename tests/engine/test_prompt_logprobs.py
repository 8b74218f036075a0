"""prompt_logprobs from the engine equal transformers' log-softmax at every prompt position, whatever
the engine does on the way (chunked prefill, a prompt whose prefix is cached, preemption)."""

from __future__ import annotations

import pytest
import torch
import transformers

from slicelm import LLM, SamplingParams

VOCAB = 256
CONFIG = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
          "rms_norm_eps": 1e-6, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
_g = torch.Generator().manual_seed(3)
_SHARED = torch.randint(0, VOCAB, (40,), generator=_g).tolist()
PROMPTS = [_SHARED + torch.randint(0, VOCAB, (n,), generator=_g).tolist() for n in (3, 11)] + [
    torch.randint(0, VOCAB, (n,), generator=_g).tolist() for n in (1, 2, 29)
]
K = 3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM._from_config(transformers.LlamaConfig(**CONFIG), attn_implementation="eager",
                                                    dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(path)
    with torch.no_grad():
        expected = [torch.log_softmax(hf(torch.tensor([p])).logits[0].float(), dim=-1) for p in PROMPTS]
    return str(path), expected


def _check(out, prompt: list[int], ref: torch.Tensor, k: int) -> None:
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(prompt) and plp[0] is None
    for pos in range(1, len(prompt)):
        entry, row, tok = plp[pos], ref[pos - 1], prompt[pos]
        assert tok in entry and abs(entry[tok].logprob - row[tok].item()) < 1e-3
        assert entry[tok].rank == int((row > row[tok]).sum()) + 1
        top = row.topk(k)
        for rank, (lp, tid) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
            assert tid in entry and abs(entry[tid].logprob - lp) < 1e-3
            if tid != tok:
                assert entry[tid].rank == rank
        assert len(entry) in (k, k + 1)


@pytest.mark.parametrize("mode", [
    {},
    {"max_num_batched_tokens": 16},  # prompts in chunks
    {"num_gpu_blocks_override": 6, "max_model_len": 96, "max_num_batched_tokens": 32},  # preemption
])
def test_prompt_logprobs_match_transformers(model, mode):
    path, expected = model
    llm = LLM(path, skip_tokenizer_init=True, max_num_seqs=8, **mode)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    plain = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate(prompts[:1], plain, use_tqdm=False)  # caches the shared prefix
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=K, logprobs=1)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, prompt, ref in zip(outs, PROMPTS, expected):
        _check(out, prompt, ref, K)
        assert len(out.outputs[0].token_ids) == 4
    assert not llm.engine.has_unfinished_requests()
    if "num_gpu_blocks_override" in mode:
        assert llm.engine.get_stats().num_preemptions > 0
    # requests without prompt_logprobs still use (and give) no prompt logprobs
    again = llm.generate(prompts[:1], plain, use_tqdm=False)[0]
    assert again.prompt_logprobs is None


def test_prompt_logprobs_zero_gives_the_token_only(model, monkeypatch):
    from slicelm.engine import prompt_logprobs

    monkeypatch.setattr(prompt_logprobs, "ROWS_PER_CHUNK", 8)  # a 29-token prompt in 4 slices
    path, expected = model
    llm = LLM(path, skip_tokenizer_init=True)
    out = llm.generate([{"prompt_token_ids": PROMPTS[4]}],
                       SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    assert all(len(e) == 1 for e in out.prompt_logprobs[1:])
    _check(out, PROMPTS[4], expected[4], 0)
