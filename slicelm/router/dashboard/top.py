"""``slicelm top``: the dashboard's state in a terminal, as a live rich table (for machines without a browser).

It reads the router's ``/dashboard/api/state`` (``--url``, else the router of the stack in ``--run-dir``); a stack
whose router is not running is shown from its run dir alone (``slicelm ps``'s data: no load figures).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from slicelm.router.dashboard.history import History
from slicelm.router.dashboard.rows import stack_rows
from slicelm.router.dashboard.view import Meta, build_state
from slicelm.stack.status import status as stack_status

STATE_PATH = "/dashboard/api/state"
COLORS = {"ready": "green", "starting": "yellow", "restarting": "yellow"}


class TopError(RuntimeError):
    """The state cannot be read; the message says why and what to give."""


def state_url(url: str) -> str:
    """The state endpoint of a router given as its base URL or as its dashboard page's URL."""
    base = url.rstrip("/")
    for tail in (STATE_PATH, "/dashboard", "/v1"):
        if base.endswith(tail):
            base = base[: -len(tail)]
    return base + STATE_PATH


def fetch_state(url: str, api_key: str | None, timeout: float = 10.0) -> dict[str, Any]:
    req = urllib.request.Request(state_url(url), headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise TopError(f"{state_url(url)}: the router needs its API key (--api-key or VLLM_API_KEY)") from None
        raise TopError(f"{state_url(url)}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise TopError(f"{state_url(url)}: {e}") from None


def run_dir_state(run_dir: Path) -> dict[str, Any]:
    """A stack without its router: the rows of ``slicelm ps``, no load figures."""
    st = stack_status(run_dir)
    if st is None:
        raise TopError(f"no stack in {run_dir} (give --url for a router elsewhere)")
    meta = Meta(discovery="stack", run_dir=str(run_dir), phase=st["phase"])
    return build_state(meta, stack_rows(st, {}), st["gpus"], History(1.0, 2), time.time())


def read_state(url: str | None, run_dir: Path, api_key: str | None) -> dict[str, Any]:
    if url:
        return fetch_state(url, api_key)
    st = stack_status(run_dir)
    if st is not None and st["router"]:
        return fetch_state(st["router"]["url"], api_key)
    return run_dir_state(run_dir)


# ---------------------------------------------------------------- rendering
def _mib(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1024:.1f} GiB" if v >= 10240 else f"{round(v):,} MiB"


def _sec(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{round(v):,}"


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _uptime(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _sm(cores: int | None) -> str:
    """An SM cap; HAMi's 0 (and 100) mean none."""
    return f"{cores}%" if cores and cores < 100 else "-"


def _status(s: str) -> str:
    return f"[{COLORS.get(s, 'red')}]{s}[/]"


def devices_table(state: dict[str, Any]) -> Table:
    t = Table(title="devices", title_justify="left")
    for col in ("device", "total / used", "replica", "slice", "used", "SM", "policy", "state"):
        t.add_column(col)
    devices = [(g["label"], g) for g in state.get("gpus") or []]
    if state.get("cpu"):
        devices.append(("CPU", state["cpu"]))
    for name, d in devices:
        used = d.get("memory_used_mib")
        if used is None:
            used = sum(s["memory_used_mib"] or 0 for s in d["slices"]) or None
        total = f"{_mib(d.get('memory_mib'))} / {_mib(used)}"
        for i, s in enumerate(d["slices"]):
            t.add_row(name if i == 0 else "", total if i == 0 else "", s["key"], _mib(s["memory_mib"]),
                      _mib(s["memory_used_mib"]), _sm(s["cores"]), s["policy"] or "-",
                      _status(s["status"]))
    return t


def _load_cells(x: dict[str, Any]) -> list[str]:
    return [_rate(x["requests_per_s"]), _num(x["requests"]), _num(x["errors"]),
            f"{_sec(x['ttft_p50'])} / {_sec(x['ttft_p99'])}", f"{_sec(x['tpot_p50'])} / {_sec(x['tpot_p99'])}",
            f"{_num(x['running'])} / {_num(x['waiting'])}", _pct(x["kv_usage"]), _pct(x["prefix_hit_rate"])]


def models_table(state: dict[str, Any]) -> Table:
    t = Table(title="models", title_justify="left")
    for col in ("model / replica", "state", "restarts", "uptime", "req/s", "requests", "errors", "TTFT p50/p99",
                "TPOT p50/p99", "run/wait", "KV", "prefix hits"):
        t.add_column(col, justify="left" if col in ("model / replica", "state") else "right", no_wrap=True)
    for m in state.get("models") or []:
        t.add_row(f"[bold]{m['name']}[/]", f"{m['ready']}/{m['replicas']} ready", "", "", *_load_cells(m))
        for r in (r for r in state["replicas"] if r["model"] == m["name"]):
            t.add_row(f"  {r['key']}", _status(r["status"]), "-" if r["restarts"] is None else str(r["restarts"]),
                      _uptime(r["uptime_s"]), *_load_cells(r))
    return t


def render(state: dict[str, Any]) -> Group:
    r = state.get("router") or {}
    stack = state.get("stack")
    head = [f"slicelm top · {time.strftime('%H:%M:%S', time.localtime(state['time']))}",
            f"discovery {r.get('discovery')}", f"routing {r.get('routing_logic') or '-'}"]
    if stack:
        head.append(f"stack {stack['phase']} ({stack['run_dir']})")
    if not r.get("routing_logic"):
        head.append("no router: run-dir data only")
    return Group(Text("  ·  ".join(head), style="bold"), devices_table(state), models_table(state))
