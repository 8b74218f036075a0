"""Scheduler: token budget, chunked prefill, admission, preemption order, abort."""

from __future__ import annotations

from slicelm.config import SchedulerConfig
from slicelm.engine.kv_cache import KVCacheManager
from slicelm.engine.request import Request, RequestStatus
from slicelm.engine.scheduler import Scheduler


def make(num_blocks=64, block_size=4, max_seqs=8, budget=32, policy="fcfs") -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=1024, policy=policy)
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size))


def step(s: Scheduler, sample_token: int = 1):
    out = s.schedule()
    s.update_after_step(out)
    for sr in out.scheduled:
        if sr.request.num_computed_tokens == sr.request.num_tokens:
            sr.request.append_output_token(sample_token)
    return out


def test_chunked_prefill_respects_budget():
    s = make(budget=10)
    r = Request("a", list(range(25)))
    s.add_request(r)
    sizes = []
    for _ in range(4):
        out = step(s)
        sizes.append([(x.request.request_id, x.num_new_tokens, x.samples) for x in out.scheduled])
    assert sizes[0] == [("a", 10, False)]
    assert sizes[1] == [("a", 10, False)]
    assert sizes[2] == [("a", 5, True)]
    assert sizes[3] == [("a", 1, True)]  # decode


def test_running_first_then_waiting_and_max_num_seqs():
    s = make(budget=100, max_seqs=2)
    for i in range(3):
        s.add_request(Request(str(i), [i] * 5))
    out = step(s)
    assert [x.request.request_id for x in out.scheduled] == ["0", "1"]
    out = step(s)
    assert [x.request.request_id for x in out.scheduled] == ["0", "1"]  # "2" waits for a slot
    assert len(s.waiting) == 1


def test_preemption_fcfs_newest_first_and_recompute():
    # 4 blocks of 4 tokens; two requests of 7 tokens take 2 blocks each, decoding needs a third.
    s = make(num_blocks=4, block_size=4, budget=64)
    a, b = Request("a", list(range(7))), Request("b", list(range(100, 107)))
    s.add_request(a)
    s.add_request(b)
    step(s)  # prefill: 2 blocks each, all 4 used
    step(s)  # decode of position 7 still fits in block 2
    out = step(s)  # position 8 needs a third block each: a gets none free, so b (newest) goes
    assert out.preempted == [b] and b.status == RequestStatus.PREEMPTED
    assert b.num_computed_tokens == 0 and s.waiting[0] is b
    assert s.num_preemptions == 1


def test_priority_policy_preempts_lowest_priority():
    s = make(num_blocks=4, block_size=4, budget=64, policy="priority")
    hi = Request("hi", list(range(7)), priority=0, arrival_time=2.0)
    lo = Request("lo", list(range(100, 107)), priority=5, arrival_time=1.0)
    s.add_request(lo)
    s.add_request(hi)
    out = step(s)
    assert [x.request.request_id for x in out.scheduled] == ["hi", "lo"]
    for _ in range(3):
        step(s)
    assert lo.status == RequestStatus.PREEMPTED and hi.status == RequestStatus.RUNNING


def test_abort_frees_everything():
    s = make()
    reqs = [Request(str(i), list(range(10))) for i in range(3)]
    for r in reqs:
        s.add_request(r)
    step(s)
    s.finish_requests(reqs, RequestStatus.FINISHED_ABORTED)
    assert not s.has_unfinished_requests()
    assert s.kv_cache.usage() == 0.0
    assert all(r.status == RequestStatus.FINISHED_ABORTED for r in reqs)
