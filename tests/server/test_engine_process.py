"""The engine core in its own process: O(length) streams over IPC, start-up errors, kill -9 of the core.

A tiny random Llama (``--load-format dummy``, SmolLM2's 49,152-token vocabulary) with SmolLM2's tokenizer
(``--tokenizer``) keeps steps fast, so thousands of tokens stream in seconds on a CPU.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import MODEL, ROOT, kill_during_streams, start_server, stop_server

from slicelm.config import EngineArgs
from slicelm.engine.async_llm import AsyncLLM
from slicelm.engine.core_client import MPCoreClient
from slicelm.engine.core_messages import EngineCoreRequest
from slicelm.engine.protocol import EngineDeadError
from slicelm.sampling_params import SamplingParams

TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
              "intermediate_size": 32, "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 10000.0,
              "rms_norm_eps": 1e-5, "max_position_embeddings": 8192}


def tiny_model(root: Path, config: dict | None = None) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config or TINY_LLAMA))
    return str(root)


def cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "slicelm.entrypoints.cli", *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


# ----------------------------------------------------------------------------- O(length) host work
@pytest.mark.slow
def test_a_2000_token_stream_costs_linear_ipc(tmp_path: Path) -> None:
    args = EngineArgs(model=tiny_model(tmp_path / "tiny"), load_format="dummy", tokenizer=MODEL, device="cpu",
                      max_model_len=4096, max_num_seqs=4)
    llm = AsyncLLM.from_engine_args(args)  # the multiprocess core
    client = llm.client
    assert isinstance(client, MPCoreClient) and client.proc.is_alive()

    async def stream(max_tokens: int) -> tuple[int, int, int, list[int], str]:
        b0, m0 = client.bytes_received, client.messages_received
        client.max_message_bytes = 0
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        ids: list[int] = []
        text = []
        async for out in llm.generate({"prompt_token_ids": [1, 2, 3]}, params, f"r{max_tokens}"):
            ids += out.outputs[0].token_ids  # each output carries only the tokens new since the last one
            text.append(out.outputs[0].text)
        return client.bytes_received - b0, client.messages_received - m0, client.max_message_bytes, ids, "".join(text)

    async def main() -> None:
        short_bytes, short_msgs, _, short_ids, _ = await stream(500)
        processed0 = llm.output_processor.num_tokens_processed
        long_bytes, long_msgs, max_msg, ids, text = await stream(2000)
        assert len(short_ids) == 500 and len(ids) == 2000
        assert llm.output_processor.num_tokens_processed - processed0 == 2000  # each token is processed once
        assert text == llm.tokenizer.decode(ids, skip_special_tokens=True)
        # Linear: 4x the tokens cost ~4x the bytes (cumulative token lists would cost ~16x), and no message
        # grows with the stream's length (2000 token ids alone would take > 4 kB).
        print(f"IPC: {short_bytes} B / {short_msgs} msgs for 500 tokens, {long_bytes} B / {long_msgs} msgs for 2000, "
              f"largest message {max_msg} B")
        assert long_msgs >= 1000 and short_msgs >= 250
        assert long_bytes / short_bytes < 4.6, (long_bytes, short_bytes)
        assert max_msg < 600, max_msg
        assert long_bytes / 2000 < 300  # one small delta + the stats snapshot per step

    try:
        asyncio.run(main())
    finally:
        llm.shutdown()
    assert not client.proc.is_alive()


# ----------------------------------------------------------------------------- start-up errors
@pytest.mark.slow
def test_serve_exits_with_the_core_load_error(tmp_path: Path) -> None:
    bad = tiny_model(tmp_path / "bad", {**TINY_LLAMA, "architectures": ["NoSuchForCausalLM"]})
    t0 = time.monotonic()
    out = cli("serve", bad, "--tokenizer", MODEL, "--device", "cpu", "--port", "0", "--load-format", "dummy")
    assert out.returncode != 0
    assert "NoSuchForCausalLM" in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert time.monotonic() - t0 < 100
    out = cli("serve", "/nonexistent/model", "--device", "cpu", "--port", "0")
    assert out.returncode != 0 and "/nonexistent/model" in out.stderr and "Traceback" not in out.stderr
    out = cli("serve", bad, "--tokenizer", str(tmp_path / "no-tokenizer"), "--device", "cpu", "--port", "0")
    assert out.returncode != 0 and "no-tokenizer" in out.stderr, out.stderr[-3000:]


# ----------------------------------------------------------------------------- kill -9 of the core
@pytest.mark.slow
def test_kill_9_of_the_core_fails_every_stream_and_the_server_exits_1(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--load-format", "dummy", "--tokenizer", MODEL, "--max-model-len", "8192",
                          model=tiny_model(tmp_path / "tiny"))
    try:
        pid = int(re.search(r"engine core process started \(pid (\d+)\)", server.log()).group(1))  # type: ignore[union-attr]
        for who in (server.proc.pid, pid):  # kill -USR1: the server and its core write their threads' stacks
            os.kill(who, signal.SIGUSR1)
        deadline = time.time() + 10
        while server.log().count("Current thread") + server.log().count("Thread 0x") < 4:
            assert time.time() < deadline and server.proc.poll() is None, server.log()[-3000:]
            time.sleep(0.1)
        assert "core_proc.py" in server.log() and "uvicorn/server.py" in server.log()  # the core's loop, the server's
        out = kill_during_streams(server, server_model(tmp_path), pid)
        assert len(out.streams) == 4, out.streams
        for kind, when in out.streams:
            assert kind != "ended", out.streams  # never a clean end: the stream says it failed
            assert when - out.killed < 5, out.streams
        assert 503 in out.health, out.health
        assert server.proc.wait(15) == 1, server.log()
        assert "engine core died" in server.log()
    finally:
        stop_server(server)


@pytest.mark.slow
def test_sends_to_a_killed_core_return_at_once(tmp_path: Path) -> None:
    """The core's input is a zmq PUSH socket; once the core is gone it has no peer and a blocking send waits forever
    (on the server's event loop, where a client leaving aborts its request: the server hung and never exited). An
    abort to a dead core is dropped; an add raises ``EngineDeadError``."""
    args = EngineArgs(model=tiny_model(tmp_path / "tiny"), load_format="dummy", tokenizer=MODEL, device="cpu",
                      max_model_len=256)
    client = MPCoreClient(args)
    try:
        client.wait_ready(120)
        os.kill(client.proc.pid, signal.SIGKILL)
        client.proc.join(10)
        time.sleep(0.3)  # zmq's I/O thread drops the dead peer's pipe: no peer left
        outcome: list[str] = []

        def send() -> None:
            client.abort_requests(["gone-1"])
            client.abort_requests(["gone-2"])
            try:
                client.add_requests([EngineCoreRequest("new", [1, 2, 3], SamplingParams(max_tokens=4))])
                outcome.append("added")
            except EngineDeadError as e:
                outcome.append(str(e))

        t = threading.Thread(target=send, name="send", daemon=True)
        t.start()
        t.join(5)
        assert not t.is_alive(), "a send to the dead core blocked"
        assert outcome == ["the engine core process died (exit code -9)"]
    finally:
        if not any(t.name == "send" for t in threading.enumerate()):  # a blocked sender holds the send lock
            client.shutdown()


def server_model(tmp_path: Path) -> str:
    return str(tmp_path / "tiny")
