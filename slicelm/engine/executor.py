"""Executors: who runs a scheduled step. The engine core schedules once and hands the step to one.

* ``UniprocExecutor``: one ``Worker`` in this process (one device).
* ``MultiprocExecutor`` (``--tensor-parallel-size N``, vLLM's shape): rank 0, the *driver*, is a ``Worker``
  in this process; ranks 1..N-1 are worker processes (``tp_worker.py``, one per GPU). A step is built
  once into host arrays (``HostBatch``), sent to every worker, and run by all ranks together (the model's
  all-reduces); only the driver samples, then shares the sampled ids over the process group.

Failure: a watchdog thread watches the worker processes. When one dies it aborts the process group
(a collective waiting on the dead rank returns an error instead of hanging), and the next call of
``execute_model`` / ``check_health`` raises ``WorkerDiedError`` naming the rank. With ``exit_on_failure``
(the engine-core process) it also ends the process after ``EXIT_GRACE_S`` if the core has not done so
itself: the API side then fails every request and exits. Start-up errors of a worker come back as its
own error (a ``ValueError`` stays one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field

import zmq

from slicelm.config import EngineArgs
from slicelm.distributed.env import force_multicast_off
from slicelm.distributed.parallel_state import abort_tp_group, destroy_tp_group
from slicelm.engine.runner import BitmaskFn, StepHandle
from slicelm.engine.scheduler import SchedulerOutput
from slicelm.engine.tp_worker import SHUTDOWN, STEP, WorkerSpec
from slicelm.engine.worker import Worker

logger = logging.getLogger(__name__)
WATCH_INTERVAL_S = 0.1
EXIT_GRACE_S = 5.0
START_TIMEOUT_S = 300.0  # a worker process reaching the process group (imports) may take this long


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker process died; the engine cannot step any more."""


class WorkerStartupError(RuntimeError):
    """A tensor-parallel worker failed to start (an error that was not a ``ValueError``)."""


class UniprocExecutor:
    def __init__(self, args: EngineArgs) -> None:
        self.driver = Worker(args)
        self.driver.build()

    def execute_model(self, sched: SchedulerOutput, prev: StepHandle | None = None,
                      grammar_bitmask: BitmaskFn | None = None) -> StepHandle:
        return self.driver.execute_model(sched, prev, grammar_bitmask)

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def describe_exit(code: int) -> str:
    return f"killed by signal {-code} ({signal.Signals(-code).name})" if code < 0 else f"exited with code {code}"


@dataclass
class _WorkerProc:
    rank: int
    proc: subprocess.Popen[bytes]
    steps: zmq.Socket
    state: str = "starting"  # starting -> started -> ready
    error: tuple = field(default_factory=tuple)


class MultiprocExecutor:
    def __init__(self, args: EngineArgs, exit_on_failure: bool = False) -> None:
        self.world_size = args.tensor_parallel_size
        assert self.world_size > 1
        self.exit_on_failure = exit_on_failure
        self.failure: str | None = None
        self._stopping = False
        self._dir = tempfile.mkdtemp(prefix="slicelm-tp-")
        self._ctx = zmq.Context()
        self._ctrl = self._ctx.socket(zmq.PULL)
        self._ctrl.bind(f"ipc://{self._dir}/ctrl")
        force_multicast_off()
        self.workers = [self._spawn(args, rank) for rank in range(1, self.world_size)]
        # an executor dropped without shutdown() (an offline LLM going away) still stops its workers
        self._finalizer = weakref.finalize(self, _stop_all, [w.proc for w in self.workers], self._dir)
        self._watchdog = threading.Thread(target=self._watch, name="slicelm-tp-watchdog", daemon=True)
        self._watchdog.start()
        try:
            self._wait_for("started")  # every worker is about to join the process group
            self.driver = Worker(args, rank=0, world_size=self.world_size, init_file=self._init_file)
            self.driver.build()
            self._wait_for("ready")
        except BaseException as e:
            self.shutdown()
            self._raise_worker_error(e)
            raise
        logger.info("tensor parallel: driver (rank 0) in pid %d, workers %s", os.getpid(),
                    ", ".join(f"rank {w.rank} pid {w.proc.pid}" for w in self.workers))

    @property
    def _init_file(self) -> str:
        return f"{self._dir}/pg"

    # --------------------------------------------------------------------------- start-up
    def _spawn(self, args: EngineArgs, rank: int) -> _WorkerProc:
        steps = self._ctx.socket(zmq.PUSH)
        steps.setsockopt(zmq.LINGER, 0)
        steps.bind(f"ipc://{self._dir}/step-{rank}")
        spec = WorkerSpec(args, rank, self.world_size, self._init_file, f"ipc://{self._dir}/step-{rank}",
                          f"ipc://{self._dir}/ctrl", os.getpid())
        proc = subprocess.Popen([sys.executable, "-m", "slicelm.engine.tp_worker"], stdin=subprocess.PIPE,
                                env=dict(os.environ))
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps(spec))
        proc.stdin.close()
        logger.info("tensor-parallel worker rank %d started (pid %d)", rank, proc.pid)
        return _WorkerProc(rank, proc, steps)

    def _wait_for(self, state: str, timeout: float = START_TIMEOUT_S) -> None:
        """Reads the workers' reports until each has reached ``state``; raises a worker's start-up error."""
        deadline = time.monotonic() + timeout
        order = ("starting", "started", "ready")
        while any(order.index(w.state) < order.index(state) for w in self.workers):
            self._drain_reports(timeout_ms=100)
            for w in self.workers:
                if w.error:
                    raise self._startup_error(w)
            if self.failure is not None:
                raise WorkerDiedError(self.failure)
            if time.monotonic() > deadline:
                raise WorkerStartupError(f"tensor-parallel workers did not reach {state!r} within {timeout:.0f} s")

    def _drain_reports(self, timeout_ms: int = 0) -> None:
        while self._ctrl.poll(timeout_ms):
            msg = pickle.loads(self._ctrl.recv())
            w = self.workers[msg[1] - 1]
            if msg[0] == "error":
                w.error = msg[2:]
            else:
                w.state = msg[0]
            timeout_ms = 0

    def _startup_error(self, w: _WorkerProc) -> Exception:
        name, text, is_value_error, tb = w.error
        logger.debug("tensor-parallel worker rank %d start-up failed:\n%s", w.rank, tb)
        if is_value_error:
            return ValueError(text)
        return WorkerStartupError(f"tensor-parallel worker rank {w.rank} failed to start: {name}: {text}")

    def _raise_worker_error(self, cause: BaseException) -> None:
        """The driver's start-up failed, maybe because a worker did: a worker's own error is the better one."""
        with contextlib.suppress(zmq.ZMQError):
            self._drain_reports(timeout_ms=500)
        for w in self.workers:
            if w.error:
                raise self._startup_error(w) from cause

    # ------------------------------------------------------------------------------ steps
    def execute_model(self, sched: SchedulerOutput, prev: StepHandle | None = None,
                      grammar_bitmask: BitmaskFn | None = None) -> StepHandle:
        self.check_health()
        runner = self.driver.runner
        batch = runner.build_batch(sched.scheduled, prev)
        self._send((STEP, batch.for_followers()))
        try:
            return runner.execute_batch(batch, [s.request for s in sched.scheduled if s.samples], prev,
                                        grammar_bitmask)
        except Exception as e:  # a collective failed: a dead worker is the likely cause
            self._wait_for_failure(1.0)
            if self.failure is not None:
                raise WorkerDiedError(self.failure) from e
            raise

    def _send(self, msg: tuple) -> None:
        data = pickle.dumps(msg, protocol=5)
        for w in self.workers:
            try:
                w.steps.send(data, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again as e:
                self._wait_for_failure(1.0)
                reason = self.failure or f"tensor-parallel worker rank {w.rank} stopped reading steps"
                raise WorkerDiedError(reason) from e

    def check_health(self) -> None:
        if self.failure is not None:
            raise WorkerDiedError(self.failure)

    def _wait_for_failure(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(WATCH_INTERVAL_S)

    # -------------------------------------------------------------------------- watchdog
    def _watch(self) -> None:
        while not self._stopping:
            for w in self.workers:
                code = w.proc.poll()
                if code is not None and not self._stopping:
                    self._on_death(w, code)
                    return
            time.sleep(WATCH_INTERVAL_S)

    def _on_death(self, w: _WorkerProc, code: int) -> None:
        self.failure = f"tensor-parallel worker rank {w.rank} (pid {w.proc.pid}) {describe_exit(code)}"
        logger.error("%s: the engine stops", self.failure)
        abort_tp_group()  # a collective blocked on the dead rank fails now
        if self.exit_on_failure:
            time.sleep(EXIT_GRACE_S)  # the core's own error path normally ends the process first
            if not self._stopping:
                logger.error("engine core exits: %s", self.failure)
                os._exit(1)

    # -------------------------------------------------------------------------- shutdown
    def shutdown(self, timeout: float = 5.0) -> None:
        """Stops the workers (politely, then by signal), leaves the process group, removes the sockets."""
        if self._stopping:
            return
        self._stopping = True
        data = pickle.dumps((SHUTDOWN, None))
        for w in self.workers:
            with contextlib.suppress(zmq.ZMQError):
                w.steps.send(data, flags=zmq.NOBLOCK)
        for w in self.workers:
            _stop(w.proc, timeout)
            w.steps.close(linger=0)
        if hasattr(self, "driver"):
            self.driver.shutdown()
        self._ctrl.close(linger=0)
        self._ctx.term()
        self._finalizer()


def _stop_all(procs: list[subprocess.Popen[bytes]], run_dir: str) -> None:
    for proc in procs:
        _stop(proc, 2.0)
    destroy_tp_group()
    shutil.rmtree(run_dir, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    for step in (None, proc.terminate, proc.kill):
        if proc.poll() is not None:
            return
        if step is not None:
            step()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)


def make_executor(args: EngineArgs, exit_on_failure: bool = False) -> UniprocExecutor | MultiprocExecutor:
    if args.tensor_parallel_size > 1:
        return MultiprocExecutor(args, exit_on_failure)
    return UniprocExecutor(args)
