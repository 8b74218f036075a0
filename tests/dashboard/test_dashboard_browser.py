"""The dashboard in headless Chromium (Debian's ``chromium`` driven by Playwright) against a real CPU stack from
``slicelm up`` (SmolLM2 chat + MiniLM embeddings): the page loads without console errors and shows every replica
and CPU slice with the values of ``/dashboard/api/state`` and ``slicelm ps --format json``; a request burst moves
its counters; the API key is asked for, never embedded; ``slicelm top`` and a replayed recording show the same
state; a killed replica shows as restarting, then ready again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from utils_models import minilm_dir
from utils_stack import ENV, ps, slicelm

from slicelm.router.dashboard.render import chromium_path, launch, serve_replay
from slicelm.router.dashboard.top import run_dir_state
from slicelm.stack.procs import free_port

pytestmark = pytest.mark.slow
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pyproject's dev extra)")
if chromium_path() is None:
    pytest.skip("chromium is not installed: Debian package chromium (scripts/setup.sh installs it where apt and "
                "root are)", allow_module_level=True)

CHAT, EMBED = "smollm2-135m-instruct", "all-minilm-l6-v2"
KEY = "dash-key-42"
# Every replica row, CPU slice and model row of the page, with the raw values it shows (data-value is JSON), and
# the state it drew them from, read in one go (the page cannot re-render in between).
SNAPSHOT_JS = """() => {
  const fields = (node) => Object.fromEntries([...node.querySelectorAll('[data-field]')].map(
    (e) => [e.dataset.field, JSON.parse(e.dataset.value)]));
  const by = (sel, attr) => Object.fromEntries([...document.querySelectorAll(sel)].map(
    (e) => [e.dataset[attr], fields(e)]));
  return {state: lastState, rows: by('tr[data-replica]', 'replica'), slices: by('li[data-slice]', 'slice'),
          models: by('tr[data-model]', 'model'),
          devices: [...document.querySelectorAll('.device[data-device]')].map((e) => e.dataset.device),
          charts: [...document.querySelectorAll('svg[data-chart]')].map((e) => e.dataset.chart)};
}"""
ROW_FIELDS = {"status": "status", "restarts": "restarts", "uptime_s": "uptime_s", "device": "device",
              "requests": "requests", "errors": "errors", "requests_per_s": "requests_per_s", "kv_usage": "kv_usage",
              "prefix_hit_rate": "prefix_hit_rate"}
PS_FIELDS = ("model", "replica", "url", "pid", "state", "restarts", "gpus", "memory_mib", "cores", "device", "policy",
             "served_names")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    minilm_dir()  # skips without the wheel
    tmp = tmp_path_factory.mktemp("dash")
    port = free_port("127.0.0.1")
    spec = {"servingEngineSpec": {"modelSpec": [
        {"name": "chat", "modelURL": CHAT, "vllmConfig": {"maxModelLen": 512, "maxNumSeqs": 4,
                                                          "enablePrefixCaching": True}},
        {"name": "embed", "modelURL": EMBED, "vllmConfig": {"maxModelLen": 128, "extraArgs": ["--task", "embed"]}}]},
        "routerSpec": {"routingLogic": "roundrobin", "containerPort": port},
        "slicelm": {"runDir": str(tmp / "run"), "startupTimeout": 240}}
    path = tmp / "stack.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    r = slicelm("up", str(path), "--detach", timeout=400)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    try:
        yield {"run_dir": tmp / "run", "url": f"http://127.0.0.1:{port}", "up": r.stdout + r.stderr, "tmp": tmp}
    finally:
        slicelm("down", "--run-dir", str(tmp / "run"), timeout=120)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        b = launch(pw)
        yield b
        b.close()


class Page:
    """A browser tab on the dashboard that records console errors and uncaught exceptions."""

    def __init__(self, browser: Any, url: str) -> None:
        self.errors: list[str] = []
        self.page = browser.new_page(viewport={"width": 1400, "height": 900})
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.goto(url)

    def rendered(self, timeout_s: float = 30) -> None:
        self.page.wait_for_function("document.body.dataset.renderedAt", timeout=timeout_s * 1000)

    def snapshot(self) -> dict[str, Any]:
        return self.page.evaluate(SNAPSHOT_JS)

    def until(self, check: Callable[[dict[str, Any]], bool], what: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.time() + timeout_s
        snap: dict[str, Any] = {}
        while time.time() < deadline:
            snap = self.snapshot()
            if snap["state"] and check(snap):
                return snap
            time.sleep(0.5)
        raise AssertionError(f"the page never showed {what}; last rows: {snap.get('rows')}")

    def close(self) -> None:
        self.page.close()


@pytest.fixture
def page(browser: Any, stack: dict[str, Any]) -> Iterator[Page]:
    p = Page(browser, stack["url"] + "/dashboard")
    yield p
    p.close()


def assert_dom_shows_state(snap: dict[str, Any]) -> None:
    st = snap["state"]
    assert sorted(snap["rows"]) == sorted(r["key"] for r in st["replicas"])
    for r in st["replicas"]:
        row = snap["rows"][r["key"]]
        for field, key in ROW_FIELDS.items():
            assert row[field] == r[key], (r["key"], field)
        assert row["ttft"] == [r["ttft_p50"], r["ttft_p99"]] and row["tpot"] == [r["tpot_p50"], r["tpot_p99"]]
        assert row["queue"] == [r["running"], r["waiting"]]
    slices = [s for g in st["gpus"] for s in g["slices"]] + (st["cpu"]["slices"] if st["cpu"] else [])
    assert sorted(snap["slices"]) == sorted(s["key"] for s in slices) == sorted(snap["rows"])
    for s in slices:
        shown = snap["slices"][s["key"]]
        assert {k: shown[k] for k in ("memory_mib", "memory_used_mib", "status")} == {
            k: s[k] for k in ("memory_mib", "memory_used_mib", "status")}
    for m in st["models"]:
        assert snap["models"][m["name"]]["requests"] == m["requests"]


def test_page_shows_every_replica_and_slice_as_api_and_ps(stack: dict[str, Any], page: Page) -> None:
    assert f"dashboard: {stack['url']}/dashboard" in stack["up"]  # slicelm up prints where the page is
    page.rendered()
    assert page.page.url == stack["url"] + "/dashboard/"
    snap = page.until(lambda s: s["state"]["stack"]["phase"] == "ready", "the stack ready", 20)
    st = snap["state"]
    assert_dom_shows_state(snap)
    assert [r["key"] for r in st["replicas"]] == ["chat/0", "embed/0"]
    assert st["stack"]["phase"] == "ready" and st["router"]["discovery"] == "stack" and st["gpus"] == []
    assert snap["devices"] == ["cpu"] and st["cpu"]["memory_mib"] > 0
    assert {"chat:requests_per_s", "chat:ttft", "embed:queue", "cpu"} <= set(snap["charts"])
    listed = {r["model"]: r for r in ps(stack["run_dir"])["replicas"]}
    api = httpx.get(stack["url"] + "/dashboard/api/state", timeout=10).json()
    for shown in (st, api):
        for r in shown["replicas"]:
            p = listed[r["model"]]
            assert {k: r[k] for k in PS_FIELDS} == {k: p[k] for k in PS_FIELDS}
            assert r["status"] == "ready" and r["healthy"] is True
            # resident memory, read a moment apart by ps and by the router: the same within a few percent
            assert abs(r["memory_used_mib"] - p["memory_used_mib"]) <= 0.1 * p["memory_used_mib"]
    assert page.errors == []


def burst(url: str, chats: int, embeds: int) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=120)

    def chat(i: int) -> None:
        client.chat.completions.create(model=CHAT, max_tokens=4, temperature=0,
                                       messages=[{"role": "user", "content": f"Count to {i}."}])

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(chats)]
    for t in threads:
        t.start()
    for i in range(embeds):
        assert len(client.embeddings.create(model=EMBED, input=[f"sentence {i}"]).data[0].embedding) == 384
    for t in threads:
        t.join(180)


def test_request_burst_moves_the_counters(stack: dict[str, Any], page: Page) -> None:
    page.rendered()
    before = page.snapshot()["rows"]
    burst(stack["url"], chats=3, embeds=6)
    snap = page.until(lambda s: s["rows"]["chat/0"]["requests"] >= before["chat/0"]["requests"] + 3 and
                      s["rows"]["embed/0"]["requests"] >= before["embed/0"]["requests"] + 6,
                      "the burst's requests", timeout_s=60)
    assert_dom_shows_state(snap)
    chat = next(r for r in snap["state"]["replicas"] if r["key"] == "chat/0")
    assert chat["ttft_p50"] is not None and chat["ttft_p50"] > 0  # the replica's own histogram, this minute
    assert max(v for v in snap["state"]["history"]["models"]["chat"]["requests_per_s"] if v is not None) > 0
    assert page.errors == []


@pytest.fixture
def keyed_router(stack: dict[str, Any]) -> Iterator[str]:
    """A second router over the same stack, started with --api-key."""
    port = free_port("127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    with open(stack["tmp"] / "keyed-router.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "slicelm.entrypoints.cli", "router", "--host", "127.0.0.1",
                                 "--port", str(port), "--stack", str(stack["run_dir"]), "--api-key", KEY],
                                stdout=log, stderr=subprocess.STDOUT, env=ENV)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None and time.time() < deadline, "the keyed router did not start"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        proc.kill()
        proc.wait(30)


def test_api_key_is_asked_for_never_embedded(keyed_router: str, browser: Any) -> None:
    url = keyed_router
    assert httpx.get(f"{url}/dashboard/api/state", timeout=10).status_code == 401
    keyed = httpx.get(f"{url}/dashboard/api/state", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert keyed.status_code == 200 and [r["key"] for r in keyed.json()["replicas"]] == ["chat/0", "embed/0"]
    p = Page(browser, f"{url}/dashboard/")
    try:
        p.page.wait_for_selector("#key-form:not([hidden])", timeout=20_000)
        assert KEY not in p.page.content() and p.snapshot()["rows"] == {}
        p.page.fill("#api-key", KEY)
        p.page.click("#key-form button")
        p.rendered()
        snap = p.until(lambda s: len(s["rows"]) == 2, "both replicas after the key", 20)
        assert_dom_shows_state(snap)
        assert p.page.is_hidden("#key-form") and KEY not in p.page.content()
        assert [e for e in p.errors if "401" not in e] == []  # only the refused first poll
    finally:
        p.close()


def test_top_shows_the_same_state(stack: dict[str, Any]) -> None:
    r = slicelm("top", "--url", stack["url"], "--once", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "chat/0" in r.stdout and "embed/0" in r.stdout and "ready" in r.stdout and "CPU" in r.stdout
    r = slicelm("top", "--run-dir", str(stack["run_dir"]), "--format", "json", timeout=60)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["router"]["routing_logic"] == "roundrobin" and len(st["history"]["t"]) >= 1
    offline = run_dir_state(stack["run_dir"])  # a stack whose router is gone: ps's rows, no load figures
    listed = ps(stack["run_dir"])["replicas"]
    assert [(r["key"], r["status"], r["restarts"]) for r in offline["replicas"]] == [
        (f"{p['model']}/{p['replica']}", p["state"], p["restarts"]) for p in listed]
    assert offline["router"]["routing_logic"] is None and offline["replicas"][0]["requests"] is None
    bad = slicelm("top", "--url", "http://127.0.0.1:9", "--once", timeout=60)
    assert bad.returncode == 1 and "slicelm top: error:" in bad.stderr


def test_replay_renders_a_recording(stack: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    api = httpx.get(stack["url"] + "/dashboard/api/state", timeout=10).json()
    rec = tmp_path / "recording.json"
    rec.write_text(json.dumps({"device": "cpu-2-cores", "commit": "abc1234", "workload": "test", "snapshots": [api]}))
    with serve_replay(str(rec)) as url:
        p = Page(browser, url)
        try:
            p.rendered()
            snap = p.snapshot()
            assert_dom_shows_state(snap)
            assert snap["state"]["time"] == api["time"]
            assert "Rendered from recorded state: cpu-2-cores" in p.page.inner_text("#replay")
            assert p.errors == []
        finally:
            p.close()
    png = tmp_path / "shot.png"
    r = subprocess.run([sys.executable, "-m", "slicelm.router.dashboard.render", "--replay", str(rec), "--out",
                        str(png)], capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "rendered from recorded state" in r.stdout


def test_killed_replica_shows_restarting_then_ready(stack: dict[str, Any], page: Page) -> None:
    page.rendered()
    victim = next(r for r in ps(stack["run_dir"])["replicas"] if r["model"] == "chat")
    os.kill(victim["pid"], signal.SIGKILL)
    snap = page.until(lambda s: s["rows"]["chat/0"]["status"] == "restarting", "chat/0 restarting", 30)
    assert snap["slices"]["chat/0"]["status"] == "restarting" and snap["rows"]["embed/0"]["status"] == "ready"
    assert snap["models"]["chat"]["ready"] == [0, 1]
    snap = page.until(lambda s: s["rows"]["chat/0"]["status"] == "ready" and s["rows"]["chat/0"]["restarts"] == 1,
                      "chat/0 ready again after one restart", 240)
    assert_dom_shows_state(snap)
    assert next(r for r in ps(stack["run_dir"])["replicas"] if r["model"] == "chat")["restarts"] == 1
    assert page.errors == []
