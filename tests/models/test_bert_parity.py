"""Random-weight BERT / XLM-R encoders and heads vs transformers on packed mixed-length batches (CPU fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from slicelm.layers.pooler import (
    PoolingConfig,
    apply_pooling_params,
    pool,
    read_sentence_transformers_pooling,
)
from slicelm.models.bert import BertEmbeddingModel, BertForSequenceClassification
from slicelm.models.registry import get_model_class
from slicelm.pooling_params import PoolingParams, apply_dimensions

SMALL = dict(
    vocab_size=300,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
LENS = [5, 1, 9, 3, 9]


def _hf(kind: str, num_labels: int | None = None, hidden_act: str = "gelu") -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(**SMALL, type_vocab_size=2, hidden_act=hidden_act, pad_token_id=0)
        cls = transformers.BertModel if num_labels is None else transformers.BertForSequenceClassification
        arch = "BertModel" if num_labels is None else "BertForSequenceClassification"
    else:
        cfg = transformers.XLMRobertaConfig(
            **{**SMALL, "max_position_embeddings": 66},
            type_vocab_size=1,
            hidden_act=hidden_act,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        )
        cls = (
            transformers.XLMRobertaModel
            if num_labels is None
            else transformers.XLMRobertaForSequenceClassification
        )
        arch = "XLMRobertaModel" if num_labels is None else "XLMRobertaForSequenceClassification"
    if num_labels is not None:
        cfg.num_labels = num_labels
    cfg.architectures = [arch]
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    with torch.no_grad():  # perturb everything (LayerNorm gains/biases too) so a wrong mapping shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _batch(kind: str, pairs: bool):
    """Packed inputs for our model + padded inputs for transformers."""
    g = torch.Generator().manual_seed(1)
    pad = 0 if kind == "bert" else 1
    seqs = [torch.randint(3, 300, (n,), generator=g) for n in LENS]
    types = [
        (torch.arange(n) >= (n + 1) // 2).long() if pairs else torch.zeros(n, dtype=torch.long) for n in LENS
    ]
    L = max(LENS)
    ids = torch.full((len(LENS), L), pad, dtype=torch.long)
    tt = torch.zeros((len(LENS), L), dtype=torch.long)
    mask = torch.zeros((len(LENS), L), dtype=torch.long)
    for i, (s, t) in enumerate(zip(seqs, types)):
        ids[i, : len(s)], tt[i, : len(s)], mask[i, : len(s)] = s, t, 1
    cu = torch.tensor([0, *torch.tensor(LENS).cumsum(0).tolist()], dtype=torch.int32)
    packed = dict(
        input_ids=torch.cat(seqs),
        positions=torch.cat([torch.arange(n) for n in LENS]),
        token_type_ids=torch.cat(types) if pairs else None,
        cu_seqlens=cu,
        max_seqlen=L,
    )
    padded = dict(input_ids=ids, attention_mask=mask, token_type_ids=tt if pairs else None)
    return packed, padded


def _ours(hf: transformers.PreTrainedModel, cls, with_prefix: bool = True, **kw):
    config = hf.config.to_dict()
    model = cls(config, **kw).eval()
    sd = hf.state_dict()
    if not with_prefix:
        sd = {k.split(".", 1)[1] if k.startswith(("bert.", "roberta.")) else k: v for k, v in sd.items()}
    loaded = model.load_weights(sd.items())
    assert loaded == set(dict(model.named_parameters()))
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "kind,pairs,act",
    [
        ("bert", True, "gelu"),
        ("bert", False, "gelu_new"),
        ("xlmr", False, "gelu"),
    ],
)
def test_encoder_matches_transformers(kind: str, pairs: bool, act: str) -> None:
    hf = _hf(kind, hidden_act=act)
    ours = _ours(hf, BertEmbeddingModel, with_prefix=False)
    packed, padded = _batch(kind, pairs)
    with torch.no_grad():
        ref = hf(**padded).last_hidden_state
        out = ours(**packed)
    assert out.shape == (sum(LENS), 64)
    cu = packed["cu_seqlens"].tolist()
    for i, n in enumerate(LENS):
        assert _rel(out[cu[i] : cu[i + 1]], ref[i, :n]) <= 1e-4, (kind, i)
    # each sequence alone (B=1 / equal-length fast path) gives the same rows
    for i, n in enumerate(LENS):
        sl = slice(cu[i], cu[i + 1])
        tt = packed["token_type_ids"]
        with torch.no_grad():
            single = ours(
                packed["input_ids"][sl],
                packed["positions"][sl],
                None if tt is None else tt[sl],
                torch.tensor([0, n], dtype=torch.int32),
                n,
            )
        assert _rel(single, ref[i, :n]) <= 1e-4


@pytest.mark.parametrize("kind", ["bert", "xlmr"])
@pytest.mark.parametrize("num_labels", [1, 3])
def test_classifier_matches_transformers(kind: str, num_labels: int) -> None:
    hf = _hf(kind, num_labels=num_labels)
    ours = _ours(hf, BertForSequenceClassification)
    assert ours.num_labels == num_labels
    packed, padded = _batch(kind, pairs=kind == "bert")
    with torch.no_grad():
        ref = hf(**padded).logits
        logits = ours.logits(**packed)
        scores = ours.score(**packed)
    assert logits.shape == (len(LENS), num_labels)
    assert _rel(logits, ref) <= 1e-4
    expected = torch.sigmoid(ref) if num_labels == 1 else torch.softmax(ref, -1)  # vLLM's PoolerClassify
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)


def test_cross_encoder_activation_from_config() -> None:
    hf = _hf("bert", num_labels=1)
    config = hf.config.to_dict()
    packed, _ = _batch("bert", pairs=True)
    for fn, expect in [
        ("torch.nn.modules.linear.Identity", lambda x: x),
        ("torch.nn.modules.activation.Tanh", torch.tanh),
        ("torch.nn.modules.activation.Sigmoid", torch.sigmoid),
    ]:
        model = BertForSequenceClassification({**config, "sentence_transformers": {"activation_fn": fn}})
        model.load_weights(hf.state_dict().items())
        with torch.no_grad():
            logits = model.logits(**packed)
            torch.testing.assert_close(model.score(**packed), expect(logits))
    with pytest.raises(ValueError, match="activation_fn"):
        BertForSequenceClassification({**config, "sbert_ce_default_activation_function": "os.system"})
    reg = BertForSequenceClassification({**config, "problem_type": "regression"})
    x = torch.randn(4, 1)
    torch.testing.assert_close(reg.apply_activation(x, "classify"), x)


def test_load_weights_errors() -> None:
    hf = _hf("bert")
    sd = dict(hf.state_dict())
    model = BertEmbeddingModel(hf.config.to_dict())
    missing = {k: v for k, v in sd.items() if "layer.1.attention.self.key" not in k}
    with pytest.raises(ValueError, match=r"missing weights:.*layers\.1\.attn\.qkv_proj"):
        model.load_weights(missing.items())
    with pytest.raises(ValueError, match=r"unexpected weights:.*encoder\.layer\.0\.foo\.weight"):
        model.load_weights([*sd.items(), ("encoder.layer.0.foo.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match=r"embeddings\.word_embeddings\.weight"):
        model.load_weights([*sd.items(), ("embeddings.word_embeddings.weight", torch.zeros(3, 3))])
    # position_ids buffers and the unused HF pooler are ignored
    model.load_weights([*sd.items(), ("bert.embeddings.position_ids", torch.arange(64)[None])])


def test_registry_and_attributes() -> None:
    hf = _hf("xlmr")
    config = hf.config.to_dict()
    cls = get_model_class(config["architectures"])
    assert cls is BertEmbeddingModel
    model = cls(config, pooling=PoolingConfig("MEAN", False))
    assert model.is_pooling_model and model.hidden_size == 64
    assert model.max_position_embeddings == 66 - 2  # XLM-R positions start at padding_idx + 1
    assert get_model_class(["BertForSequenceClassification"]) is BertForSequenceClassification


def _naive_pool(hidden: torch.Tensor, lens: list[int], mode: str) -> torch.Tensor:
    out, start = [], 0
    for n in lens:
        seg = hidden[start : start + n]
        out.append({"MEAN": seg.mean(0), "CLS": seg[0], "LAST": seg[-1]}[mode])
        start += n
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["MEAN", "CLS", "LAST"])
@pytest.mark.parametrize("normalize", [False, True])
def test_pool_matches_naive(mode: str, normalize: bool) -> None:
    hidden = torch.randn(sum(LENS), 8)
    cu = torch.tensor([0, *torch.tensor(LENS).cumsum(0).tolist()], dtype=torch.int32)
    ref = _naive_pool(hidden, LENS, mode)
    if normalize:
        ref = F.normalize(ref, dim=-1)
    torch.testing.assert_close(pool(hidden, cu, PoolingConfig(mode, normalize)), ref)


def test_pooling_config_from_sentence_transformers(tmp_path) -> None:
    assert PoolingConfig.from_sentence_transformers(None) == PoolingConfig("CLS", True)  # vLLM default
    assert PoolingConfig.from_sentence_transformers(
        {"pooling_mode": "mean", "normalize": True}
    ) == PoolingConfig("MEAN", True)
    assert PoolingConfig.from_sentence_transformers({"pooling_mode": "lasttoken", "normalize": False}) == (
        PoolingConfig("LAST", False)
    )
    raw = {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    assert PoolingConfig.from_sentence_transformers(raw, normalize=True) == PoolingConfig("CLS", True)
    assert PoolingConfig.from_sentence_transformers(raw, pooling_type="mean").pooling_type == "MEAN"
    with pytest.raises(ValueError, match="pooling_mode"):
        PoolingConfig.from_sentence_transformers({"pooling_mode": "max"})
    with pytest.raises(ValueError, match="pooling_type"):
        PoolingConfig("FIRST", True)  # type: ignore[arg-type]
    assert read_sentence_transformers_pooling(str(tmp_path)) is None


def test_pooling_params() -> None:
    with pytest.raises(ValueError, match="dimensions"):
        PoolingParams(dimensions=0)
    with pytest.raises(ValueError, match="dimensions"):
        PoolingParams(dimensions=4, task="score")
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        PoolingParams(truncate_prompt_tokens=0)
    with pytest.raises(ValueError, match="task"):
        PoolingParams(task="generate")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dimensions"):
        PoolingParams(dimensions=100).verify(hidden_size=64)
    PoolingParams(dimensions=64, truncate_prompt_tokens=-1).verify(hidden_size=64)

    emb = torch.randn(3, 16)
    out = apply_dimensions(emb, 4, normalize=True)
    torch.testing.assert_close(out, F.normalize(emb[:, :4], dim=-1))
    torch.testing.assert_close(apply_dimensions(emb, None, normalize=False), emb)
    params = [PoolingParams(), PoolingParams(dimensions=4), PoolingParams(normalize=False)]
    res = apply_pooling_params(emb, params, PoolingConfig("MEAN", True))
    torch.testing.assert_close(res[0], F.normalize(emb[0], dim=-1))
    torch.testing.assert_close(res[1], F.normalize(emb[1, :4], dim=-1))
    torch.testing.assert_close(res[2], emb[2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_encoder_cuda_half(dtype: torch.dtype) -> None:
    """CUDA fp16/bf16 (flash varlen attention when available) vs transformers fp32, and vs our SDPA path."""
    import slicelm.models.bert as bert

    hf = _hf("bert", hidden_act="gelu")
    ours = _ours(hf, BertEmbeddingModel).to("cuda", dtype)
    packed, padded = _batch("bert", pairs=True)
    packed = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in packed.items()}
    with torch.no_grad():
        ref = hf(**padded).last_hidden_state
        out = ours(**packed).float().cpu()
        flash_used = bert._FLASH_OK
        bert._FLASH_OK = False  # force the padded-SDPA path
        try:
            out_sdpa = ours(**packed).float().cpu()
        finally:
            bert._FLASH_OK = flash_used
    cu = packed["cu_seqlens"].tolist()
    for i, n in enumerate(LENS):
        assert _rel(out[cu[i] : cu[i + 1]], ref[i, :n]) <= 3e-2, i
        assert _rel(out_sdpa[cu[i] : cu[i + 1]], ref[i, :n]) <= 3e-2, i
    assert _rel(out, out_sdpa) <= 2e-2
    print(f"{dtype}: flash varlen used: {flash_used}")
