"""Stands in for vLLM's ``tests/utils.py`` in the harness: ``RemoteOpenAIServer`` launches ``slicelm serve`` with
the substituted model, served under the name the test uses; the GPU-only markers skip."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import requests
from tests.substitutions import kind_of, substitute

VLLM_PATH = Path(os.environ.get("VLLM_SRC", "."))
ROCM_EXTRA_ARGS: list[str] = []
SLICELM = os.environ["SLICELM_TREE"]
PY = os.environ.get("SLICELM_PYTHON", sys.executable)
LOG_DIR = Path(os.environ.get("HARNESS_LOG_DIR", "/tmp/slicelm-vllm-harness/logs"))
OUT_OF_SCOPE_VALUE_FLAGS = {"--reasoning-parser", "--max-lora-rank", "--max-cpu-loras", "--max-loras"}
OUT_OF_SCOPE_LIST_FLAGS = {"--lora-modules"}  # one or more values
OUT_OF_SCOPE_FLAGS = {"--enable-lora"}
MAX_LEN = {"generate": 8192, "embed": 256, "score": 512, "classify": 512}  # MiniLM: 256


def get_open_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _translate(model: str, args: list[str]) -> list[str]:
    """vLLM flags -> slicelm flags: the model's dtype becomes float32 on the CPU (speed), --max-model-len is
    capped at the substitute's maximum, --convert is implied by the substitute, the reasoning-parser and
    LoRA flags are dropped (the tests that use them are out of scope; the others of their modules run).
    Everything else is passed as is."""
    out: list[str] = []
    kind = kind_of(model)
    valued = {"--dtype", "--max-model-len", "--convert", "--model", *OUT_OF_SCOPE_VALUE_FLAGS}
    it = iter(args)
    skipping_list = False
    for a in it:
        key, eq, inline = a.partition("=")
        if skipping_list and not a.startswith("-"):
            continue
        skipping_list = key in OUT_OF_SCOPE_LIST_FLAGS and not eq
        if key in OUT_OF_SCOPE_FLAGS or key in OUT_OF_SCOPE_LIST_FLAGS:
            continue
        if key not in valued:
            out.append(a)
            continue
        v = inline if eq else next(it)
        if key == "--dtype":
            out += ["--dtype", "float32"]
        elif key == "--max-model-len":
            n = int(v) if v.isdigit() else MAX_LEN[kind]
            out += ["--max-model-len", str(min(n, MAX_LEN[kind]))]
    return out


class RemoteOpenAIServer:
    DUMMY_API_KEY = "token-abc123"

    def __init__(self, model: str, vllm_serve_args: list[str], *, env_dict: dict[str, str] | None = None,
                 seed: int | None = 0, auto_port: bool = True, max_wait_seconds: float | None = None,
                 override_hf_configs: dict | None = None) -> None:
        args = list(vllm_serve_args)
        if "--model" in args:
            model = args[args.index("--model") + 1]
        if auto_port and "--uds" not in args:
            args += ["--port", str(get_open_port())]
        if seed is not None and "--seed" not in args:
            args += ["--seed", str(seed)]
        if override_hf_configs is not None:
            pytest.skip("harness: --hf-overrides")
        self.model = model
        self.show_hidden_metrics = any(a.partition("=")[0] == "--show-hidden-metrics-for-version" for a in args)
        flags = _translate(model, args)
        if "--served-model-name" not in flags:
            flags += ["--served-model-name", model]
        self.uds = flags[flags.index("--uds") + 1] if "--uds" in flags else None
        self.host = flags[flags.index("--host") + 1] if "--host" in flags else "127.0.0.1"
        if "--host" not in flags:
            flags += ["--host", "127.0.0.1"]
        self.port = int(flags[flags.index("--port") + 1]) if "--port" in flags else None
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": SLICELM}
        env.pop("VLLM_API_KEY", None)
        env.update(env_dict or {})
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"server-{os.getpid()}-{time.time_ns()}.log"
        cmd = [PY, "-m", "slicelm.entrypoints.cli", "serve", substitute(model), "--device", "cpu", *flags]
        self.cmd = cmd
        with open(self.log_path, "wb") as log:
            log.write((" ".join(cmd) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=SLICELM,
                                         start_new_session=True)
        try:
            self._wait_for_server(url=self.url_for("health"), timeout=max_wait_seconds or 300)
        except Exception:
            self._shutdown()
            raise

    def __enter__(self) -> RemoteOpenAIServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def _wait_for_server(self, *, url: str, timeout: float) -> None:
        start = time.time()
        client = httpx.Client(transport=httpx.HTTPTransport(uds=self.uds)) if self.uds else requests
        while True:
            try:
                if client.get(url).status_code == 200:
                    return
            except Exception:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("Server exited unexpectedly:\n" + self.log_path.read_text(errors="replace")[-3000:])
            if time.time() - start > timeout:
                raise RuntimeError("Server failed to start in time.")
            time.sleep(0.5)

    @property
    def url_root(self) -> str:
        return f"http://{self.uds.split('/')[-1]}" if self.uds else f"http://{self.host}:{self.port}"

    def url_for(self, *parts: str) -> str:
        path = "/".join(part.strip("/") for part in parts if part)
        return f"{self.url_root}/{path}"

    def get_client(self, **kwargs: object) -> openai.OpenAI:
        kwargs.setdefault("timeout", 600)
        return openai.OpenAI(base_url=self.url_for("v1"), api_key=self.DUMMY_API_KEY, max_retries=0, **kwargs)

    def get_async_client(self, **kwargs: object) -> openai.AsyncOpenAI:
        kwargs.setdefault("timeout", 600)
        return openai.AsyncOpenAI(base_url=self.url_for("v1"), api_key=self.DUMMY_API_KEY, max_retries=0, **kwargs)


RemoteOpenAIServerCustom = RemoteOpenAIServer


def _skip(reason: str):
    return pytest.mark.skip(reason=f"harness: {reason}")


def multi_gpu_only(*a: object, **k: object):
    return _skip("multi-GPU")


def requires_fp8(f):
    return _skip("fp8")(f)


def large_gpu_mark(min_gb: int):
    return _skip("large GPU")


def multi_gpu_test(*, num_gpus: int):
    return _skip("multi-GPU")


def create_new_process_for_each_test(*a: object, **k: object):
    return lambda f: f


fork_new_process_for_each_test = spawn_new_process_for_each_test = lambda f: f
