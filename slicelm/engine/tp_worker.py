"""A tensor-parallel worker process: rank ``r > 0`` of an engine, following the driver's steps.

``MultiprocExecutor`` starts it (``python -m slicelm.engine.tp_worker``, its ``WorkerSpec`` pickled on
stdin). It builds the same ``Worker`` as the driver (device ``r``, this rank's shard of the model, the
KV cache, CUDA graphs), taking part in every collective of those steps, then runs each ``HostBatch``
the driver sends until told to stop. It reports on the control socket: ``started`` (right before
joining the process group), then ``ready`` or its start-up error. It exits 1 on any error (the driver's
watchdog notices) and as soon as its parent (the engine-core process) is gone, also while blocked
in a collective.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq

from slicelm.config import EngineArgs
from slicelm.distributed.env import force_multicast_off

if TYPE_CHECKING:
    from slicelm.engine.worker import Worker

logger = logging.getLogger(__name__)
POLL_MS = 1000
STEP, SHUTDOWN = b"step", b"shutdown"


@dataclass
class WorkerSpec:
    args: EngineArgs
    rank: int
    world_size: int
    init_file: str  # the process group's file rendezvous
    step_addr: str  # zmq: the driver's batches to this rank
    ctrl_addr: str  # zmq: this rank's start-up reports to the driver
    parent_pid: int


def watch_parent(parent_pid: int, interval: float = 0.5) -> None:
    """Exits this process when its parent is gone, whatever the main thread is blocked in."""

    def run() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        logger.warning("the engine core (pid %d) is gone: tensor-parallel worker exits", parent_pid)
        os._exit(1)

    threading.Thread(target=run, name="slicelm-parent-watch", daemon=True).start()


def _report(ctrl: zmq.Socket, *msg: object) -> None:
    ctrl.send(pickle.dumps(msg))


def run_worker(spec: WorkerSpec) -> int:
    from slicelm.engine.worker import Worker

    ctx = zmq.Context()
    ctrl = ctx.socket(zmq.PUSH)
    ctrl.setsockopt(zmq.LINGER, 2000)
    ctrl.connect(spec.ctrl_addr)
    steps = ctx.socket(zmq.PULL)
    steps.connect(spec.step_addr)
    try:
        _report(ctrl, "started", spec.rank)
        worker = Worker(spec.args, rank=spec.rank, world_size=spec.world_size, init_file=spec.init_file)
        worker.build()
    except BaseException as e:
        _report(ctrl, "error", spec.rank, type(e).__name__, str(e), isinstance(e, ValueError), traceback.format_exc())
        logger.exception("tensor-parallel worker rank %d failed to start", spec.rank)
        return 1
    _report(ctrl, "ready", spec.rank)
    try:
        follow(worker, steps)
    except Exception:
        logger.exception("tensor-parallel worker rank %d failed", spec.rank)
        return 1
    finally:
        worker.shutdown()
        steps.close(linger=0)
        ctrl.close()
        ctx.term()
    return 0


def follow(worker: Worker, steps: zmq.Socket) -> None:
    """Runs the driver's batches until ``SHUTDOWN``."""
    runner = worker.runner
    while True:
        if not steps.poll(POLL_MS):
            continue
        kind, batch = pickle.loads(steps.recv(copy=False).buffer)
        if kind == SHUTDOWN:
            return
        assert kind == STEP, kind
        runner.follow_batch(batch)


def main() -> None:
    spec: WorkerSpec = pickle.load(sys.stdin.buffer)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the API process's; the driver stops us
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    logging.basicConfig(level=logging.INFO, datefmt="%m-%d %H:%M:%S",
                        format=f"%(levelname)s %(asctime)s tp-worker-{spec.rank}: %(message)s")
    force_multicast_off()
    watch_parent(spec.parent_pid)
    sys.exit(run_worker(spec))


if __name__ == "__main__":
    main()
