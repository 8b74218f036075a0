"""The engine core's busy loop over zmq sockets, and the entry point of the engine-core process.

Loop: take every queued message (add / abort / shutdown / warm-up done) without blocking while requests run, block
(with a timeout, to notice a dead parent) when idle; step; send the step's deltas with the stats
snapshot and the count of adds taken. ``WARMUP_DONE`` (an API server's warm-up requests, which no counter
counted, are over) empties the prefix cache as soon as no sequence runs, and every client then gets a stats message
counting the reset (``num_resets``). A failing step sends ``dead_error`` and
ends the loop (the process then exits 1), so the API side fails its requests at once instead of waiting.

Several clients (``--api-server-count N``): one PULL socket connected to every client's PUSH endpoint
(fair-queued) and one PUSH socket per client. A client other than 0 tags its adds with its index (a
third frame); the loop remembers each sequence's owner and sends a client only its own outputs, with
its own count of adds, the stats snapshot (client 0 every step, the others with their outputs or at
least every ``STATS_INTERVAL`` s). With one client nothing is tagged, looked up or split.
"""

from __future__ import annotations

import contextlib
import faulthandler
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
    UTILITY,
    WARMUP_DONE,
    EngineCoreOutput,
    EngineCoreOutputs,
    UtilityReply,
    ids_decoder,
    make_encoder,
    request_decoder,
    utility_decoder,
)
from slicelm.engine.gc_tuning import tune_gc

logger = logging.getLogger(__name__)
IDLE_POLL_MS = 1000  # how often an idle core checks that its parent still lives
STATS_INTERVAL = 0.05  # several clients: the longest a client goes without a stats snapshot while busy


class CoreLoop:
    def __init__(self, core: Any, in_sock: zmq.Socket, out_sock: zmq.Socket | list[zmq.Socket],
                 parent_alive: Callable[[], bool] | None = None) -> None:
        self.core = core
        self.in_sock = in_sock
        self.out_socks = out_sock if isinstance(out_sock, list) else [out_sock]
        self.out_sock = self.out_socks[0]
        self.multi = len(self.out_socks) > 1
        self.parent_alive = parent_alive or (lambda: True)
        self.check_health = getattr(core, "check_health", lambda: None)  # test fakes have none
        self.encoder = make_encoder()
        self.req_decoder = request_decoder()
        self.ids_decoder = ids_decoder()
        self.utility_decoder = utility_decoder()
        self.calls: dict[int, tuple[int, int]] = {}  # the core's call id -> (client, the client's call id)
        self._failed_calls: list[UtilityReply] = []
        self._next_call = 0
        self.poller = zmq.Poller()
        self.poller.register(in_sock, zmq.POLLIN)
        for sock in getattr(core, "wakeup_sockets", list)():  # e.g. the memory broker's messages
            self.poller.register(sock, zmq.POLLIN)
        self.num_adds = 0  # one client: its adds; several: the sum (client_adds per client)
        self.client_adds = [0] * len(self.out_socks)
        self.owners: dict[str, int] = {}  # several clients: sequence id -> client index
        self._sent_adds = [0] * len(self.out_socks)
        self._last_sent = [0.0] * len(self.out_socks)
        self.stopped = False
        self.reset_pending = False
        self.num_resets = 0

    def run(self) -> None:
        try:
            last_check = time.monotonic()
            was_busy = False
            while not self.stopped:
                busy = self._runnable()
                if was_busy and not busy and hasattr(self.core, "service"):
                    self.core.service(idle=True)  # gone idle: elastic KV gives free chunks back now
                    self._send_stats()
                was_busy = busy
                if not busy and not self._wait_idle():
                    if not self.parent_alive():
                        logger.warning("the API process is gone: engine core exits")
                        return
                    self.check_health()  # a dead tensor-parallel worker ends an idle core too
                    continue
                if busy and time.monotonic() - last_check > 1.0:
                    last_check = time.monotonic()
                    if not self.parent_alive():
                        return
                errors = self._drain_inputs()
                if self.stopped:
                    return
                reset = self._reset_if_idle()
                outputs = self.core.step() if self._runnable() else []
                replies = self._take_replies(outputs)
                if self.multi:
                    self._send_each(errors, outputs, replies, force=reset)
                else:
                    if errors:
                        outputs = [o for _, o in errors] + outputs
                    self._send(EngineCoreOutputs(outputs, self.core.get_stats(), self.num_adds, time.time(),
                                                 num_resets=self.num_resets, utility=[r for _, r in replies]))
        except Exception as e:
            logger.exception("engine core failed")
            for i in range(len(self.out_socks)):
                with contextlib.suppress(Exception):
                    self._send(EngineCoreOutputs(num_adds=self.client_adds[i], timestamp=time.time(),
                                                 dead_error=f"{type(e).__name__}: {e}"), i)
            raise

    def _send_stats(self) -> None:
        """A message with the stats snapshot alone (what changed while idle reaches the metrics)."""
        if self.multi:
            self._send_each([], [], [])
        else:
            self._send(EngineCoreOutputs([], self.core.get_stats(), self.num_adds, time.time(),
                                         num_resets=self.num_resets))

    def _runnable(self) -> bool:
        runnable = getattr(self.core, "is_runnable", None)
        return runnable() if runnable is not None else self.core.has_unfinished_requests()

    def _wait_idle(self) -> bool:
        """Blocks until a message for us (True) or the idle poll interval passes (False); a message on one of
        the core's own sockets (the memory broker) is handed to ``core.service`` here."""
        ready = dict(self.poller.poll(IDLE_POLL_MS))
        if self.in_sock in ready:
            return True
        if ready and hasattr(self.core, "service"):
            self.core.service()
            return bool(getattr(self.core, "has_replies", lambda: False)())
        return False

    def _utility(self, client: int, frame: Any) -> None:
        call = self.utility_decoder.decode(frame)
        self._next_call += 1
        self.calls[self._next_call] = (client, call.call_id)
        try:
            handler = getattr(self.core, "utility", None)
            if handler is None:
                raise ValueError(f"this engine core does not support {call.method!r}")
            handler(self._next_call, call.method, call.args)
        except Exception as e:
            self._failed_calls.append(UtilityReply(self._next_call, error=f"{type(e).__name__}: {e}"))

    def _take_replies(self, outputs: list[EngineCoreOutput]) -> list[tuple[int, UtilityReply]]:
        """Finished utility calls (as (client, reply) with the client's call id) and the outputs they made
        (requests a sleep aborted), appended to ``outputs``."""
        take = getattr(self.core, "take_replies", None)
        replies, extra = take() if take is not None else ([], [])
        replies, self._failed_calls = self._failed_calls + replies, []
        outputs.extend(extra)
        out = []
        for r in replies:
            client, call_id = self.calls.pop(r.call_id)
            out.append((client, UtilityReply(call_id, r.result, r.error)))
        return out

    def _drain_inputs(self) -> list[tuple[int, EngineCoreOutput]]:
        """Applies every queued message; a sequence the core refuses comes back as an error output
        (with the index of the client that sent it)."""
        errors: list[tuple[int, EngineCoreOutput]] = []
        while True:
            try:
                frames = self.in_sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return errors
            kind = frames[0].bytes
            if kind == ADD:
                client = int.from_bytes(frames[2].bytes, "little") if len(frames) > 2 else 0
                self.num_adds += 1
                self.client_adds[client] += 1
                req = self.req_decoder.decode(frames[1].buffer)
                try:
                    self.core.add_request(req)
                except Exception as e:
                    errors.append((client, EngineCoreOutput(req.request_id, finish_reason="error",
                                                            error=f"{type(e).__name__}: {e}")))
                else:
                    if self.multi:
                        self.owners[req.request_id] = client
            elif kind == ABORT:
                ids = self.ids_decoder.decode(frames[1].buffer)
                self.core.abort_requests(ids)
                if self.multi:
                    for rid in ids:
                        self.owners.pop(rid, None)
            elif kind == WARMUP_DONE:
                self.reset_pending = True
            elif kind == UTILITY:
                self._utility(int.from_bytes(frames[2].bytes, "little") if len(frames) > 2 else 0, frames[1].buffer)
            elif kind == SHUTDOWN:
                self.stopped = True
                return errors

    def _reset_if_idle(self) -> bool:
        """A pending ``WARMUP_DONE`` reset, done once no sequence runs (a user's blocks are never dropped)."""
        if not self.reset_pending or self.core.has_unfinished_requests():
            return False
        self.core.reset_after_warmup()
        self.reset_pending = False
        self.num_resets += 1
        return True

    def _send_each(self, errors: list[tuple[int, EngineCoreOutput]], outputs: list[EngineCoreOutput],
                   replies: list[tuple[int, UtilityReply]], force: bool = False) -> None:
        """Several clients: each gets its own sequences' outputs (and the stats, see the module docstring)."""
        per_client: list[list[EngineCoreOutput]] = [[] for _ in self.out_socks]
        per_client_replies: list[list[UtilityReply]] = [[] for _ in self.out_socks]
        for client, reply in replies:
            per_client_replies[client].append(reply)
        for client, out in errors:
            per_client[client].append(out)
        owners = self.owners
        for out in outputs:
            client = owners.get(out.request_id) if out.finish_reason is None else owners.pop(out.request_id, None)
            if client is not None:  # None: aborted meanwhile
                per_client[client].append(out)
        stats, now = self.core.get_stats(), time.time()
        for i, outs in enumerate(per_client):
            adds, reps = self.client_adds[i], per_client_replies[i]
            if (force or outs or reps or i == 0 or adds != self._sent_adds[i]
                    or now - self._last_sent[i] >= STATS_INTERVAL):
                self._sent_adds[i], self._last_sent[i] = adds, now
                self._send(EngineCoreOutputs(outs, stats, adds, now, num_resets=self.num_resets, utility=reps), i)

    def _send(self, msg: EngineCoreOutputs, client: int = 0) -> None:
        self.out_socks[client].send(self.encoder.encode(msg), copy=False)


def run_engine_core(args: Any, in_addrs: list[str], out_addrs: list[str], ready: Connection, parent_pid: int) -> None:
    """Entry point of the engine-core process (started with ``spawn``): adds / aborts / shutdown come from
    every address of ``in_addrs``; client ``i``'s outputs go to ``out_addrs[i]``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the API process, which shuts us down
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(OSError, ValueError):  # a stderr without a file descriptor: no dumps
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 PID: every thread's stack to stderr
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s engine-core: %(message)s",
                        datefmt="%m-%d %H:%M:%S")
    try:
        from slicelm.engine.core import EngineCore

        core = EngineCore(args, exit_on_worker_failure=True)
    except BaseException as e:  # start-up errors go back to the API process, which reports and exits
        ready.send(("error", type(e).__name__, str(e), isinstance(e, ValueError), traceback.format_exc()))
        ready.close()
        sys.exit(1)
    ready.send(("ready", core.info()))
    ready.close()
    tune_gc()
    ctx = zmq.Context()
    in_sock = ctx.socket(zmq.PULL)
    for addr in in_addrs:
        in_sock.connect(addr)
    out_socks = []
    for addr in out_addrs:
        out_sock = ctx.socket(zmq.PUSH)
        out_sock.setsockopt(zmq.LINGER, 2000)  # a last message (e.g. dead_error) still goes out
        out_sock.connect(addr)
        out_socks.append(out_sock)
    code = 0
    try:
        CoreLoop(core, in_sock, out_socks, parent_alive=lambda: os.getppid() == parent_pid).run()
    except Exception:
        code = 1
    core.shutdown()
    in_sock.close(linger=0)
    for out_sock in out_socks:
        out_sock.close()
    ctx.term()
    if code:
        sys.exit(code)
