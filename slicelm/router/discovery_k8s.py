"""``--service-discovery k8s``: the router's backends are the Ready pods that match a label selector.

A thread lists the pods of one namespace (official ``kubernetes`` client) and then follows the watch stream
from that list's resourceVersion: ADDED / MODIFIED events update the pod, a pod that is deleted, being
deleted or not Ready leaves the backend set at once, and any error (410 Gone, a dropped connection, the
API server restarting) leads to a fresh list and watch after a short backoff. An asyncio task reads each
Ready pod's ``/v1/models`` (what it really serves) and re-reads it now and then; a pod becomes an
endpoint once it answered. Pod IPs are addressed directly (production-stack's ``pod-ip`` discovery type).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch

from slicelm.router.discovery import Endpoint

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8000
PORT_NAME = "container-port"  # the chart's (and production-stack's) engine container port


@dataclass
class PodState:
    """What discovery knows of one pod; ``models`` is None until its ``/v1/models`` answered."""

    uid: str
    url: str | None  # None while the pod has no IP
    ready: bool
    labels: dict[str, str]
    annotations: dict[str, str] = field(default_factory=dict)  # HAMi's (hami.io/*): its GPU decision
    models: tuple[str, ...] | None = None
    checked_at: float = 0.0


def pod_is_ready(pod: dict[str, Any]) -> bool:
    """Running, not being deleted, with an IP and the Ready condition True."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") != "Running" or not status.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def pod_port(pod: dict[str, Any], port: int | None) -> int:
    """``port`` when given (``--k8s-port``), else the container port named ``container-port``, else the first."""
    if port is not None:
        return port
    ports = [p for c in (pod.get("spec") or {}).get("containers") or [] for p in c.get("ports") or []]
    named = [p["containerPort"] for p in ports if p.get("name") == PORT_NAME and "containerPort" in p]
    declared = [p["containerPort"] for p in ports if "containerPort" in p]
    return (named or declared or [DEFAULT_PORT])[0]


def pod_state(pod: dict[str, Any], port: int | None) -> PodState:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    ip = status.get("podIP")
    hami = {k: str(v) for k, v in (meta.get("annotations") or {}).items() if k.startswith("hami.io/")}
    return PodState(uid=meta.get("uid", ""), url=f"http://{ip}:{pod_port(pod, port)}" if ip else None,
                    ready=pod_is_ready(pod), labels=dict(meta.get("labels") or {}), annotations=hami)


def _api_client() -> k8s_client.ApiClient:
    """In a pod: its service account; elsewhere: the user's kubeconfig."""
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    return k8s_client.ApiClient()


class K8sDiscovery:
    """The ``ServiceDiscovery`` of ``slicelm router --service-discovery k8s``.

    ``namespace`` / ``label_selector`` / ``port`` are production-stack's ``--k8s-namespace``,
    ``--k8s-label-selector`` and ``--k8s-port``. ``api_client`` defaults to in-cluster config (the
    chart's service account, allowed to get/list/watch pods), else kubeconfig.
    """

    def __init__(self, namespace: str, label_selector: str = "", port: int | None = DEFAULT_PORT, *,
                 api_client: k8s_client.ApiClient | None = None, api_key: str | None = None,
                 watch_timeout: int = 300, retry_interval: float = 1.0, models_interval: float = 30.0,
                 models_timeout: float = 5.0) -> None:
        assert watch_timeout > 0 and retry_interval > 0 and models_interval > 0
        self.namespace, self.label_selector, self.port = namespace, label_selector, port
        self.api_key = api_key if api_key is not None else os.environ.get("VLLM_API_KEY")
        self.watch_timeout, self.retry_interval = watch_timeout, retry_interval
        self.models_interval, self.models_timeout = models_interval, models_timeout
        self._api_client = api_client
        self._pods: dict[str, PodState] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._resp: Any = None  # the open watch response, shut down by stop()
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._models_task: asyncio.Task[None] | None = None
        self.synced = threading.Event()  # set after the first successful list

    # ------------------------------------------------------------------ ServiceDiscovery
    async def start(self) -> None:
        if self._api_client is None:
            self._api_client = await asyncio.to_thread(_api_client)
        self._loop, self._changed = asyncio.get_running_loop(), asyncio.Event()
        self._thread = threading.Thread(target=self._watch_forever, name="k8s-discovery", daemon=True)
        self._thread.start()
        self._models_task = asyncio.create_task(self._models_forever())

    async def stop(self) -> None:
        self._stopping.set()
        resp = self._resp
        if resp is not None and hasattr(resp, "shutdown"):
            resp.shutdown()  # urllib3 >= 2.3: unblocks the watch thread's read from here
        if self._models_task is not None:
            self._models_task.cancel()
            await asyncio.gather(self._models_task, return_exceptions=True)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)

    def endpoints(self) -> list[Endpoint]:
        with self._lock:
            pods = list(self._pods.values())
        return sorted((Endpoint(p.url, p.models, p.labels.get("model_type"), dict(p.labels), dict(p.annotations))
                       for p in pods if p.ready and p.url and p.models), key=lambda e: e.url)

    # ------------------------------------------------------------------ pods (watch thread)
    def _core(self) -> k8s_client.CoreV1Api:
        return k8s_client.CoreV1Api(self._api_client)

    def _list(self) -> str:
        """Replaces the pod set with a fresh list; returns its resourceVersion."""
        resp = self._core().list_namespaced_pod(self.namespace, label_selector=self.label_selector,
                                                _preload_content=False, _request_timeout=30)
        body = json.loads(resp.data)
        pods = {p["metadata"]["name"]: pod_state(p, self.port) for p in body.get("items") or []}
        with self._lock:
            for name, new in pods.items():
                self._keep_models(self._pods.get(name), new)
            self._pods = pods
        self.synced.set()
        self._notify()
        return body.get("metadata", {}).get("resourceVersion", "")

    def _watch(self, resource_version: str) -> None:
        core = self._core()

        @functools.wraps(core.list_namespaced_pod)
        def list_pods(*args: Any, **kwargs: Any) -> Any:
            self._resp = core.list_namespaced_pod(*args, **kwargs)
            return self._resp

        w = k8s_watch.Watch()
        for event in w.stream(list_pods, self.namespace, label_selector=self.label_selector,
                              resource_version=resource_version, timeout_seconds=self.watch_timeout,
                              allow_watch_bookmarks=True, deserialize=False,
                              _request_timeout=(10, self.watch_timeout + 10)):
            if self._stopping.is_set():
                w.stop()
                break
            self._apply(event.get("type", ""), event.get("object") or {})

    def _apply(self, kind: str, pod: dict[str, Any]) -> None:
        if kind == "ERROR":
            raise k8s_client.ApiException(status=pod.get("code"), reason=pod.get("message"))
        name = (pod.get("metadata") or {}).get("name")
        if kind not in ("ADDED", "MODIFIED", "DELETED") or not name:
            return  # BOOKMARK
        new = None if kind == "DELETED" else pod_state(pod, self.port)
        with self._lock:
            old = self._pods.pop(name, None)
            if new is not None:
                self._keep_models(old, new)
                self._pods[name] = new
        if old is not None and old.ready and (new is None or not new.ready):
            logger.info("k8s discovery: pod %s (%s) left: %s", name, old.url, "deleted" if new is None else "not ready")
        self._notify()

    @staticmethod
    def _keep_models(old: PodState | None, new: PodState) -> None:
        """The same pod at the same URL keeps what it was found to serve."""
        if old is not None and old.uid == new.uid and old.url == new.url:
            new.models, new.checked_at = old.models, old.checked_at

    def _watch_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                self._watch(self._list())
            except Exception as e:  # the watch must outlive any API server trouble
                if self._stopping.is_set():
                    break
                logger.warning("k8s discovery: watch on %s/%s failed (%s: %s); listing again in %.1f s",
                               self.namespace, self.label_selector, type(e).__name__, e, self.retry_interval)
                self._stopping.wait(self.retry_interval)
            finally:
                self._resp = None

    def _notify(self) -> None:
        if self._loop is not None and self._changed is not None:
            self._loop.call_soon_threadsafe(self._changed.set)

    # ------------------------------------------------------------------ models (event loop)
    async def _models_forever(self) -> None:
        assert self._changed is not None
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        timeout = aiohttp.ClientTimeout(total=self.models_timeout)
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as http:
            while True:
                self._changed.clear()
                await self._refresh_models(http)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), self.retry_interval)

    async def _refresh_models(self, http: aiohttp.ClientSession) -> None:
        """Reads /v1/models of Ready pods not yet known, and of the others every ``models_interval``."""
        now = time.monotonic()
        with self._lock:
            due = [(name, p.uid, p.url) for name, p in self._pods.items() if p.ready and p.url
                   and (p.models is None or now - p.checked_at >= self.models_interval)]
        results = await asyncio.gather(*(self._read_models(http, url) for _, _, url in due))
        with self._lock:
            for (name, uid, url), models in zip(due, results):
                pod = self._pods.get(name)
                if pod is None or pod.uid != uid or pod.url != url:
                    continue  # gone or changed meanwhile
                if models is not None or pod.models is None:
                    pod.models, pod.checked_at = models, time.monotonic()

    @staticmethod
    async def _read_models(http: aiohttp.ClientSession, url: str) -> tuple[str, ...] | None:
        try:
            async with http.get(f"{url}/v1/models") as resp:
                resp.raise_for_status()
                body = await resp.json(content_type=None)
            models = tuple(m["id"] for m in body.get("data") or [])
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError, AttributeError) as e:
            logger.debug("k8s discovery: %s/v1/models: %s", url, e)
            return None
        return models or None
