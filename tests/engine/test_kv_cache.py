"""Block pool and KV cache manager: invariants under random operation sequences (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from slicelm.engine.kv_cache import KVCacheManager, cdiv
from slicelm.engine.request import Request

BS = 4


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens))


def test_prefix_hit_reuses_freed_blocks_and_counts_tokens():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request("a", list(range(10)))  # 2 full blocks + 2 tokens
    hits, n = kv.get_computed_blocks(a)
    assert (hits, n) == ([], 0)
    assert kv.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    a_blocks = kv.block_ids("a")
    assert len(a_blocks) == 3
    kv.free(a)
    assert kv.usage() == 0.0

    b = make_request("b", [*range(8), 99, 98, 97])  # shares the 2 full blocks
    hits, n = kv.get_computed_blocks(b)
    assert n == 8 and [h.block_id for h in hits] == a_blocks[:2]
    assert kv.allocate_slots(b, b.num_tokens - n, hits)
    assert kv.block_ids("b")[:2] == a_blocks[:2]
    assert kv.prefix_cache_queries == 10 + 11 and kv.prefix_cache_hits == 8


def test_whole_prompt_hit_still_recomputes_last_token():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(8)))
    assert kv.allocate_slots(a, 8)
    kv.free(a)
    b = make_request("b", list(range(8)))
    hits, n = kv.get_computed_blocks(b)
    assert n == 4 and len(hits) == 1  # the block holding the last token is recomputed


def test_shared_blocks_are_refcounted_and_never_handed_out():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = make_request("a", list(range(9)))
    assert kv.allocate_slots(a, 9)
    b = make_request("b", list(range(9)))
    hits, n = kv.get_computed_blocks(b)
    assert n == 8
    assert kv.allocate_slots(b, 1, hits)
    shared = kv.req_to_blocks["a"][:2]
    assert all(blk.ref_cnt == 2 for blk in shared)
    assert kv.num_free_blocks == 6 - 4
    # Exhaust the pool: the shared blocks must not come back.
    c = make_request("c", list(range(100, 108)))
    assert kv.allocate_slots(c, 8)
    assert not set(kv.block_ids("c")) & {blk.block_id for blk in shared}
    assert not kv.allocate_slots(make_request("d", [1]), 1)


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=BS)
    r = make_request("r", list(range(12)))
    assert not kv.allocate_slots(r, 12)
    assert kv.num_free_blocks == 2 and "r" not in kv.req_to_blocks


def test_lru_eviction_takes_oldest_freed_block_first():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    reqs = [make_request(str(i), [i * 10 + j for j in range(4)]) for i in range(3)]
    for r in reqs:
        assert kv.allocate_slots(r, 4)
    for r in reqs:
        kv.free(r)
    # One new block evicts request 0's block; requests 1 and 2 still hit.
    assert kv.allocate_slots(make_request("x", [7, 7, 7]), 3)
    hit_tokens = []
    for r in reqs:
        _, n = kv.get_computed_blocks(make_request("q" + r.request_id, [*r.prompt_token_ids, 1]))
        hit_tokens.append(n)
    assert hit_tokens == [0, 4, 4]


class KVCacheMachine(RuleBasedStateMachine):
    """Random allocate / append / free / prefix-hit sequences keep the pool consistent."""

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True)
        self.live: dict[str, Request] = {}
        self.n = 0

    @rule(prefix=st.sampled_from([[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]]),
          tail=st.lists(st.integers(0, 5), min_size=1, max_size=12))
    def add(self, prefix, tail):
        self.n += 1
        r = make_request(f"r{self.n}", prefix + tail)
        hits, n = self.kv.get_computed_blocks(r)
        assert n < r.num_tokens and n % BS == 0
        if self.kv.allocate_slots(r, r.num_tokens - n, hits):
            r.num_computed_tokens = r.num_tokens
            self.live[r.request_id] = r

    @precondition(lambda self: self.live)
    @rule(data=st.data(), k=st.integers(1, 6))
    def append(self, data, k):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        r = self.live[rid]
        for _ in range(k):
            r.append_output_token(3)
        if self.kv.allocate_slots(r, k):
            r.num_computed_tokens = r.num_tokens
        else:
            self.kv.free(r)  # what the scheduler does on preemption
            del self.live[rid]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.kv.free(self.live.pop(rid))

    @invariant()
    def consistent(self):
        pool = self.kv.pool
        owners: dict[int, int] = {}
        for rid, blocks in self.kv.req_to_blocks.items():
            assert rid in self.live
            assert len(blocks) == cdiv(self.live[rid].num_tokens, BS)
            for b in blocks:
                owners[b.block_id] = owners.get(b.block_id, 0) + 1
        for b in pool.blocks:
            assert b.ref_cnt == owners.get(b.block_id, 0), "ref counts balance"
            assert (b.block_id in pool.free_queue) == (b.ref_cnt == 0), "referenced blocks are never free"
        for h, b in pool.cached.items():
            assert b.block_hash == h
        assert 0.0 <= self.kv.usage() <= 1.0

    def teardown(self):
        for r in list(self.live.values()):
            self.kv.free(r)
        assert self.kv.usage() == 0.0, "no leaked block"
        assert all(b.ref_cnt == 0 for b in self.kv.pool.blocks)


TestKVCacheMachine = KVCacheMachine.TestCase
TestKVCacheMachine.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


@pytest.mark.parametrize("enable", [True, False])
def test_disabled_caching_never_hits(enable):
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_caching=enable)
    a = make_request("a", list(range(9)))
    assert kv.allocate_slots(a, 9)
    kv.free(a)
    _, n = kv.get_computed_blocks(make_request("b", list(range(9))))
    assert n == (8 if enable else 0)


def test_block_hashes_are_sha256_and_ignore_builtin_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    """Different blocks never share a cached block, even if Python's ``hash`` of their keys is equal."""
    import builtins

    from slicelm.engine.kv_cache import hash_block

    monkeypatch.setattr(builtins, "hash", lambda _obj: 0)  # every key collides under the built-in hash
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    kv.get_computed_blocks(a)
    assert kv.allocate_slots(a, a.num_tokens)
    a.num_computed_tokens = a.num_tokens
    kv.free(a)
    assert len(kv.pool.cached) == 2
    for tokens in ([1, 2, 3, 5, 5, 6, 7, 8, 9], [2, 1, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 9, 9]):
        b = make_request("b", tokens)
        hits, n = kv.get_computed_blocks(b)
        same = next((i for i in range(2) if tokens[i * BS:(i + 1) * BS] != a.all_token_ids[i * BS:(i + 1) * BS]), 2)
        assert n == same * BS and len(hits) == same, tokens  # only the truly equal prefix hits
    # the hash: sha256 (32 bytes) over an unambiguous serialization of parent, tokens and extra keys
    h = hash_block(None, [1, 2, 3, 4])
    assert isinstance(h, bytes) and len(h) == 32
    assert hash_block(None, [1, 2, 3, 4]) == h
    assert len({h, hash_block(h, [1, 2, 3, 4]), hash_block(None, [1, 2, 3, 4], ("tenant-a",)),
                hash_block(None, [1, 2, 3, 4], ("tenant-b",)), hash_block(None, [12, 3, 4]),
                hash_block(None, [1, 23, 4]), hash_block(None, [-1, 2, 3, 4])}) == 7
