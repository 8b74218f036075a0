"""Tokenizer: a `tokenizers.Tokenizer` plus special-token ids and jinja2 chat templates.

Sources: an HF directory (tokenizer.json, tokenizer_config.json, chat_template.jinja) or a GGUF
file's `tokenizer.*` metadata (byte-level BPE "gpt2" or sentencepiece-BPE "llama").
Chat templates render in `chat_template.py` (transformers-compatible, sandboxed, with limits).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from slicelm.loader.chat_template import compile_template, render_limited
from slicelm.loader.model_files import ModelSource

if TYPE_CHECKING:
    from slicelm.loader.hub import HubOptions

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> regex applied before the byte-level step (others: GPT-2's own regex)
_PRE_SPLITS: dict[str, str] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
# tokenizer.ggml.pre values whose digits are split one by one (llama.cpp: "\p{N}" first)
_DIGIT_PRES = {"smollm", "starcoder", "refact"}


class ChatTemplateError(ValueError):
    """No chat template, or one that fails to render."""


class MissingChatTemplateError(ChatTemplateError):
    """Chat-style input for a tokenizer without a chat template, and none given (vLLM's message)."""

    def __init__(self) -> None:
        super().__init__("As of transformers v4.44, default chat template is no longer allowed, so you must provide "
                         "a chat template if the tokenizer does not define one. Start the server with "
                         "--chat-template (a file path or a jinja2 template string).")


@dataclass
class Tokenizer:
    hf: HFTokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | None = None
    extra_eos_token_ids: set[int] = field(default_factory=set)  # from generation_config
    extra_special_tokens: dict[str, str] = field(default_factory=dict)  # cls/sep/mask, for templates
    prompts: dict[str, str] = field(default_factory=dict)  # sentence-transformers' prompts by name (input_type)
    _token_texts: dict[int, str] = field(default_factory=dict, repr=False)  # token_text's bounded cache

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.hf.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set(self.extra_eos_token_ids)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        return ids

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        ids = {i for i, tok in self.hf.get_added_tokens_decoder().items() if tok.special}
        for token in (self.bos_token, self.eos_token, self.pad_token, self.unk_token):
            if (i := self._id(token)) is not None:
                ids.add(i)
        return sorted(ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_pair(self, text_1: str, text_2: str, add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
        """A cross-encoder pair: ``(ids, token_type_ids)`` with the tokenizer's pair template
        (BERT: ``[CLS] a [SEP] b [SEP]`` with types 0…0 1…1; XLM-R: ``<s> a </s></s> b </s>``, all 0)."""
        enc = self.hf.encode(text_1, text_2, add_special_tokens=add_special_tokens)
        return list(enc.ids), list(enc.type_ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """Text of one token with special tokens kept, as logprobs show it (cached, up to 2**18 tokens)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.decode([token_id], skip_special_tokens=False)
            if len(self._token_texts) < 1 << 18:
                self._token_texts[token_id] = text
        return text

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        return [self.hf.id_to_token(i) for i in ids]

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` to a prompt string the way transformers' apply_chat_template does."""
        template = chat_template or self.chat_template
        if template is None:
            raise MissingChatTemplateError()
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
        chat = [dict(m) for m in messages]
        final = None
        if continue_final_message:
            if not chat or not isinstance(chat[-1].get("content"), str):
                raise ValueError("continue_final_message needs a final message with string content")
            final = chat[-1]["content"]
            chat[-1]["content"] = final + _CONTINUE_TAG
        variables = {
            name: value
            for name, value in (
                ("bos_token", self.bos_token),
                ("eos_token", self.eos_token),
                ("unk_token", self.unk_token),
                ("pad_token", self.pad_token),
                *self.extra_special_tokens.items(),
            )
            if value is not None
        }
        variables.update(kwargs)
        try:
            rendered = render_limited(
                compile_template(template),
                dict(messages=chat, tools=tools, add_generation_prompt=add_generation_prompt, **variables),
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed to render: {e}") from e
        if final is not None:
            tag = _CONTINUE_TAG.strip()
            if final.strip() not in rendered or tag not in rendered:
                raise ValueError("continue_final_message: the chat template drops the final message")
            loc = rendered.rindex(tag)
            if rendered[loc : loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
                rendered = rendered[:loc]
            else:  # the template trimmed trailing whitespace
                rendered = rendered[:loc].rstrip()
        return rendered


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_set(value: Any) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, list) else {int(value)}


def _read_chat_template_arg(chat_template: str | None) -> str | None:
    """--chat-template accepts a file path or the template text itself."""
    if chat_template is None:
        return None
    if "{" not in chat_template and len(chat_template) < 4096:
        path = Path(chat_template).expanduser()
        if not path.is_file():
            raise ChatTemplateError(f"chat_template: file {path} does not exist")
        return path.read_text(encoding="utf-8")
    return chat_template


def load_tokenizer(source: ModelSource, chat_template: str | None = None) -> Tokenizer:
    """Tokenizer of `source`; `chat_template` (path or text) overrides the model's template."""
    if source.kind == "gguf":
        assert source.gguf is not None
        tokenizer = tokenizer_from_gguf_metadata(source.gguf.tokenizer_metadata(), source.path)
    else:
        tokenizer = _tokenizer_from_hf_dir(source.path)
    tokenizer.extra_eos_token_ids |= _as_id_set(source.generation_config.get("eos_token_id"))
    override = _read_chat_template_arg(chat_template)
    if override is not None:
        tokenizer.chat_template = override
    return tokenizer


def _tokenizer_from_hf_dir(directory: Path) -> Tokenizer:
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ValueError(
            f"model directory {directory} has no tokenizer.json (only fast tokenizers are supported)"
        )
    hf = HFTokenizer.from_file(str(path))
    hf.no_padding()
    hf.no_truncation()  # the engine enforces max_model_len / max_seq_length itself
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # tokenizer_config wins
        if (directory / name).is_file():
            config.update(json.loads((directory / name).read_text(encoding="utf-8")))
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    st_config = directory / "config_sentence_transformers.json"
    prompts = json.loads(st_config.read_text(encoding="utf-8")).get("prompts") if st_config.is_file() else None
    return Tokenizer(
        hf=hf,
        bos_token=_token_str(config.get("bos_token")),
        eos_token=_token_str(config.get("eos_token")),
        pad_token=_token_str(config.get("pad_token")),
        unk_token=_token_str(config.get("unk_token")),
        chat_template=template if isinstance(template, str) else None,
        extra_special_tokens={
            k: v for k in ("cls_token", "sep_token", "mask_token") if (v := _token_str(config.get(k)))
        },
        prompts={k: v for k, v in prompts.items() if isinstance(v, str)} if isinstance(prompts, dict) else {},
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: best-scored result first (as transformers)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[str, str, float]] = []
    for token, score in zip(tokens, scores):
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def tokenizer_from_gguf_metadata(meta: dict[str, Any], path: Path | str = "<gguf>") -> Tokenizer:
    """Build a Tokenizer from GGUF `tokenizer.*` metadata (keys without the `tokenizer.` prefix)."""
    kind = meta.get("ggml.model")
    tokens: list[str] | None = meta.get("ggml.tokens")
    if not tokens:
        raise ValueError(f"GGUF file {path}: no tokenizer.ggml.tokens metadata")
    token_types: list[int] = meta.get("ggml.token_type") or [1] * len(tokens)
    add_bos = meta.get("ggml.add_bos_token")
    if kind == "gpt2":
        hf, tokens = _gguf_byte_level_bpe(meta, tokens), list(tokens)
        add_bos = bool(add_bos)
    elif kind == "llama":
        hf = _gguf_sentencepiece_bpe(meta, tokens)
        add_bos = True if add_bos is None else bool(add_bos)
    else:
        raise ValueError(
            f"GGUF file {path}: tokenizer.ggml.model {kind!r} is not supported (supported: 'gpt2', 'llama')"
        )
    spelled = set(_bytes_to_unicode().values()) if kind == "gpt2" else None
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, token_types)
               if ty == _CONTROL and (spelled is None or set(t) <= spelled)]
    hf.add_special_tokens(control)
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, token_types)
            if ty == _USER_DEFINED]
    if user:
        hf.add_tokens(user)

    def token_of(key: str) -> str | None:
        i = meta.get(f"ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = token_of("bos")
    if add_bos and bos is not None:
        bos_id = tokens.index(bos)
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    eos_ids = _as_id_set(meta.get("ggml.eos_token_id")) | _as_id_set(meta.get("ggml.eot_token_id"))
    return Tokenizer(
        hf=hf,
        bos_token=bos,
        eos_token=token_of("eos"),
        pad_token=token_of("padding"),
        unk_token=token_of("unknown"),
        chat_template=meta.get("chat_template"),
        extra_eos_token_ids=eos_ids,
    )


def _gguf_byte_level_bpe(meta: dict[str, Any], tokens: list[str]) -> HFTokenizer:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ", 1)) for m in meta.get("ggml.merges") or []]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = meta.get("ggml.pre")
    if pre in _PRE_SPLITS:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre in _DIGIT_PRES:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    return hf


def _gguf_sentencepiece_bpe(meta: dict[str, Any], tokens: list[str]) -> HFTokenizer:
    scores = meta.get("ggml.scores") or [0.0] * len(tokens)
    if meta.get("ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in meta["ggml.merges"]]
    else:
        merges = _merges_from_scores(tokens, scores)
    unk_id = meta.get("ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    vocab = {t: i for i, t in enumerate(tokens)}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_space = meta.get("ggml.add_space_prefix", True)
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space:
        steps.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(steps)
    return hf


__all__ = ["ChatTemplateError", "MissingChatTemplateError", "Tokenizer", "load_tokenizer",
           "tokenizer_from_gguf_metadata"]


def load_tokenizer_from(name_or_path: str, chat_template: str | None = None,
                        hub: HubOptions | None = None) -> Tokenizer:
    """The tokenizer named by ``--tokenizer`` (or the model): a directory with tokenizer.json (no weights
    needed), a ``.gguf`` file, a bundled short name or a Hub id (``hub``: its revision, cache, token).
    generation_config.json's eos ids count too."""
    from slicelm.loader.model_files import locate_model, resolve_model

    path = locate_model(name_or_path, load_format="dummy", hub=hub)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        tokenizer = _tokenizer_from_hf_dir(path)
        gen = path / "generation_config.json"
        if gen.is_file():
            tokenizer.extra_eos_token_ids |= _as_id_set(json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id"))
        override = _read_chat_template_arg(chat_template)
        if override is not None:
            tokenizer.chat_template = override
        return tokenizer
    return load_tokenizer(resolve_model(str(path), load_format="dummy"), chat_template)
