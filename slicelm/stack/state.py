"""The run directory: ``state.json`` (what ``ps``, ``down`` and the router read from another shell) and logs.

``state.json`` is rewritten atomically by the supervisor on every change:
``{"stack", "supervisor_pid", "started_at", "router": {"url", "pid", "port", "log"} | null,
"replicas": [{"model", "replica", "served_names", "pid", "port", "url", "state", "restarts", "started_at",
"device", "gpus": [{"uuid", "index", "memory_mib", "cores"}], "memory_mib", "cores", "policy", "log", "command"}],
"gpus": [{"uuid", "index", "type", "memory_mib"}], "mps": [{"gpu", "pipe_dir"}], "warnings": [...]}``
(top-level ``gpus``: every GPU of the machine, ``memory_mib`` its total).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"


def default_run_dir() -> Path:
    """``$XDG_STATE_HOME/slicelm/stack`` (``~/.local/state/slicelm/stack``)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "slicelm" / "stack"


def resolve_run_dir(cli_value: str | None, spec_value: str | None = None) -> Path:
    return Path(cli_value or spec_value or default_run_dir()).expanduser().resolve()


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    tmp = run_dir / f".{STATE_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, run_dir / STATE_FILE)


def read_state(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ValueError(f"{run_dir / STATE_FILE}: not valid JSON ({e})") from None


def pid_alive(pid: int | None) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except PermissionError:
        return True


def live_supervisor(run_dir: Path) -> int | None:
    """The pid of the supervisor that owns ``run_dir``, if it still runs."""
    state = read_state(run_dir)
    pid = state.get("supervisor_pid") if state else None
    return pid if pid_alive(pid) else None
