"""Each quantized format, written by its own rules (or by the compressed-tensors package), served by the engine
on the CPU in float32: the same greedy tokens and logprobs as transformers running the dequantized weights."""

from __future__ import annotations

import pytest
import torch
from utils_quant import (
    base_model,
    reference_generate,
    write_awq,
    write_checkpoint,
    write_compressed_tensors,
    write_fp8,
    write_gptq,
)

from slicelm import LLM, SamplingParams

NEW_TOKENS = 10
_g = torch.Generator().manual_seed(3)
PROMPTS = [torch.randint(0, 512, (n,), generator=_g).tolist() for n in (7, 23)]

FORMATS = {
    "awq_g64": lambda hf, p: write_awq(hf, p, group=64),
    "awq_keep_down_proj": lambda hf, p: write_awq(hf, p, group=128, keep=("mlp.down_proj",)),
    "gptq_4bit_sym": lambda hf, p: write_gptq(hf, p, bits=4, group=64, sym=True),
    "gptq_4bit_asym_act_order": lambda hf, p: write_gptq(hf, p, bits=4, group=64, sym=False, desc_act=True),
    "gptq_8bit_channel_v2": lambda hf, p: write_gptq(hf, p, bits=8, group=-1, sym=False, v2=True),
    "gptq_4bit_g32_v2": lambda hf, p: write_gptq(hf, p, bits=4, group=32, sym=False, v2=True),
    "ct_w4a16_asym_g64": lambda hf, p: write_compressed_tensors(hf, p, "w4a16"),
    "ct_w8a16_channel": lambda hf, p: write_compressed_tensors(hf, p, "w8a16"),
    "ct_fp8_w8a8_channel": lambda hf, p: write_compressed_tensors(hf, p, "fp8"),
    "fp8_block128": lambda hf, p: write_fp8(hf, p, block=(128, 128)),
    "fp8_per_tensor": lambda hf, p: write_fp8(hf, p, block=None),
}


@pytest.fixture(scope="module")
def hf():
    return base_model()


def _ours(path, **kwargs) -> list[tuple[list[int], list[float]]]:
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", max_num_seqs=4, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    result = []
    for o in outs:
        c = o.outputs[0]
        result.append((list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]))
    return result


def _compare(got, expected) -> None:
    for i, ((tokens, lps), (ref_tokens, ref_lps)) in enumerate(zip(got, expected)):
        assert tokens == ref_tokens, f"prompt {i}: {tokens} != transformers {ref_tokens}"
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), rtol=0, atol=2e-4)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_format_matches_transformers_on_dequantized_weights(hf, fmt, tmp_path):
    deq = FORMATS[fmt](hf, tmp_path)
    expected = reference_generate(hf, deq, PROMPTS, NEW_TOKENS)
    _compare(_ours(tmp_path), expected)


def test_online_fp8_of_a_16_bit_checkpoint(hf, tmp_path):
    """--quantization fp8: per-channel e4m3 weights computed at load."""
    write_checkpoint(hf, tmp_path, hf.state_dict(), None)
    deq = {}
    for name, module in hf.named_modules():
        if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear):
            w = module.weight.detach()
            s = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / 448.0
            deq[name] = (w / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    expected = reference_generate(hf, deq, PROMPTS, NEW_TOKENS)
    _compare(_ours(tmp_path, quantization="fp8"), expected)
