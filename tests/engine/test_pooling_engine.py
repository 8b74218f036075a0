"""Pooling through ``LLMEngine``: cross-encoders (random XLM-R / BERT heads) vs transformers, MiniLM batching,
task / token-type / length checks."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from utils_models import minilm_dir, write_random_cross_encoder

from slicelm.config import EngineArgs
from slicelm.engine.engine import LLMEngine
from slicelm.engine.request import PoolingOutput, PromptTooLongError
from slicelm.pooling_params import PoolingParams

PAIRS = [
    ("what is the capital of France?", "Paris is the capital and largest city of France."),
    ("hi", "hello"),
    ("how do plants make food?", "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen; "
     "it happens in the chloroplasts of leaf cells."),
    ("a", "b c d e f g h i j k l m n o p"),
    ("short query", "x"),
]


def run_all(engine: LLMEngine, prompts: list, params: PoolingParams) -> tuple[list[torch.Tensor], list[int]]:
    """Adds every prompt, steps to the end; returns the outputs in order and the batch size of each step."""
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    outs: dict[str, PoolingOutput] = {}
    batches = []
    while engine.has_unfinished_requests():
        step = engine.step()
        batches.append(len(step))
        outs.update({o.request_id: o for o in step})
    return [outs[str(i)].data for i in range(len(prompts))], batches


def hf_scores(model: transformers.PreTrainedModel, prompts: list[dict]) -> torch.Tensor:
    pad = model.config.pad_token_id
    n = max(len(p["prompt_token_ids"]) for p in prompts)
    ids = torch.full((len(prompts), n), pad, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        k = len(p["prompt_token_ids"])
        ids[i, :k] = torch.tensor(p["prompt_token_ids"])
        mask[i, :k] = 1
        if "token_type_ids" in p:
            types[i, :k] = torch.tensor(p["token_type_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    return torch.sigmoid(logits.float())


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_cross_encoder_engine_matches_transformers(tmp_path: Path, kind: str) -> None:
    hf = write_random_cross_encoder(tmp_path, kind)
    engine = LLMEngine(EngineArgs(model=str(tmp_path), device="cpu"))
    assert engine.model_config.task == "score"
    prompts = []
    for a, b in PAIRS:
        ids, types = engine.tokenizer.encode_pair(a, b)
        assert ids[0] == 101 and ids.count(102) == 2  # [CLS] a [SEP] b [SEP]
        prompts.append({"prompt_token_ids": ids} if kind == "xlmr" else
                       {"prompt_token_ids": ids, "token_type_ids": types})
    assert len({len(p["prompt_token_ids"]) for p in prompts}) == len(prompts)  # mixed lengths
    ours, batches = run_all(engine, prompts, PoolingParams(task="score"))
    assert batches == [len(PAIRS)]  # one packed step
    ref = hf_scores(hf, prompts)
    got = torch.stack(ours)
    assert got.shape == ref.shape == (len(PAIRS), 1)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel <= 1e-4, rel
    raw, _ = run_all(engine, prompts, PoolingParams(task="score", use_activation=False))
    assert torch.allclose(torch.sigmoid(torch.stack(raw)), got, atol=1e-6)
    stats = engine.get_stats().pooling
    assert stats is not None and stats.num_multi_request_steps >= 2 and stats.max_batch_requests == len(PAIRS)


def test_cross_encoder_rejects_bad_requests(tmp_path: Path) -> None:
    write_random_cross_encoder(tmp_path, "xlmr")
    engine = LLMEngine(EngineArgs(model=str(tmp_path), device="cpu"))
    ids, types = engine.tokenizer.encode_pair("a question", "an answer")
    with pytest.raises(ValueError, match="task"):
        engine.add_request("e", {"prompt_token_ids": ids}, PoolingParams(task="embed"))
    with pytest.raises(ValueError, match="token_type_ids"):  # XLM-R has one token type; BERT's pair ids are 0/1
        engine.add_request("t", {"prompt_token_ids": ids, "token_type_ids": types}, PoolingParams(task="score"))
    assert engine.model_config.max_model_len == 128  # 130 positions, the first two (padding_idx + 1) unused
    with pytest.raises(PromptTooLongError):
        engine.add_request("long", [5] * 129, PoolingParams(task="score"))
    assert not engine.has_unfinished_requests()
    engine.add_request("full", [5] * 128, PoolingParams(task="score"))
    engine.step()
    engine.add_request("ok", {"prompt_token_ids": ids}, PoolingParams(task="score"))
    (out,) = engine.step()
    assert out.finished and 0.0 <= float(out.data[0]) <= 1.0


@pytest.fixture(scope="module")
def minilm() -> LLMEngine:
    minilm_dir()
    return LLMEngine(EngineArgs(model="all-minilm-l6-v2", device="cpu"))


def test_minilm_batched_equals_one_at_a_time(minilm: LLMEngine) -> None:
    texts = [f"sentence number {i} about {'the sea ' * (i % 7)}and more" for i in range(64)]
    batched, batches = run_all(minilm, texts, PoolingParams())
    assert batches[0] == 64 and len(batches) == 1
    for i, t in enumerate(texts[:16]):
        (single,), _ = run_all(minilm, [t], PoolingParams())
        assert torch.allclose(single, batched[i], atol=1e-5, rtol=0), (i, (single - batched[i]).abs().max())


def test_minilm_token_budget_splits_steps() -> None:
    minilm_dir()
    engine = LLMEngine(EngineArgs(model="all-minilm-l6-v2", device="cpu", max_num_batched_tokens=256,
                                  max_num_seqs=8))
    texts = ["word " * 60] * 10  # 62 tokens each: 4 fit in 256 tokens
    _, batches = run_all(engine, texts, PoolingParams())
    assert max(batches) <= 4 and sum(batches) == 10 and batches[0] == 4


def test_minilm_length_and_truncation(minilm: LLMEngine) -> None:
    max_len = minilm.model_config.max_model_len
    assert max_len == 256  # sentence_bert_config.json max_seq_length
    long_ids = minilm.tokenizer.encode("hello " * 400)
    with pytest.raises(PromptTooLongError):
        minilm.add_request("long", long_ids, PoolingParams())
    (out,), _ = run_all(minilm, [long_ids], PoolingParams(truncate_prompt_tokens=32))
    assert out.shape == (384,)
    minilm.add_request("t", long_ids, PoolingParams(truncate_prompt_tokens=32))
    (o,) = minilm.step()
    assert o.prompt_token_ids == long_ids[-32:]
    with pytest.raises(ValueError, match="dimensions"):
        minilm.add_request("d", "hi", PoolingParams(dimensions=1000))
    (d,), _ = run_all(minilm, ["hi"], PoolingParams(dimensions=8))
    assert d.shape == (8,) and abs(float(d.norm()) - 1.0) < 1e-5


def test_rag_benchmark_random_models_load(tmp_path: Path) -> None:
    """benchmarks/rag.py --random-models writes checkpoints that transformers and slicelm load alike (tiny shape)."""
    spec = importlib.util.spec_from_file_location("rag_bench", Path(__file__).parents[2] / "benchmarks" / "rag.py")
    rag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rag)
    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=30522,
                 max_position_embeddings=130)
    emb_dir, rr_dir = rag.write_random_models(tmp_path, minilm_dir(), shape=shape)
    assert set(rag.XLMR_SHAPE) == set(shape)
    ids = [101, 2054, 2003, 1996, 3007, 102, 3000, 2003, 1996, 3007, 102]
    emb = LLMEngine(EngineArgs(model=str(emb_dir), device="cpu"))
    rr = LLMEngine(EngineArgs(model=str(rr_dir), device="cpu"))
    assert (emb.model_config.task, rr.model_config.task) == ("embed", "score")
    (e,), _ = run_all(emb, [ids], PoolingParams())
    (r,), _ = run_all(rr, [ids], PoolingParams(task="score"))
    hf_emb = transformers.XLMRobertaModel.from_pretrained(emb_dir, dtype=torch.float32).eval()
    hf_rr = transformers.XLMRobertaForSequenceClassification.from_pretrained(rr_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_e = torch.nn.functional.normalize(hf_emb(input_ids=torch.tensor([ids])).last_hidden_state[0, 0], dim=0)
        ref_r = torch.sigmoid(hf_rr(input_ids=torch.tensor([ids])).logits[0].float())
    assert torch.allclose(e, ref_e, atol=1e-4) and torch.allclose(r, ref_r, atol=1e-4)
    docs, queries = rag.make_corpus(50, 10)
    assert len(docs) == 50 and all(0 <= j < 50 and isinstance(q, str) for q, j in queries)
