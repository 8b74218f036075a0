"""Where the replicas are: the ``Endpoint`` record and the ``ServiceDiscovery`` protocol, static and stack sources.

Discovery says which URLs exist and which model names they were declared with; the backend pool
(``backends.py``) then polls each URL's ``/v1/models`` and ``/health`` for what it really serves now.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    url: str
    models: tuple[str, ...]
    model_type: str | None = None
    labels: dict[str, Any] = field(default_factory=dict, hash=False)
    annotations: dict[str, str] = field(default_factory=dict, hash=False)  # a pod's HAMi ones (k8s discovery)

    def __post_init__(self) -> None:
        assert not self.url.endswith("/"), f"endpoint URL {self.url!r} must not end with '/'"


@runtime_checkable
class ServiceDiscovery(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def endpoints(self) -> list[Endpoint]: ...


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"backend URL {url!r} must start with http:// or https://")
    return url


class StaticDiscovery:
    """``--static-backends`` / ``--static-models`` / ``--static-model-types``: one entry per backend, in order."""

    def __init__(self, urls: list[str], models: list[str], model_types: list[str] | None = None) -> None:
        if len(urls) != len(models):
            raise ValueError(f"--static-models: {len(models)} names for {len(urls)} --static-backends")
        if model_types and len(model_types) != len(urls):
            raise ValueError(f"--static-model-types: {len(model_types)} types for {len(urls)} --static-backends")
        types = model_types or [None] * len(urls)
        self._endpoints = [Endpoint(normalize_url(u), (m,), t) for u, m, t in zip(urls, models, types)]

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints)


def _state_path(path: Path) -> Path:
    """A ``state.json``, a run directory holding one, or a stack YAML file (its run dir's ``state.json``)."""
    if path.is_dir():
        return path / "state.json"
    if path.suffix in (".yaml", ".yml"):
        try:
            from slicelm.stack.spec import load_stack
            from slicelm.stack.state import resolve_run_dir
        except ImportError as e:
            raise ValueError(f"--stack {path}: reading a stack file needs slicelm.stack ({e})") from None
        spec = load_stack(path)
        return resolve_run_dir(None, getattr(spec.slicelm, "runDir", None)) / "state.json"
    return path


def endpoints_from_state(state: dict[str, Any]) -> list[Endpoint]:
    """The ``ready`` replicas of a stack supervisor's ``state.json``."""
    out = []
    for r in state.get("replicas") or []:
        if r.get("state") != "ready" or not r.get("url"):
            continue
        names = tuple(r.get("served_names") or [r.get("model")])
        out.append(Endpoint(normalize_url(r["url"]), names, r.get("model_type"),
                            {"model": r.get("model"), "replica": r.get("replica")}))
    return out


class StackDiscovery:
    """Follows ``slicelm up``'s run-dir ``state.json`` (rewritten atomically on every change), polled each second."""

    def __init__(self, path: str | os.PathLike[str], poll_interval: float = 1.0) -> None:
        self.path = _state_path(Path(path).expanduser())
        self.poll_interval = poll_interval
        self._endpoints: list[Endpoint] = []
        self._mtime: float | None = None
        self._task: asyncio.Task[None] | None = None
        self.reload()

    def reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            if self._endpoints:
                logger.warning("stack state %s is gone: no endpoints", self.path)
            self._endpoints, self._mtime = [], None
            return
        if mtime == self._mtime:
            return
        try:
            state = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            logger.warning("cannot read stack state %s: %s", self.path, e)
            return
        self._mtime = mtime
        self._endpoints = endpoints_from_state(state)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            self.reload()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints)
