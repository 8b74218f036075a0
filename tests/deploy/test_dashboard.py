"""The Grafana dashboard: every PromQL expression passes ``promtool check rules``, and a ``promtool test rules``
fixture built from real scrapes of ``slicelm serve`` (SmolLM2, with a GPU slice in its env) and ``slicelm router``
in front of it shows that each panel query returns data (non-NaN samples)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from helm_utils import CHART, ROOT, find, render
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = ROOT / "deploy" / "grafana" / "slicelm-dashboard.json"
# Grafana's variables, as Prometheus sees them once Grafana has substituted them.
GRAFANA_VARS = {"$__rate_interval": "1m", "$model": ".+"}
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found (Debian package 'prometheus'; scripts/setup.sh installs it as root)")


def panel_queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL) of every target, Grafana variables substituted."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"{panel['title']}: unsubstituted variable in {expr}"
            out.append((panel["title"], t["refId"], expr))
    return out


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_dashboard_is_the_one_the_chart_ships() -> None:
    assert (CHART / "dashboards" / "slicelm-dashboard.json").read_text() == DASHBOARD.read_text()
    docs = render(sets=("grafanaDashboards.enabled=true",))
    cm = find(docs, "ConfigMap", "rel-grafana-slicelm")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["slicelm-dashboard.json"]) == json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    for needed in ("Time to first token", "Time per output token", "KV cache usage", "Errors / s",
                   "Memory used vs slice", "SM share of the GPU"):
        assert needed in titles


@needs_promtool
def test_promtool_check_rules(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel{i}", "expr": expr} for i, (_, _, expr) in enumerate(panel_queries())]}]}
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    proc = _promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules['groups'][0]['rules'])} rules found" in proc.stdout
    # promtool does reject a broken expression (the check above can fail).
    rules["groups"][0]["rules"].append({"record": "dashboard:broken", "expr": "sum by (le (rate(x[1m]))"})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(rules))
    assert _promtool("check", "rules", "bad.yaml", cwd=tmp_path).returncode != 0


# ---------------------------------------------------------------------------------------- real scrapes
def _samples(text: str, instance: str) -> dict[str, float]:
    """'name{labels}' -> value for every sample of a Prometheus text exposition, with job/instance added."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = {**s.labels, "job": "slicelm", "instance": instance}
            body = ",".join(f'{k}={json.dumps(v)}' for k, v in sorted(labels.items()))
            out[f"{s.name}{{{body}}}"] = s.value
    return out


def _series(before: dict[str, float], after: dict[str, float]) -> list[dict]:
    """Two scrapes as promtool input series: the first scrape for 30 s, then the second (15 s steps)."""
    def fmt(v: float | None) -> str:
        return "_" if v is None else repr(float(v)).replace("inf", "Inf")
    return [{"series": name, "values": " ".join([fmt(before.get(name))] * 2 + [fmt(value)] * 6)}
            for name, value in sorted(after.items())]


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """Real scrapes of a SmolLM2 server (2 GiB / 30 % slice in its env) and of a router in front of it (plus a
    backend that never answers in time, so the router counts errors), before and after a few requests."""
    sys.path.insert(0, str(ROOT / "tests" / "router"))
    import router_helpers as rh

    tmp = tmp_path_factory.mktemp("dashboard")
    slice_env = {"SLICELM_SLICE_MEMORY_BYTES": str(2 << 30), "SLICELM_SLICE_SM_PERCENT": "30"}
    saved = {k: os.environ.get(k) for k in slice_env}
    os.environ.update(slice_env)
    try:
        server = rh.server_launcher.start_server(tmp, "--max-model-len", "1024", "--max-num-seqs", "8")
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    procs = []
    try:
        httpx.post(f"{server.url}/v1/completions", timeout=60,  # warm up: the router's timeout is short
                   json={"model": rh.SMOLLM, "prompt": "Hi", "max_tokens": 2}).raise_for_status()
        slow = rh.start_fake(tmp, "--delay", "30", model=rh.SMOLLM)
        procs.append(slow)
        router = rh.start_router(tmp, [server.url, slow.url], [rh.SMOLLM, rh.SMOLLM], "--first-byte-timeout", "10",
                                 "--engine-stats-interval", "1", "--max-instance-failover-reroute-attempts", "2")
        procs.append(router)
        system = "You are a terse assistant. " * 12  # several full KV blocks shared by every request

        def chat(i: int) -> None:
            r = httpx.post(f"{router.url}/v1/chat/completions", timeout=60, json={
                "model": rh.SMOLLM, "max_tokens": 8, "temperature": 0, "stream": i % 2 == 0,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"Count to {i}."}]})
            assert r.status_code == 200, r.text

        for i in range(2):  # as in a running stack, the per-request series exist before the window
            chat(i)
        time.sleep(1.5)
        before = {**_samples(httpx.get(f"{server.url}/metrics").text, "engine-0"),
                  **_samples(httpx.get(f"{router.url}/metrics").text, "router-0")}
        for i in range(2, 8):
            chat(i)
        time.sleep(1.5)  # the router's engine stats scrape
        after = {**_samples(httpx.get(f"{server.url}/metrics").text, "engine-0"),
                 **_samples(httpx.get(f"{router.url}/metrics").text, "router-0")}
    finally:
        for p in procs:
            p.stop()
        rh.server_launcher.stop_server(server)
    return before, after


@pytest.mark.slow
@needs_promtool
def test_every_panel_returns_data(scrapes: tuple[dict, dict], tmp_path: Path) -> None:
    before, after = scrapes
    names = {re.match(r"[^{]+", s).group(0) for s in after}
    for metric in ("slicelm:slice_memory_limit_bytes", "slicelm:slice_sm_percent", "slicelm:memory_used_bytes",
                   "vllm:request_errors_total", "vllm:num_incoming_requests_total", "vllm:request_success_total"):
        assert metric in names, f"{metric} not scraped"
    queries = panel_queries()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel{i}", "expr": expr} for i, (_, _, expr) in enumerate(queries)]}]}
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    # Each query has at least one non-NaN sample at 1m (rates see the requests between the two scrapes).
    tests = [{"expr": f"count(({expr}) == ({expr})) > bool 0", "eval_time": "1m",
              "exp_samples": [{"labels": "{}", "value": 1}]} for _, _, expr in queries]
    fixture = {"rule_files": ["rules.yaml"], "evaluation_interval": "15s",
               "tests": [{"interval": "15s", "input_series": _series(before, after), "promql_expr_test": tests}]}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(fixture, sort_keys=False, width=1 << 20))
    proc = _promtool("test", "rules", "test.yaml", cwd=tmp_path)
    if proc.returncode != 0:
        failed = [f"{title} [{ref}]: {expr}" for title, ref, expr in queries
                  if json.dumps(expr)[1:-1] in proc.stdout + proc.stderr]
        raise AssertionError("panel queries without data:\n" + "\n".join(failed) + "\n" + proc.stdout[-4000:]
                             + proc.stderr[-2000:])
    assert "SUCCESS" in proc.stdout
