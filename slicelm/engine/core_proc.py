"""The engine core's busy loop over zmq sockets, and the entry point of the engine-core process.

Loop: take every queued message (add / abort / shutdown) without blocking while requests run, block
(with a timeout, to notice a dead parent) when idle; step; send the step's deltas with the stats
snapshot and the count of adds taken. A failing step sends ``dead_error`` and ends the loop (the
process then exits 1), so the API side fails its requests at once instead of waiting.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import zmq

from slicelm.engine.core_messages import (
    ABORT,
    ADD,
    SHUTDOWN,
    EngineCoreOutput,
    EngineCoreOutputs,
    ids_decoder,
    make_encoder,
    request_decoder,
)

logger = logging.getLogger(__name__)
IDLE_POLL_MS = 1000  # how often an idle core checks that its parent still lives


class CoreLoop:
    def __init__(self, core: Any, in_sock: zmq.Socket, out_sock: zmq.Socket,
                 parent_alive: Callable[[], bool] | None = None) -> None:
        self.core = core
        self.in_sock = in_sock
        self.out_sock = out_sock
        self.parent_alive = parent_alive or (lambda: True)
        self.encoder = make_encoder()
        self.req_decoder = request_decoder()
        self.ids_decoder = ids_decoder()
        self.num_adds = 0
        self.stopped = False

    def run(self) -> None:
        try:
            last_check = time.monotonic()
            while not self.stopped:
                busy = self.core.has_unfinished_requests()
                if not busy and not self.in_sock.poll(IDLE_POLL_MS):
                    if not self.parent_alive():
                        logger.warning("the API process is gone: engine core exits")
                        return
                    continue
                if busy and time.monotonic() - last_check > 1.0:
                    last_check = time.monotonic()
                    if not self.parent_alive():
                        return
                errors = self._drain_inputs()
                if self.stopped:
                    return
                outputs = self.core.step() if self.core.has_unfinished_requests() else []
                self._send(EngineCoreOutputs(errors + outputs, self.core.get_stats(), self.num_adds, time.time()))
        except Exception as e:
            logger.exception("engine core failed")
            with contextlib.suppress(Exception):
                self._send(EngineCoreOutputs(num_adds=self.num_adds, timestamp=time.time(),
                                             dead_error=f"{type(e).__name__}: {e}"))
            raise

    def _drain_inputs(self) -> list[EngineCoreOutput]:
        """Applies every queued message; a sequence the core refuses comes back as an error output."""
        errors: list[EngineCoreOutput] = []
        while True:
            try:
                frames = self.in_sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return errors
            kind = frames[0].bytes
            if kind == ADD:
                self.num_adds += 1
                req = self.req_decoder.decode(frames[1].buffer)
                try:
                    self.core.add_request(req)
                except Exception as e:
                    errors.append(EngineCoreOutput(req.request_id, finish_reason="error",
                                                   error=f"{type(e).__name__}: {e}"))
            elif kind == ABORT:
                self.core.abort_requests(self.ids_decoder.decode(frames[1].buffer))
            elif kind == SHUTDOWN:
                self.stopped = True
                return errors

    def _send(self, msg: EngineCoreOutputs) -> None:
        self.out_sock.send(self.encoder.encode(msg), copy=False)


def run_engine_core(args: Any, in_addr: str, out_addr: str, ready: Connection, parent_pid: int) -> None:
    """Entry point of the engine-core process (started with ``spawn``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the API process, which shuts us down
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s engine-core: %(message)s",
                        datefmt="%m-%d %H:%M:%S")
    try:
        from slicelm.engine.core import EngineCore

        core = EngineCore(args)
    except BaseException as e:  # start-up errors go back to the API process, which reports and exits
        ready.send(("error", type(e).__name__, str(e), isinstance(e, ValueError), traceback.format_exc()))
        ready.close()
        sys.exit(1)
    ready.send(("ready", core.info()))
    ready.close()
    ctx = zmq.Context()
    in_sock = ctx.socket(zmq.PULL)
    in_sock.connect(in_addr)
    out_sock = ctx.socket(zmq.PUSH)
    out_sock.setsockopt(zmq.LINGER, 2000)  # a last message (e.g. dead_error) still goes out
    out_sock.connect(out_addr)
    try:
        CoreLoop(core, in_sock, out_sock, parent_alive=lambda: os.getppid() == parent_pid).run()
    except Exception:
        out_sock.close()
        ctx.term()
        sys.exit(1)
    in_sock.close(linger=0)
    out_sock.close()
    ctx.term()
