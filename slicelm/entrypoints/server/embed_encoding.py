"""Embedding vectors on the wire: JSON floats, base64, or raw bytes, in vLLM's ``embed_dtype`` / ``endianness``.

``encoding_format``: ``float`` (JSON list), ``base64`` (the raw bytes, base64), ``bytes`` (one binary body:
the vectors back to back, described by a ``metadata`` response header holding JSON) or ``bytes_only`` (the
binary body alone). ``embed_dtype``: float32 (default), float16, bfloat16, fp8_e4m3, fp8_e5m2;
``endianness``: native, big, little.
"""

from __future__ import annotations

import base64
import sys
from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def vector_bytes(vec: torch.Tensor, embed_dtype: str, endianness: str) -> bytes:
    data = vec.detach().float().cpu().to(_DTYPES[embed_dtype]).contiguous()
    raw = data.view(torch.uint8).numpy()
    itemsize = data.element_size()
    order = sys.byteorder if endianness == "native" else endianness
    if itemsize > 1 and order != sys.byteorder:
        raw = raw.reshape(-1, itemsize)[:, ::-1].reshape(-1)
    return raw.tobytes()


def encode_vector(vec: torch.Tensor, encoding_format: str, embed_dtype: str, endianness: str) -> Any:
    if encoding_format == "float":
        return vec.detach().float().cpu().tolist()
    return base64.b64encode(vector_bytes(vec, embed_dtype, endianness)).decode("ascii")
