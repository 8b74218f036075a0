"""vLLM's sleep mode for one engine core (``--enable-sleep-mode``): levels, pause modes, wake-up tags.

``sleep(level, mode)``: first the requests in the core are dealt with as ``mode`` says (vLLM's pause
modes): ``abort`` ends them (finish reason ``abort``), ``wait`` lets the running ones finish (nothing new
is admitted meanwhile; the reply comes when they are done), ``keep`` preempts them (they recompute after
the wake-up). Then the scheduler is paused (requests that arrive while asleep are queued, not lost, and
run after the wake-up, as in vLLM) and, from level 1, the worker drops its memory: level 1 keeps the
weights in pinned host memory, level 2 discards them (the wake-up reloads them from the checkpoint; not
for quantized models, whose loaded weights are repacked); both drop the KV cache. Level 0 only pauses scheduling.

``wake_up(tags)``: ``weights``, ``kv_cache``, ``scheduling`` (all when none are given); scheduling resumes
once weights and KV cache are both back.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from slicelm.engine.core_messages import UtilityReply

if TYPE_CHECKING:
    from slicelm.engine.core import EngineCore

logger = logging.getLogger(__name__)
LEVELS = (0, 1, 2)
MODES = ("abort", "wait", "keep")
TAGS = ("weights", "kv_cache", "scheduling")
MEMORY_TAGS = {"weights", "kv_cache"}


class SleepMode:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.level = 0
        self.asleep: set[str] = set()
        self.pending: tuple[int, int] | None = None  # (call id, level) of a sleep waiting for running requests
        self.last_wake_s: float | None = None

    @property
    def is_sleeping(self) -> bool:
        return bool(self.asleep)

    def sleep(self, call_id: int, level: int, mode: str) -> None:
        if level not in LEVELS:
            raise ValueError(f"level: sleep level must be 0, 1 or 2, got {level}")
        if mode not in MODES:
            raise ValueError(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")
        quant = self.core.worker.quant_config
        if level == 2 and quant is not None:
            raise ValueError(f"level: a quantized model ({quant.describe()}) sleeps at level 1 at most: level 2 "
                             "reloads the checkpoint, and its weights were repacked for the kernels after loading")
        if self.pending is not None:
            raise ValueError("a sleep is already in progress")
        core = self.core
        if self.asleep:  # already asleep: nothing more to drop at the same or a lower level
            if level > self.level and "weights" in self.asleep:
                core.worker.discard_offloaded_weights()
                self.level = level
            core.add_reply(UtilityReply(call_id))
            return
        core.read_back_inflight()
        if mode == "abort":
            core.abort_all_from_core("the engine was put to sleep")
        elif mode == "keep":
            core.scheduler.preempt_requests(list(core.scheduler.running))
        core.scheduler.paused = "all" if mode == "keep" else "new"
        self.pending = (call_id, level)
        self.try_finish()

    def try_finish(self) -> None:
        """Completes a pending sleep once nothing runs (at once unless ``mode=wait`` left requests running)."""
        core = self.core
        if self.pending is None or core.scheduler.running:
            return
        call_id, level = self.pending
        self.pending = None
        core.read_back_inflight()
        core.scheduler.paused = "all"
        t0 = time.perf_counter()
        if level >= 1:
            core.worker.sleep(level)
            self.asleep = {*MEMORY_TAGS, "scheduling"}
        else:
            self.asleep = {"scheduling"}
        self.level = level
        logger.info("sleeping at level %d (%.3f s to free memory)", level, time.perf_counter() - t0)
        core.add_reply(UtilityReply(call_id))

    def wake_up(self, tags: list[str] | None) -> float:
        """Returns the seconds it took."""
        wanted = set(tags) if tags else set(TAGS)
        unknown = wanted - set(TAGS)
        if unknown:
            raise ValueError(f"tags: unknown tag(s) {sorted(unknown)}; use {', '.join(TAGS)}")
        t0 = time.perf_counter()
        if self.pending is not None:  # a sleep still waiting for running requests: it does not happen
            call_id, _ = self.pending
            self.pending = None
            self.core.scheduler.paused = None
            self.core.add_reply(UtilityReply(call_id, error="ValueError: the sleep was cancelled by a wake-up"))
        worker = self.core.worker
        if "weights" in wanted and "weights" in self.asleep:
            worker.wake_weights(reload=self.level >= 2)
            self.asleep.discard("weights")
        if "kv_cache" in wanted and "kv_cache" in self.asleep:
            worker.wake_kv_cache()
            self.asleep.discard("kv_cache")
        if not self.asleep & MEMORY_TAGS:
            self.asleep.clear()
            self.level = 0
            self.core.scheduler.paused = None
        self.last_wake_s = time.perf_counter() - t0
        logger.info("woke up %s in %.3f s", sorted(wanted), self.last_wake_s)
        return self.last_wake_s

    def state(self) -> int:
        """0 awake, else the level slept at (for the ``vllm:engine_sleep_state`` gauge)."""
        return self.level if self.asleep else 0
