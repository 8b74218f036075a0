"""Models by their Hub names: ``org/name`` → a local snapshot laid out by ``huggingface_hub`` (or ModelScope).

``model_files.locate_model`` tries an existing path, then a bundled short name, then calls ``fetch`` here:

- offline (``HF_HUB_OFFLINE=1``, or the Hub unreachable): the snapshot already in the cache
  (``--download-dir``, else ``HF_HUB_CACHE``, else ``HF_HOME/hub``), found by ``snapshot_download(local_files_only)``;
- online: the repo's file list at the revision picks what slicelm loads (config, tokenizer and chat-template files;
  the ``*.safetensors`` the index names, or all of them without an index; or one ``.gguf``), then
  ``snapshot_download`` fetches exactly those (``--ignore-patterns``, default ``original/**/*``), under a per-repo
  file lock so that two processes never download one snapshot twice;
- ``VLLM_USE_MODELSCOPE`` / ``SLICELM_USE_MODELSCOPE`` true: the same through ``modelscope`` (imported only then).

GGUF repos: ``org/repo:Q4_K_M`` takes that quantization's file; ``org/repo`` with a single ``.gguf`` takes it.
Every failure is a ``HubError`` subclass (``errors.py``) naming the id and what to do. Plain Python: no torch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slicelm.loader.errors import (
    DownloadDiskFullError,
    HubAccessError,
    HubError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    ModelNotCachedError,
    NoSafetensorsError,
)

if TYPE_CHECKING:
    from slicelm.config import EngineArgs

logger = logging.getLogger(__name__)

META_PATTERNS = ("*.json", "*.jinja", "*.txt")  # config, tokenizer, chat template, sentence-transformers files
DEFAULT_IGNORE = ("original/**/*",)  # vLLM's default --ignore-patterns
SAFETENSORS_INDEX = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".pdparams")
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}$")


@dataclass(frozen=True)
class HubOptions:
    """vLLM's download flags for one repo: ``--revision`` (or ``--tokenizer-revision``), ``--download-dir``,
    ``--hf-token`` (a token, or True: the stored one; None: ``HF_TOKEN``), ``--ignore-patterns``."""

    revision: str | None = None
    download_dir: str | None = None
    token: str | bool | None = None
    ignore_patterns: tuple[str, ...] = DEFAULT_IGNORE

    @classmethod
    def for_model(cls, args: EngineArgs) -> HubOptions:
        return cls(args.revision, args.download_dir, args.hf_token, tuple(args.ignore_patterns))

    @classmethod
    def for_tokenizer(cls, args: EngineArgs) -> HubOptions:
        """The tokenizer's repo: ``--tokenizer-revision``, else (tokenizer = the model) ``--revision``."""
        revision = args.tokenizer_revision or (args.revision if args.tokenizer in (None, args.model) else None)
        return cls(revision, args.download_dir, args.hf_token, tuple(args.ignore_patterns))


@dataclass(frozen=True)
class Snapshot:
    repo_id: str
    commit: str  # the snapshot's commit (its folder name)
    path: Path  # the snapshot folder
    gguf_file: Path | None = None  # the chosen .gguf inside it, for GGUF repos

    @property
    def model_path(self) -> Path:
        return self.gguf_file or self.path


# ------------------------------------------------------------------------------------------------ names
def split_name(name: str) -> tuple[str, str | None]:
    """``org/repo:Q4_K_M`` → (``org/repo``, ``Q4_K_M``); anything else → (name, None)."""
    repo, sep, quant = name.rpartition(":")
    if sep and repo and quant and "/" not in quant:
        return repo, quant
    return name, None


def is_hub_id(name: str) -> bool:
    """Whether ``name`` can be a Hub repo id (``org/name`` or ``name``, optionally ``:QUANT``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or name.lower().endswith(".gguf") or name.count("/") > 1:
        return False
    try:
        validate_repo_id(split_name(name)[0])
    except HFValidationError:
        return False
    return True


def use_modelscope() -> bool:
    return any(_env_true(v) for v in ("VLLM_USE_MODELSCOPE", "SLICELM_USE_MODELSCOPE"))


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")


def is_offline() -> bool:
    from huggingface_hub import constants

    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def cache_dir(options: HubOptions) -> Path:
    """Where snapshots live: ``--download-dir``, else ``HF_HUB_CACHE``, else ``HF_HOME/hub`` (read now, so a
    process may change them), else huggingface_hub's default."""
    from huggingface_hub import constants

    if options.download_dir:
        return Path(options.download_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def repo_cache_path(repo_id: str, options: HubOptions) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir(options) / repo_folder_name(repo_id=repo_id, repo_type="model")


# ------------------------------------------------------------------------------------------------ fetch
def fetch(name: str, options: HubOptions | None = None, weights: bool = True) -> Snapshot:
    """The local snapshot of Hub model ``name`` (downloading what is missing when online). ``weights=False``:
    config and tokenizer files only (``--load-format dummy``, ``--tokenizer``)."""
    options = options or HubOptions()
    repo_id, quant = split_name(name)
    if use_modelscope():
        from slicelm.loader.modelscope_hub import fetch_modelscope

        path = fetch_modelscope(repo_id, quant, options, weights, is_offline(), META_PATTERNS,
                                repo_lock(repo_id, options))
        return _snapshot_of(repo_id, path, quant, [p.name for p in path.iterdir()])
    if not is_offline():
        listing = _list_repo(repo_id, options)
        if listing is not None:
            return _download(repo_id, quant, options, weights, *listing)
    return _cached(repo_id, quant, options, weights)


def _list_repo(repo_id: str, options: HubOptions) -> tuple[str, list[str]] | None:
    """(commit, file names) of the repo at the revision; None when the Hub cannot be reached."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=options.token)
    try:
        info = api.model_info(repo_id, revision=options.revision)
    except OfflineModeIsEnabled:
        return None
    except _network_errors() as e:
        logger.warning("the Hub is unreachable (%s: %s): looking for %s in the cache", type(e).__name__, e, repo_id)
        return None
    except Exception as e:
        raise _hub_error(repo_id, options, e) from e
    assert info.sha, f"the Hub returned no commit for {repo_id}"
    return info.sha, [s.rfilename for s in info.siblings or []]


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport errors of the HTTP client huggingface_hub uses (httpx in 1.x, httpx2 in 2.x)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        with contextlib.suppress(ImportError):
            mod = __import__(module)
            errors.append(getattr(mod, "TransportError", None) or mod.exceptions.ConnectionError)
    return tuple(errors)


def _hub_error(repo_id: str, options: HubOptions, e: Exception) -> HubError:
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    status = getattr(getattr(e, "response", None), "status_code", None)
    has_token = bool(options.token or os.environ.get("HF_TOKEN"))
    if isinstance(e, GatedRepoError) or (status in (401, 403) and not isinstance(e, RepositoryNotFoundError)):
        what = "gated" if isinstance(e, GatedRepoError) else "private or gated"
        fix = ("the token given cannot read it: ask for access on its page and use a token of an account that has it"
               if has_token else "set HF_TOKEN (or pass --hf-token) to a token of an account with access")
        return HubAccessError(repo_id, f"model {repo_id!r} is {what} on {endpoint} (HTTP {status}): {fix}; "
                                       f"request access at {endpoint}/{repo_id}")
    if isinstance(e, RevisionNotFoundError):
        return HubRevisionNotFoundError(repo_id, f"model {repo_id!r} has no revision {options.revision!r} on "
                                                 f"{endpoint}: give a branch, tag or commit of {endpoint}/{repo_id}")
    if isinstance(e, RepositoryNotFoundError):
        hint = "" if has_token else "; if it is private or gated, set HF_TOKEN (or --hf-token)"
        return HubRepoNotFoundError(repo_id, f"model {repo_id!r} was not found on {endpoint} (HTTP {status}): check "
                                             f"the id{hint}")
    if isinstance(e, HfHubHTTPError):
        return HubError(repo_id, f"model {repo_id!r}: the Hub answered HTTP {status}: {e}")
    return HubError(repo_id, f"model {repo_id!r}: {type(e).__name__}: {e}")


def _download(repo_id: str, quant: str | None, options: HubOptions, weights: bool, commit: str,
              files: list[str]) -> Snapshot:
    from huggingface_hub.utils import filter_repo_objects

    files = list(filter_repo_objects(files, ignore_patterns=ignore_patterns(options)))
    gguf = pick_gguf(repo_id, quant, files)  # a GGUF file also holds the config and the tokenizer: always fetched
    if weights and gguf is None and not any(f.endswith(".safetensors") for f in files):
        raise NoSafetensorsError(repo_id, no_weights_message(repo_id, files))
    with repo_lock(repo_id, options), _removing_partial_download(repo_id, options):
        path = _snapshot_download(repo_id, options, list(META_PATTERNS))
        if weights or gguf:
            wanted = [gguf] if gguf else _safetensors_files(repo_id, path, files)
            path = _snapshot_download(repo_id, options, [*META_PATTERNS, *wanted])
    if path.name != commit:
        logger.warning("%s moved from %s to %s while it was fetched; using %s", repo_id, commit, path.name, path.name)
    return Snapshot(repo_id, path.name, path, path / gguf if gguf else None)


def ignore_patterns(options: HubOptions) -> list[str] | None:
    """``--ignore-patterns``; ``dir/**/*`` also covers files directly in ``dir/`` (as its author means)."""
    patterns = list(options.ignore_patterns)
    patterns += [p[: -len("**/*")] + "*" for p in patterns if p.endswith("/**/*")]
    return patterns or None


def _snapshot_download(repo_id: str, options: HubOptions, allow: list[str], local_only: bool = False) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(
        repo_id, revision=options.revision, cache_dir=cache_dir(options), token=options.token,
        allow_patterns=allow, ignore_patterns=ignore_patterns(options),
        local_files_only=local_only, endpoint=os.environ.get("HF_ENDPOINT") or None))


def _safetensors_files(repo_id: str, snapshot: Path, files: list[str]) -> list[str]:
    """The shards the index names (others are stale copies, as vLLM drops them), else every *.safetensors."""
    index = snapshot / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if s not in files]
        if missing:
            raise NoSafetensorsError(repo_id, f"model {repo_id!r}: {SAFETENSORS_INDEX} names shards the repo does "
                                              f"not have: {', '.join(missing)}")
        return shards
    return [f for f in files if f.endswith(".safetensors")]


def no_weights_message(repo_id: str, files: list[str]) -> str:
    has = [f for f in files if f.endswith(_WEIGHT_SUFFIXES)] or files
    shown = ", ".join(has[:12]) + (f", … ({len(has) - 12} more)" if len(has) > 12 else "")
    return (f"model {repo_id!r} has no *.safetensors weights (slicelm loads safetensors or GGUF); the repo has: "
            f"{shown or 'no files'}. Use a safetensors export of this model, or convert it")


def pick_gguf(repo_id: str, quant: str | None, files: list[str]) -> str | None:
    """The .gguf file of ``org/repo:QUANT`` (or the repo's only .gguf when it has no safetensors); None for a
    safetensors repo named without a quantization."""
    ggufs = [f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower()]
    if quant is None:
        if any(f.endswith(".safetensors") for f in files) or not ggufs:
            return None
        if len(ggufs) == 1:
            return ggufs[0]
        raise NoSafetensorsError(repo_id, f"model {repo_id!r} holds several GGUF files: name one quantization as "
                                          f"{repo_id}:QUANT (this repo has {', '.join(gguf_quants(ggufs))})")
    pattern = re.compile(rf"(?:^|[-._]){re.escape(quant)}(?:$|[-.])", re.IGNORECASE)
    matches = [f for f in ggufs if pattern.search(Path(f).name[: -len(".gguf")])]
    if not matches:
        raise NoSafetensorsError(repo_id, f"model {repo_id!r} has no {quant} GGUF file (it has "
                                          f"{', '.join(gguf_quants(ggufs)) or 'no .gguf files'})")
    if len(matches) > 1 or _SPLIT_GGUF.search(Path(matches[0]).stem):
        raise NoSafetensorsError(repo_id, f"model {repo_id!r}:{quant} is split into {', '.join(matches)}; slicelm "
                                          "reads one .gguf file (merge them with llama-gguf-split --merge)")
    return matches[0]


def gguf_quants(ggufs: list[str]) -> list[str]:
    """Quantization tags of GGUF file names (``Qwen3-0.6B-Q4_K_M.gguf`` → ``Q4_K_M``), for messages."""
    tags = []
    for f in ggufs:
        m = re.search(r"[-._]((?:I?Q\d\w*)|F16|BF16|F32)$", _SPLIT_GGUF.sub("", Path(f).stem), re.IGNORECASE)
        tags.append(m.group(1).upper() if m else Path(f).name)
    return sorted(set(tags))


# ------------------------------------------------------------------------------------------------ cache
def _cached(repo_id: str, quant: str | None, options: HubOptions, weights: bool) -> Snapshot:
    from huggingface_hub.errors import LocalEntryNotFoundError

    incomplete = _incomplete_snapshot_error()
    try:
        path = _snapshot_download(repo_id, options, list(META_PATTERNS), local_only=True)
    except (LocalEntryNotFoundError, *incomplete) as e:
        raise ModelNotCachedError(repo_id, not_cached_message(repo_id, options, complete=not isinstance(
            e, incomplete))) from None
    files = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]
    snapshot = _snapshot_of(repo_id, path, quant, files)
    if weights and snapshot.gguf_file is None and not any(f.endswith(".safetensors") for f in files):
        raise ModelNotCachedError(repo_id, not_cached_message(repo_id, options, complete=False))
    return snapshot


def _snapshot_of(repo_id: str, path: Path, quant: str | None, files: list[str]) -> Snapshot:
    gguf = pick_gguf(repo_id, quant, files)
    return Snapshot(repo_id, path.name, path, path / gguf if gguf else None)


def _incomplete_snapshot_error() -> tuple[type[Exception], ...]:
    from huggingface_hub import errors

    cls = getattr(errors, "IncompleteSnapshotError", None)  # huggingface_hub >= 2
    return (cls,) if cls is not None else ()


def not_cached_message(repo_id: str, options: HubOptions, complete: bool = True) -> str:
    where = repo_cache_path(repo_id, options)
    rev = f" at revision {options.revision!r}" if options.revision else ""
    state = "is not in the cache" if complete else "is only partly in the cache"
    fetch_cmd = f"slicelm download {repo_id}" + (f" --revision {options.revision}" if options.revision else "")
    if options.download_dir:
        fetch_cmd += f" --download-dir {options.download_dir}"
    return (f"model {repo_id!r}{rev} {state} and the Hub is not used (HF_HUB_OFFLINE=1 or no network); looked in "
            f"{where} (cache {cache_dir(options)}: --download-dir, HF_HUB_CACHE or HF_HOME). Pre-fetch it on a machine "
            f"with network with `{fetch_cmd}` (or `hf download {repo_id}`) and copy the cache, or unset HF_HUB_OFFLINE")


@contextlib.contextmanager
def repo_lock(repo_id: str, options: HubOptions) -> Iterator[None]:
    """One process at a time fetches a repo into a cache: the others wait, then find the files there."""
    from filelock import FileLock, Timeout
    from huggingface_hub.file_download import repo_folder_name

    path = cache_dir(options) / ".locks" / "slicelm" / f"{repo_folder_name(repo_id=repo_id, repo_type='model')}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("another process is downloading %s: waiting for it (%s)", repo_id, path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def _removing_partial_download(repo_id: str, options: HubOptions) -> Iterator[None]:
    """A full disk during a download: remove what this download added to the repo's snapshots and its unfinished
    blobs, so that no half-written snapshot is ever taken as complete, then raise ``DownloadDiskFullError``."""
    storage = repo_cache_path(repo_id, options)
    before = _snapshot_entries(storage)
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_FULL:
            raise
        _remove_new_entries(storage, before)
        raise DownloadDiskFullError(repo_id, (
            f"model {repo_id!r}: the disk filled up while downloading into {cache_dir(options)} ({e.strerror}); the "
            "partial download was removed. Free space, or point --download-dir / HF_HOME at a larger disk")) from e


def _snapshot_entries(storage: Path) -> set[Path]:
    snapshots = storage / "snapshots"
    return {p for p in snapshots.rglob("*")} if snapshots.is_dir() else set()


def _remove_new_entries(storage: Path, before: set[Path]) -> None:
    for blob in (storage / "blobs").glob("*.incomplete"):
        blob.unlink(missing_ok=True)
    new = sorted(_snapshot_entries(storage) - before, key=lambda p: len(p.parts), reverse=True)
    for p in new:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    for snap in (storage / "snapshots").glob("*") if (storage / "snapshots").is_dir() else []:
        if snap.is_dir() and not any(snap.iterdir()):
            snap.rmdir()


def describe(snapshot: Snapshot) -> dict[str, Any]:
    return {"repo_id": snapshot.repo_id, "commit": snapshot.commit, "path": str(snapshot.model_path)}
