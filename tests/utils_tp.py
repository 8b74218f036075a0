"""Two CPU ranks (gloo) spawned once and reused: ``TPRanks.run(job)`` runs ``job`` on both ranks, each in its own
process group member, and raises with the rank's traceback if either fails. A job is a picklable callable of
the rank; the ranks' collectives pair up because both run the same job.

Spawning a rank costs seconds on a loaded 2-core machine, so a test module starts one pair for all its cases.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

WORLD = 2
JOB_TIMEOUT_S = 240.0


def _rank_loop(rank: int, init_file: str, jobs: mp.Queue, results: mp.Queue) -> None:
    from slicelm.distributed.parallel_state import destroy_tp_group, init_tp_group

    torch.set_num_threads(1)
    init_tp_group(WORLD, rank, torch.device("cpu"), init_file, timeout_s=JOB_TIMEOUT_S)
    while (job := jobs.get()) is not None:
        try:
            job(rank)
            results.put((rank, None))
        except BaseException:
            results.put((rank, traceback.format_exc()))
    destroy_tp_group()


class TPRanks:
    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory(prefix="slicelm-tp-test-")
        init_file = str(Path(self._dir.name) / "rendezvous")
        self._jobs = [ctx.Queue() for _ in range(WORLD)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_rank_loop, args=(r, init_file, self._jobs[r], self._results), daemon=True)
                       for r in range(WORLD)]
        for p in self._procs:
            p.start()

    def run(self, job: Callable[[int], None]) -> None:
        for q in self._jobs:
            q.put(job)
        failures = []
        for _ in range(WORLD):
            try:
                rank, error = self._results.get(timeout=JOB_TIMEOUT_S)
            except queue.Empty:
                raise AssertionError(f"the ranks did not finish {job} within {JOB_TIMEOUT_S:.0f} s") from None
            if error is not None:
                failures.append(f"rank {rank}:\n{error}")
        assert not failures, "\n".join(failures)

    def close(self) -> None:
        for q in self._jobs:
            q.put(None)
        for p in self._procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
        self._dir.cleanup()


@dataclass
class ScheduleJob:
    """Build the checkpoint's model sharded over the ranks (weights read lazily: each rank its part), feed it
    ``schedule`` through the paged cache and compare every logits row with ``refs`` (``utils_parity``)."""

    path: str
    seqs: list[list[int]]
    refs: list[torch.Tensor]
    schedule: list[list[int]]
    block_size: int = 16

    def __call__(self, rank: int) -> None:
        from utils_parity import run_schedule

        from slicelm.layers.attention import TorchAttentionBackend
        from slicelm.loader.model_files import resolve_model
        from slicelm.models.registry import get_model_class

        source = resolve_model(self.path)
        model_cls = get_model_class(source.config.get("architectures") or [])
        model = model_cls(source.config, attn_backend=TorchAttentionBackend()).eval()
        model.load_weights(source.iter_weights(lazy=True))
        run_schedule(model, self.seqs, self.refs, self.schedule, self.block_size)
