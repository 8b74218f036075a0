"""Tokenizer: GGUF (byte-level BPE and sentencepiece) and HF-dir tokenizers against transformers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from slicelm.loader.model_files import resolve_model
from slicelm.loader.tokenizer import ChatTemplateError, Tokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "  leading spaces\n\nnew lines\tand tabs  ",
    "héllo wörld — 日本語 🤗 emoji",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "numbers 12345 and 3.14159, don't I'll",
    "",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
]


@pytest.fixture(scope="module")
def smollm() -> tuple[Tokenizer, object]:
    source = resolve_model("smollm2-135m-instruct")
    ref = transformers.AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    return load_tokenizer(source), ref


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_encode_decode_matches_transformers(smollm, text: str) -> None:
    tok, ref = smollm
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)


def test_gguf_special_tokens(smollm) -> None:
    tok, ref = smollm
    assert tok.encode("<|im_start|>") == [1]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert tok.eos_token_ids == {2}
    assert tok.vocab_size == len(ref) == 49152
    assert set(ref.all_special_ids) <= set(tok.all_special_ids)
    assert tok.decode([1, *tok.encode("Hello"), 2]) == "Hello"  # control tokens skipped


def test_gguf_chat_template_matches_transformers(smollm) -> None:
    tok, ref = smollm
    for chat in (CHAT, CHAT[1:]):
        ours = tok.apply_chat_template(chat, add_generation_prompt=True)
        assert ours == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert ours.endswith("<|im_start|>assistant\n")
    partial = [*CHAT, {"role": "assistant", "content": "The answer is"}]
    ours = tok.apply_chat_template(partial, add_generation_prompt=False, continue_final_message=True)
    assert ours == ref.apply_chat_template(partial, tokenize=False, continue_final_message=True)
    assert ours.endswith("The answer is")


def test_chat_template_helpers_and_override(smollm) -> None:
    tok, _ = smollm
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}{{ x }}"
    assert tok.apply_chat_template(CHAT[:1], chat_template=template, x="!") == '<|im_start|>"You are terse."!'
    with pytest.raises(ChatTemplateError, match="boom"):
        tok.apply_chat_template(CHAT, chat_template="{{ raise_exception('boom') }}")
    year = tok.apply_chat_template(CHAT, chat_template="{{ strftime_now('%Y') }}")
    assert year.isdigit() and len(year) == 4


def test_no_chat_template_error(tmp_path: Path) -> None:
    tok = load_tokenizer(resolve_model("all-minilm-l6-v2"))
    assert tok.chat_template is None
    with pytest.raises(ChatTemplateError, match="--chat-template"):
        tok.apply_chat_template(CHAT)
    file = tmp_path / "t.jinja"
    file.write_text("{% for m in messages %}[{{ m.role }}]{% endfor %}")
    tok2 = load_tokenizer(resolve_model("all-minilm-l6-v2"), chat_template=str(file))
    assert tok2.apply_chat_template(CHAT) == "[system][user]"


def test_minilm_matches_transformers() -> None:
    source = resolve_model("all-minilm-l6-v2")
    tok = load_tokenizer(source)
    ref = transformers.AutoTokenizer.from_pretrained(str(source.path))
    for text in [*TEXTS[:5], "The Quick BROWN fox."]:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)
    long_text = "word " * 300  # tokenizer.json truncates to 128; we leave truncation to the engine
    assert len(tok.encode(long_text)) == 302
    assert tok.pad_token_id == 0 and tok.eos_token_id is None and tok.eos_token_ids == set()
    assert set(tok.all_special_ids) == {0, 100, 101, 102, 103}


def _write_sentencepiece_gguf(path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = ["▁", "a", "b", "c", "d", "e", "h", "l", "o", "▁a", "ab", "▁ab", "abc", "▁abc", "he", "ll",
              "hell", "hello", "▁hello", "cd", "de"]
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_sentencepiece_gguf_matches_transformers(tmp_path: Path) -> None:
    file = tmp_path / "sp.gguf"
    _write_sentencepiece_gguf(file)
    source = resolve_model(str(file))
    assert source.config["tie_word_embeddings"] is True and source.config["torch_dtype"] == "float32"
    tok = load_tokenizer(source)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=file.name)
    for text in ["hello abc", "abcd hello", " hello", "hé ab\n", "zz"]:
        ids = tok.encode(text)
        assert ids[0] == 1  # add_bos defaults on for sentencepiece files
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text


def test_unsupported_gguf_tokenizer() -> None:
    from slicelm.loader.tokenizer import tokenizer_from_gguf_metadata

    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model 'bert'"):
        tokenizer_from_gguf_metadata({"ggml.model": "bert", "ggml.tokens": ["a"]}, "x.gguf")
