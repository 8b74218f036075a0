"""Errors of the loader (shared by the HF-directory and GGUF readers, so neither imports the other)."""

from __future__ import annotations


class InvalidModelDirError(ValueError):
    """A model directory lacks config.json or has an unreadable one."""


class MissingWeightsError(ValueError):
    """A model directory has no (or incomplete) safetensors weight files."""


class CorruptModelFileError(ValueError):
    """A weight file (safetensors or GGUF) cannot be parsed."""


class HubError(ValueError):
    """A model named by its Hub id could not be made available locally; the message names the id and says
    what to do. Subclasses say why."""

    def __init__(self, repo_id: str, message: str) -> None:
        self.repo_id = repo_id
        super().__init__(message)


class ModelNotCachedError(HubError):
    """Offline (``HF_HUB_OFFLINE=1`` or no network) and the snapshot is not in the cache."""


class HubAccessError(HubError):
    """401 / 403: a gated or private repo without a token that may read it."""


class HubRepoNotFoundError(HubError):
    """The Hub has no such repo (or hides a private one from this token)."""


class HubRevisionNotFoundError(HubError):
    """The repo exists but not at this revision (branch, tag or commit)."""


class NoSafetensorsError(HubError):
    """The repo holds no weights slicelm can load (no *.safetensors, no matching .gguf)."""


class DownloadDiskFullError(HubError):
    """The disk filled up while downloading; the partial download was removed."""
