"""K8sDiscovery against a Kubernetes API double serving real Pod JSON (the chart's own engine pod
template, validated against the Kubernetes 1.30 schema) and fake pod backends answering /v1/models."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import kubernetes_validate
import pytest
from helm_utils import K8S_VERSION, find, render
from k8s_api_double import K8sApiDouble
from kubernetes import client as k8s_client

from slicelm.router.discovery import ServiceDiscovery
from slicelm.router.discovery_k8s import K8sDiscovery, pod_is_ready

NS = "serving"
RELEASE = "rag"
SELECTOR = f"app.kubernetes.io/component=serving-engine,helm-release-name={RELEASE}"
TS = "2026-01-01T00:00:00Z"


class FakeBackend:
    """A pod's server: /v1/models with the given ids (or 503 while ``up`` is False)."""

    def __init__(self, *models: str) -> None:
        self.models, self.up = list(models), True
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path != "/v1/models" or not backend.up:
                    self.send_error(503 if backend.up is False else 404)
                    return
                body = json.dumps({"object": "list", "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "slicelm", "root": m}
                    for m in backend.models]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def pod_template() -> dict:
    """The engine pod template the chart renders for release RELEASE (CPU stack example)."""
    from helm_utils import ROOT
    docs = render(ROOT / "examples" / "stacks" / "cpu-rag.yaml", release=RELEASE, namespace=NS)
    return find(docs, "Deployment", f"{RELEASE}-chat-deployment-vllm")["spec"]["template"]


def make_pod(template: dict, name: str, port: int, ready: bool, uid: str | None = None) -> dict:
    """A Pod object as the API server returns it for one replica of the chart's Deployment."""
    spec = json.loads(json.dumps(template["spec"]))
    spec["containers"][0]["ports"][0]["containerPort"] = port
    spec["nodeName"] = "node-1"
    cond = "True" if ready else "False"
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "uid": uid or str(uuid.uuid4()), "creationTimestamp": TS,
                     "labels": dict(template["metadata"]["labels"], **{"pod-template-hash": "5d8f7c9b4"}),
                     "annotations": dict(template["metadata"].get("annotations") or {})},
        "spec": spec,
        "status": {
            "phase": "Running", "hostIP": "10.0.0.1", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": TS, "qosClass": "Burstable",
            "conditions": [{"type": t, "status": s, "lastTransitionTime": TS} for t, s in
                           (("Initialized", "True"), ("Ready", cond), ("ContainersReady", cond),
                            ("PodScheduled", "True"))],
            "containerStatuses": [{"name": "slicelm", "ready": ready, "restartCount": 0, "started": True,
                                   "image": spec["containers"][0]["image"], "imageID": "",
                                   "state": {"running": {"startedAt": TS}}}],
        },
    }


def set_ready(pod: dict, ready: bool) -> dict:
    for c in pod["status"]["conditions"]:
        if c["type"] in ("Ready", "ContainersReady"):
            c["status"] = "True" if ready else "False"
    pod["status"]["containerStatuses"][0]["ready"] = ready
    return pod


async def until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


def test_pod_json_is_a_valid_kubernetes_pod(pod_template: dict) -> None:
    pod = make_pod(pod_template, "rag-chat-deployment-vllm-5d8f7c9b4-abcde", 8000, ready=True)
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert pod_is_ready(pod)
    assert not pod_is_ready(set_ready(pod, False))
    assert not pod_is_ready(dict(pod, metadata=dict(pod["metadata"], deletionTimestamp=TS)))


def _discovery(api: K8sApiDouble) -> K8sDiscovery:
    config = k8s_client.Configuration(host=api.url)
    return K8sDiscovery(NS, SELECTOR, port=None, api_client=k8s_client.ApiClient(config),
                        retry_interval=0.1, watch_timeout=30)


def test_backend_set_follows_pods(pod_template: dict) -> None:
    asyncio.run(_follow(pod_template))


async def _follow(tpl: dict) -> None:
    api = K8sApiDouble(NS).start()
    a, b, c = FakeBackend("smollm2-135m-instruct"), FakeBackend("smollm2-135m-instruct"), FakeBackend("minilm")
    other = make_pod(tpl, "other-release-pod", a.port, ready=True)
    other["metadata"]["labels"]["helm-release-name"] = "someone-else"
    pod_a = make_pod(tpl, "chat-a", a.port, ready=True)
    pod_b = make_pod(tpl, "chat-b", b.port, ready=False)
    for p in (pod_a, pod_b, other):
        api.put(p)
    disc = _discovery(api)
    assert isinstance(disc, ServiceDiscovery)
    urls = lambda: [e.url for e in disc.endpoints()]
    await disc.start()
    try:
        # The list: only the Ready pod of this release, with what its /v1/models says.
        await until(lambda: urls() == [a.url], "pod a listed")
        (ep,) = disc.endpoints()
        assert ep.models == ("smollm2-135m-instruct",) and ep.labels["model"] == "chat"
        assert api.requests[0]["labelSelector"] == [SELECTOR]
        await until(lambda: api.open_watches() == 1, "watch open")
        # MODIFIED: b turns Ready -> joins.
        api.put(set_ready(pod_b, True))
        await until(lambda: urls() == sorted([a.url, b.url]), "b ready")
        # MODIFIED: a turns not Ready -> leaves at once (no /v1/models round trip needed).
        api.put(set_ready(pod_a, False))
        took = await until(lambda: urls() == [b.url], "a not ready")
        assert took < 1.0
        # DELETED: b -> empty set.
        api.delete("chat-b")
        await until(lambda: urls() == [], "b deleted")
        # ADDED: a pod whose server does not answer yet is not an endpoint until it does.
        c.up = False
        api.put(make_pod(tpl, "embed-c", c.port, ready=True))
        await asyncio.sleep(0.5)
        assert urls() == []
        c.up = True
        await until(lambda: urls() == [c.url], "c answers /v1/models")
        assert disc.endpoints()[0].models == ("minilm",)
        # Connection cut while pods change: the watch reconnects with a fresh list.
        api.cut_watches()
        api.delete("embed-c", emit=False)
        api.put(set_ready(pod_a, True), emit=False)
        await until(lambda: urls() == [a.url], "relisted after the watch dropped")
        # 410 Gone on the watch: list again.
        lists = sum(1 for q in api.requests if q.get("watch") != ["true"])
        await until(lambda: api.open_watches() == 1, "watch reopened")
        api.gone()
        await until(lambda: sum(1 for q in api.requests if q.get("watch") != ["true"]) > lists, "relist after 410")
        await until(lambda: urls() == [a.url], "same set after 410")
        # A pod being deleted (deletionTimestamp set, still Running) leaves before DELETED arrives.
        pod_a["metadata"]["deletionTimestamp"] = TS
        api.put(pod_a)
        await until(lambda: urls() == [], "a terminating")
    finally:
        t0 = time.monotonic()
        await disc.stop()
        assert time.monotonic() - t0 < 3.0, "stop() must not wait for the watch timeout"
        api.stop()
        for s in (a, b, c):
            s.close()


def test_api_server_down_then_up(pod_template: dict) -> None:
    """Discovery started while the API server refuses connections keeps retrying and syncs once it is up."""
    asyncio.run(_late_api(pod_template))


async def _late_api(tpl: dict) -> None:
    with socket.socket() as s:  # a port nobody listens on (yet)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = FakeBackend("m")
    config = k8s_client.Configuration(host=f"http://127.0.0.1:{port}")
    disc = K8sDiscovery(NS, SELECTOR, port=None, api_client=k8s_client.ApiClient(config), retry_interval=0.1)
    await disc.start()
    api = None
    try:
        await asyncio.sleep(0.5)
        assert disc.endpoints() == [] and not disc.synced.is_set()
        api = K8sApiDouble(NS, port)
        api.put(make_pod(tpl, "late", backend.port, ready=True))
        api.start()
        await until(lambda: [e.url for e in disc.endpoints()] == [backend.url], "synced after the API came up")
    finally:
        await disc.stop()
        if api is not None:
            api.stop()
        backend.close()
