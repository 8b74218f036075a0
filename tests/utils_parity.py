"""Random-weight decoder models vs transformers (CPU fp32): build the HF model, run our model through
the paged cache step by step (``run_schedule``), and greedy-generate with transformers for the engine
tests (``hf_greedy``: tokens and their logprobs)."""

from __future__ import annotations

import torch
import transformers
from utils_paged import PagedBatch, make_kv_caches

TOL = 1e-4

# Engine tests: 8 prompts of mixed lengths; four share a 34-token prefix (two full blocks of 16) for prefix hits.
_g = torch.Generator().manual_seed(1)
_SHARED = torch.randint(0, 512, (34,), generator=_g).tolist()
ENGINE_PROMPTS = [torch.randint(0, 512, (n,), generator=_g).tolist() for n in (5, 17, 40, 3)] + [
    _SHARED + torch.randint(0, 512, (n,), generator=_g).tolist() for n in (1, 6, 13, 20)
]
ENGINE_MODES = {
    "plain": {},
    "chunked_prefill": {"max_num_batched_tokens": 16},
    "prefix_hits": {},  # generate twice: the second pass hits the cache
    "preemption": {"num_gpu_blocks_override": 10, "max_model_len": 96},
    # the device path's overlap of step N+1's scheduling with step N, exercised on the CPU
    "async_preemption_chunked": {"async_scheduling": True, "num_gpu_blocks_override": 10, "max_model_len": 96,
                                 "max_num_batched_tokens": 24},
}


def build_hf(cls_name: str, config_kwargs: dict, seed: int = 0, std: float = 0.08,
             model_cls: str | None = None) -> tuple[transformers.PreTrainedModel, dict]:
    """A transformers model with every weight random (norms around 1, or around 0 for Gemma's 1+w norms)."""
    config = getattr(transformers, cls_name)(**config_kwargs)
    torch.manual_seed(seed)
    default_cls = cls_name.replace("TextConfig", "ForCausalLM").replace("Config", "ForCausalLM")
    cls = getattr(transformers, model_cls or default_cls)
    hf = cls._from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    gemma = "gemma" in cls_name.lower()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if gemma else 1.0) + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return hf, config.to_dict()


def save_random_decoder(cls_name: str, path, **config: object) -> str:
    """A transformers decoder (``Qwen3Config`` ...) with random weights (norms around 1, the rest 0.06 std), saved
    in ``path``: the GPU tests' models."""
    cfg = getattr(transformers, cls_name)(**config)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.06 * torch.randn_like(p))
    model.save_pretrained(path)
    return str(path)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (torch.linalg.norm(out.double() - ref.double()) / torch.linalg.norm(ref.double())).item()


def make_tokens(lens: list[int], seed: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


@torch.no_grad()
def hf_logits(hf: transformers.PreTrainedModel, seqs: list[list[int]]) -> list[torch.Tensor]:
    return [hf(torch.tensor([s])).logits[0].float() for s in seqs]


@torch.no_grad()
def run_schedule(model: torch.nn.Module, seqs: list[list[int]], refs: list[torch.Tensor],
                 schedule: list[list[int]], block_size: int, tol: float = TOL) -> None:
    """Feed ``schedule[step][i]`` new tokens of sequence i per step (packed, one forward per step);
    every produced logits row must match transformers' full-sequence logits."""
    batch = PagedBatch([len(s) for s in seqs], block_size, first_block=1, shuffle_seed=block_size)
    caches = make_kv_caches(
        model.num_layers, batch.num_blocks, block_size, model.num_kv_heads, model.head_dim, fill=float("nan")
    )
    assert tuple(caches[0].shape) == model.kv_cache_shape(batch.num_blocks, block_size)
    vocab = model.vocab_size
    for chunk_sizes in schedule:
        starts = list(batch.num_computed)
        step = batch.step([s[c : c + n] for s, c, n in zip(seqs, starts, chunk_sizes)])
        logits = model.compute_logits(model(step.input_ids, step.positions, caches, step.meta))
        assert logits.dtype == torch.float32 and logits.shape == (step.meta.num_tokens, vocab)
        qsl = step.meta.query_start_loc_cpu
        for i, (c, n) in enumerate(zip(starts, chunk_sizes)):
            assert n > 0, "every sequence in a step has new tokens (as the runner builds them)"
            err = rel_err(logits[qsl[i] : qsl[i + 1]], refs[i][c : c + n])
            assert err <= tol, f"seq {i} rows {c}:{c + n}: rel err {err:.2e}"
    assert batch.num_computed == [len(s) for s in seqs]


@torch.no_grad()
def hf_greedy(hf: transformers.PreTrainedModel, prompts: list[list[int]],
              new_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
    """transformers' greedy continuations and the log-probability of each chosen token."""
    tokens, logprobs = [], []
    for prompt in prompts:
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=0, output_scores=True,
                          return_dict_in_generate=True)
        ids = out.sequences[0, len(prompt):].tolist()
        lps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, ids)]
        tokens.append(ids)
        logprobs.append(lps)
    return tokens, logprobs


def assert_matches_transformers_gguf(llm, model_name: str, texts: list[str], monkeypatch) -> None:
    """The engine's model gives transformers' logits on the same GGUF file (transformers' own GGUF loader)."""
    import transformers.modeling_utils as modeling_utils
    from utils_paged import PagedBatch, make_kv_caches

    from slicelm.loader.model_files import resolve_model

    monkeypatch.setattr(modeling_utils, "is_accelerate_available", lambda: True)  # CPU load needs no accelerate
    path = resolve_model(model_name).path
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    tok = llm.get_tokenizer()
    prompts = [tok.encode(t) for t in texts]
    model = llm.engine.worker.model
    batch = PagedBatch([len(p) for p in prompts], block_size=16)
    kv = make_kv_caches(model.num_layers, batch.num_blocks, 16, model.num_kv_heads, model.head_dim)
    step = batch.prefill(prompts)
    with torch.no_grad():
        ours = model.compute_logits(model(step.input_ids, step.positions, kv, step.meta))
        offset = 0
        for p in prompts:
            ref = hf(torch.tensor([p])).logits[0].float()
            assert rel_err(ours[offset : offset + len(p)], ref) < 1e-4
            offset += len(p)


def prompts_with_shared_prefix(lens: tuple[int, ...], vocab: int, seed: int = 3) -> list[list[int]]:
    """Random prompts of ``lens`` plus four more that share a 48-token prefix (prefix-cache hits)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, vocab, (48,), generator=g).tolist()
    ps = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]
    return ps + [shared + p[:7] for p in ps[:4]]


def greedy_ids(llm, prompts: list[list[int]], n: int = 32) -> list[list[int]]:
    from slicelm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def free_cuda() -> None:
    """Call after dropping every reference to an engine: its tensors and CUDA graphs go."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def assert_engine_matches(llm, prompts: list[list[int]], reference: list[list[int]], n: int, label: str = "") -> None:
    """Greedy output equals ``reference`` twice: as computed, then again from the prefix cache; when the
    engine was told to preempt (a tiny KV cache), it did."""
    got = greedy_ids(llm, prompts, n)
    again = greedy_ids(llm, prompts, n)  # second pass: prefix-cache hits
    assert llm.engine.scheduler.kv_cache.prefix_cache_hits > 0
    for i, (g, a, r) in enumerate(zip(got, again, reference)):
        assert g == r, f"{label}prompt {i} (len {len(prompts[i])}) differs from the CPU reference"
        assert a == r, f"{label}prompt {i} differs from the reference on a prefix-cache hit"
    if llm.engine.worker.args.num_gpu_blocks_override is not None:
        assert llm.engine.get_stats().num_preemptions > 0
