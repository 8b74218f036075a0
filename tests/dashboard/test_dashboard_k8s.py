"""The dashboard of a router with Kubernetes discovery (an API server double, replicas that answer like ``slicelm
serve`` on GPUs): GPU data from the replicas' own ``slicelm:*`` / ``vllm:*`` metrics and HAMi's pod annotations;
``/dashboard/api/state`` is keyed like the compute routes, the page is not and carries no key."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from kubernetes import client as k8s_client

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
from k8s_api_double import K8sApiDouble

from slicelm.router.app import Router
from slicelm.router.config import RouterConfig
from slicelm.router.discovery_k8s import K8sDiscovery

NS = "llm"
KEY = "sekret-key-123"
MiB = 1 << 20


def replica_app(model: str, used_mib: int, slice_mib: int | None, sm: int | None) -> web.Application:
    """/health, /v1/models and a /metrics page shaped like a GPU replica's."""
    metrics = [f'vllm:num_requests_running{{engine="0",model_name="{model}"}} 1.0',
               f'vllm:kv_cache_usage_perc{{engine="0",model_name="{model}"}} 0.5',
               f'slicelm:memory_used_bytes{{device="cuda:0",engine="0",model_name="{model}"}} {used_mib * MiB}']
    if slice_mib:
        metrics.append(f'slicelm:slice_memory_limit_bytes{{engine="0",model_name="{model}"}} {slice_mib * MiB}')
    if sm:
        metrics.append(f'slicelm:slice_sm_percent{{engine="0",model_name="{model}"}} {sm}')
    text = "\n".join(f"# TYPE {m.split('{')[0]} gauge\n{m}" for m in metrics) + "\n"
    app = web.Application()
    app.router.add_get("/health", lambda r: web.Response(text=""))
    app.router.add_get("/v1/models", lambda r: web.json_response(
        {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "slicelm"}]}))
    app.router.add_get("/metrics", lambda r: web.Response(text=text, content_type="text/plain"))
    return app


def pod(name: str, port: int, annotations: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "uid": str(uuid.uuid4()), "labels": {"app": "llm"},
                         "annotations": annotations},
            "spec": {"nodeName": "node-1", "containers": [{"name": "slicelm", "ports": [
                {"name": "container-port", "containerPort": port}]}]},
            "status": {"phase": "Running", "podIP": "127.0.0.1",
                       "conditions": [{"type": "Ready", "status": "True"}]}}


async def wait_state(client: TestClient, ok, timeout: float = 30.0) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    state: dict = {}
    while time.monotonic() < deadline:
        r = await client.get("/dashboard/api/state", headers={"Authorization": f"Bearer {KEY}"})
        if r.status == 200:
            state = await r.json()
            if ok(state):
                return state
        await asyncio.sleep(0.5)
    raise AssertionError(f"dashboard state never matched; last: {state}")


async def scenario() -> None:
    api = K8sApiDouble(NS).start()
    servers = [TestServer(replica_app("chat", 900, None, None)), TestServer(replica_app("embed", 700, 2048, 40))]
    for s in servers:
        await s.start_server()
    chat_url, embed_url = (f"http://127.0.0.1:{s.port}" for s in servers)
    hami = {"hami.io/vgpu-devices-allocated": "GPU-aa,NVIDIA,8000,30:;", "hami.io/vgpu-node": "node-1",
            "other.io/ignored": "x"}
    api.put(pod("chat-0", servers[0].port, hami))
    api.put(pod("embed-0", servers[1].port, {}))
    disc = K8sDiscovery(NS, "app=llm", port=None, api_client=k8s_client.ApiClient(
        k8s_client.Configuration(host=api.url)), retry_interval=0.1)
    router = Router(RouterConfig(service_discovery="k8s", k8s_namespace=NS, api_key=KEY), disc)
    client = TestClient(TestServer(router.build_app()))
    await client.start_server()
    try:
        r = await client.get("/dashboard/api/state")
        assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
        page = await client.get("/dashboard/")
        html = await page.text()
        assert page.status == 200 and "static/dashboard.js" in html and KEY not in html
        js = await client.get("/dashboard/static/dashboard.js")
        assert js.status == 200 and KEY not in await js.text()
        state = await wait_state(client, lambda s: len(s["gpus"]) == 2 and all(
            r["memory_used_mib"] for r in s["replicas"]))
    finally:
        await client.close()
        for s in servers:
            await s.close()
        api.stop()
    assert state["router"]["discovery"] == "k8s" and state["stack"] is None and state["cpu"] is None
    by_id = {g["uuid"] or g["label"]: g for g in state["gpus"]}
    hami_gpu = by_id["GPU-aa"]  # named by HAMi: the slice HAMi gave the pod, the use the replica measures
    assert [(s["key"], s["memory_mib"], s["cores"], s["memory_used_mib"]) for s in hami_gpu["slices"]] == [
        (chat_url, 8000, 30, 900)]
    own = by_id[f"GPU of {embed_url}"]  # no HAMi: the replica's own slicelm:slice_* metrics
    assert [(s["key"], s["memory_mib"], s["cores"], s["memory_used_mib"]) for s in own["slices"]] == [
        (embed_url, 2048, 40, 700)]
    chat = next(r for r in state["replicas"] if r["url"] == chat_url)
    assert chat["node"] == "node-1" and chat["device"] == "cuda" and chat["running"] == 1 and chat["kv_usage"] == 0.5
    assert sorted(m["name"] for m in state["models"]) == ["chat", "embed"]


def test_k8s_pods_gpu_view_and_api_key() -> None:
    asyncio.run(scenario())
