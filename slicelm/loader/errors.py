"""Errors of the loader (shared by the HF-directory and GGUF readers, so neither imports the other)."""

from __future__ import annotations


class InvalidModelDirError(ValueError):
    """A model directory lacks config.json or has an unreadable one."""


class MissingWeightsError(ValueError):
    """A model directory has no (or incomplete) safetensors weight files."""


class CorruptModelFileError(ValueError):
    """A weight file (safetensors or GGUF) cannot be parsed."""
