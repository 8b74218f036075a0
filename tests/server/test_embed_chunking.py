"""``--pooler-config`` parsing and the chunk arithmetic of long embedding inputs (no server)."""

from __future__ import annotations

import argparse
import asyncio

import pytest
import torch

from slicelm.engine.request import PoolingOutput
from slicelm.entrypoints.server.embed_chunking import PoolerConfig, combine_chunks, run_chunked, split_chunks
from slicelm.entrypoints.server.errors import APIError
from slicelm.entrypoints.server.options import check_api_args


def test_parse_pooler_config() -> None:
    pc = PoolerConfig.parse('{"enable_chunked_processing": true, "max_embed_len": 3072000}')
    assert pc.enable_chunked_processing and pc.max_embed_len == 3072000
    assert PoolerConfig.parse(None) == PoolerConfig()
    for bad, words in (("{", "JSON"), ("[1]", "object"), ('{"pooling_mode": 1}', "pooling_mode"),
                       ('{"max_embed_len": 0}', "max_embed_len"), ('{"enable_chunked_processing": 1}', "true"),
                       ('{"pooling_type": "MAX"}', "pooling_type")):
        with pytest.raises(ValueError, match="--pooler-config") as e:
            PoolerConfig.parse(bad)
        assert words in str(e.value)


def test_pooler_config_forwards_pooling_flags() -> None:
    args = argparse.Namespace(pooler_config='{"pooling_type": "MEAN", "normalize": false}', pooling_type=None,
                              normalize=None)
    check_api_args(args)
    assert (args.pooling_type, args.normalize) == ("MEAN", False)
    args = argparse.Namespace(pooler_config='{"pooling_type": "MEAN"}', pooling_type="CLS", normalize=None)
    check_api_args(args)
    assert args.pooling_type == "CLS"  # the explicit flag wins


def test_split_and_combine() -> None:
    assert split_chunks(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 4.0])
    assert torch.allclose(combine_chunks([a, b], [3, 1], None, False), torch.tensor([0.75, 1.0]))
    assert torch.allclose(combine_chunks([a, b], [3, 1], 1, True), torch.tensor([1.0]))
    out = combine_chunks([a, b], [1, 1], None, True)
    assert torch.allclose(out.norm(), torch.tensor(1.0))


def _fake_run(seen: list):
    async def run(prompts, params):
        seen.append((prompts, params))
        return [PoolingOutput(str(i), p["prompt_token_ids"], torch.tensor([float(len(p["prompt_token_ids"])), 1.0]))
                for i, p in enumerate(prompts)]
    return run


def test_run_chunked_weights_by_tokens() -> None:
    seen: list = []
    prompts = [{"prompt_token_ids": list(range(10))}, {"prompt_token_ids": [1, 2]}]
    outs = asyncio.run(run_chunked(prompts, _fake_run(seen), 4, "MEAN", True, None, False, "embd-x"))
    (chunks, params), = seen
    assert [len(c["prompt_token_ids"]) for c in chunks] == [4, 4, 2, 2]
    assert params.normalize is False and params.dimensions is None
    assert torch.allclose(outs[0].data, torch.tensor([(16 + 16 + 4) / 10, 1.0]))
    assert outs[0].prompt_token_ids == list(range(10)) and torch.allclose(outs[1].data, torch.tensor([2.0, 1.0]))


@pytest.mark.parametrize("pooling_type", ["CLS", "LAST"])
def test_run_chunked_refuses_cls_and_last(pooling_type: str) -> None:
    with pytest.raises(APIError) as e:
        asyncio.run(run_chunked([{"prompt_token_ids": [1] * 9}], _fake_run([]), 4, pooling_type, True, None, None,
                                "embd-x"))
    assert e.value.status == 400 and pooling_type in str(e.value.message) and "MEAN" in str(e.value.message)
