"""Routing logics in process: order, affinity, minimal remapping, fallbacks, trie eviction."""

from __future__ import annotations

import random

import pytest

from slicelm.router.backends import Backend
from slicelm.router.discovery import Endpoint
from slicelm.router.logic import RoutingRequest, make_logic
from slicelm.router.logic.prefixaware import PrefixTrie, prompt_text
from slicelm.router.logic.session import HashRing
from slicelm.router.stats import EngineStats, RequestStatsMonitor


def backends(*urls: str) -> list[Backend]:
    return sorted((Backend(Endpoint(u, ("m",)), session=None) for u in urls), key=lambda b: b.url)  # type: ignore[arg-type]


def req(body: dict | None = None, headers: dict | None = None, logic=None) -> RoutingRequest:  # type: ignore[no-untyped-def]
    r = RoutingRequest("m", headers or {}, body or {})
    if logic is not None:
        r.session_id = logic.extract_session_id(r.headers, r.body)
    return r


def test_roundrobin_cycles_over_sorted_urls() -> None:
    logic = make_logic("roundrobin", RequestStatsMonitor(60))
    bs = backends("http://b:2", "http://a:1", "http://c:3")
    picked = [logic.route(bs, req()).url for _ in range(6)]
    assert picked == ["http://a:1", "http://b:2", "http://c:3"] * 2
    assert all(picked[i] != picked[i - 1] for i in range(1, len(picked)))


def test_session_sticks_and_reads_header_then_body() -> None:
    logic = make_logic("session", RequestStatsMonitor(60), session_key="x-user-id")
    bs = backends("http://a:1", "http://b:2", "http://c:3")
    for sid in (f"user-{i}" for i in range(50)):
        first = logic.route(bs, req(headers={"x-user-id": sid}, logic=logic))
        assert all(logic.route(bs, req(headers={"x-user-id": sid}, logic=logic)) is first for _ in range(4))
        assert logic.route(bs, req(body={"x-user-id": sid}, logic=logic)) is first
    r = req(body={"x-user-id": "body"}, headers={"x-user-id": "header"}, logic=logic)
    assert r.session_id == "header"


def test_session_without_key_goes_to_least_loaded() -> None:
    logic = make_logic("session", RequestStatsMonitor(60), session_key="x-user-id")
    bs = backends("http://a:1", "http://b:2")
    bs[0].in_flight = 3
    assert logic.route(bs, req(logic=logic)).url == "http://b:2"


def test_hash_ring_remaps_only_the_arcs_of_a_joining_or_leaving_node() -> None:
    keys = [f"session-{i}" for i in range(4000)]
    three = HashRing(["http://a", "http://b", "http://c"])
    four = HashRing(["http://a", "http://b", "http://c", "http://d"])
    before = {k: three.get(k) for k in keys}
    after = {k: four.get(k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == "http://d" for k in moved)  # only moves onto the new node
    assert 0.15 < len(moved) / len(keys) < 0.35  # about 1/4 of the sessions
    two = HashRing(["http://a", "http://c"])
    gone = [k for k in keys if before[k] != two.get(k)]
    assert {before[k] for k in gone} == {"http://b"}  # only the removed node's sessions move
    counts = {n: list(before.values()).count(n) for n in ("http://a", "http://b", "http://c")}
    assert min(counts.values()) > len(keys) / 3 * 0.75


def test_leastloaded_counts_scraped_and_in_flight() -> None:
    logic = make_logic("leastloaded", RequestStatsMonitor(60))
    bs = backends("http://a:1", "http://b:2")
    bs[0].engine_stats = EngineStats(num_running_requests=2, num_queuing_requests=1)
    bs[1].in_flight = 2
    assert logic.route(bs, req()).url == "http://b:2"
    bs[1].in_flight = 4
    assert logic.route(bs, req()).url == "http://a:1"


def test_least_loaded_ties_go_to_lowest_qps_then_unused() -> None:
    stats = RequestStatsMonitor(60)
    logic = make_logic("leastloaded", stats)
    bs = backends("http://a:1", "http://b:2", "http://c:3")
    stats.on_new_request("http://a:1", 1e9)
    stats.on_new_request("http://b:2", 1e9)
    import time

    stats.on_new_request("http://a:1", time.time())
    stats.on_new_request("http://b:2", time.time())
    assert logic.route(bs, req()).url == "http://c:3"  # never used wins


def chunk(c: str) -> str:
    return c * 128


def test_prefixaware_keeps_chained_prefixes_together_and_spreads_new_ones() -> None:
    stats = RequestStatsMonitor(60)
    logic = make_logic("prefixaware", stats)
    bs = backends("http://a:1", "http://b:2")
    homes = []
    for c in "1234":
        chain = [chunk(c), chunk(c) + chunk("x"), chunk(c) + chunk("x") + chunk("y")]
        used = set()
        for prompt in chain:
            for _ in range(3):
                b = logic.route(bs, req({"prompt": prompt}))
                stats.on_new_request(b.url, __import__("time").time())
                used.add(b.url)
        assert len(used) == 1
        homes.append(used.pop())
    assert len(set(homes)) == 2  # new prefixes go to the least-loaded (lowest QPS) replica


def test_prefixaware_min_match_falls_back_but_still_records() -> None:
    logic = make_logic("prefixaware", RequestStatsMonitor(60), prefix_min_match_length=256)
    bs = backends("http://a:1", "http://b:2")
    first = logic.route(bs, req({"prompt": chunk("1")}))
    matched, holders = logic.trie.longest_match(chunk("1"), {"http://a:1", "http://b:2"})  # type: ignore[attr-defined]
    assert matched == 128 and holders == {first.url}
    bs_sorted = {b.url: b for b in bs}
    bs_sorted[first.url].in_flight = 5  # a 128-char match is below 256: least loaded wins
    assert logic.route(bs, req({"prompt": chunk("1")})).url != first.url
    long = chunk("1") + chunk("2") + chunk("3")
    home = logic.route(bs, req({"prompt": long}))
    for b in bs:
        b.in_flight = 0
    home.in_flight = 3
    assert logic.route(bs, req({"prompt": long})) is home  # 384 >= 256: affinity despite load


def test_prefix_trie_is_bounded() -> None:
    trie = PrefixTrie(max_nodes=100)
    rng = random.Random(0)
    for i in range(200):
        trie.insert("".join(rng.choice("abcdef") for _ in range(128 * 3)) + str(i), "http://a")
    assert trie.size <= 100
    recent = "z" * 256
    trie.insert(recent, "http://b")
    assert trie.longest_match(recent, {"http://b"}) == (256, {"http://b"})


def test_prompt_text_joins_chat_messages() -> None:
    body = {"messages": [{"role": "system", "content": "sys"},
                         {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"},
                                                      {"type": "text", "text": "b"}]}]}
    assert prompt_text(body) == "sys\na b"
    assert prompt_text({"prompt": ["p1", "p2"]}) == "p1"
    assert prompt_text({"input": "emb"}) == "emb"


def test_unknown_logic_names_the_flag() -> None:
    with pytest.raises(ValueError, match="--routing-logic"):
        make_logic("kvaware", RequestStatsMonitor(60))


def test_prefixaware_affinity_yields_to_load_past_the_imbalance() -> None:
    logic = make_logic("prefixaware", RequestStatsMonitor(60), prefix_max_imbalance=2)
    bs = backends("http://a:1", "http://b:2")
    system = chunk("s") * 2
    home = logic.route(bs, req({"prompt": system + "user one"}))
    home.in_flight = 2
    assert logic.route(bs, req({"prompt": system + "user two"})) is home  # 2 more: within the bound
    home.in_flight = 3
    other = logic.route(bs, req({"prompt": system + "user three" + chunk("t")}))
    assert other is not home  # 3 more: spill to the least loaded ...
    home.in_flight = 0
    assert logic.route(bs, req({"prompt": system + "user three" + chunk("t") + "more"})) is other  # ... which keeps it
