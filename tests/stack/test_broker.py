"""The per-GPU memory broker: its rules (``BrokerState``) and the real thing over zmq (``BrokerServer`` with
``BrokerLink`` clients): owners always get their share, borrowers give it back within the bound or are
reported overdue, the policy switches at run time."""

from __future__ import annotations

import time

import pytest

from slicelm.slicing.broker_client import BrokerControl, BrokerLink
from slicelm.slicing.broker_protocol import Grant, Limits, Reclaim
from slicelm.stack.broker import BrokerState
from slicelm.stack.broker_server import BrokerServer

G = 100  # guarantee of every member in the unit tests


def _grants(outs, name):
    return [m for n, m in outs if n == name and isinstance(m, Grant)]


def _reclaims(outs):
    return {n: m.target for n, m in outs if isinstance(m, Reclaim)}


def test_owner_gets_its_share_back_from_a_borrower() -> None:
    st = BrokerState({"gpu0": 300}, max_borrow=None, reclaim_timeout=1.0)
    st.register("a", "gpu0", G, 0, now=0)
    st.register("b", "gpu0", G, 0, now=0)
    assert _grants(st.acquire("b", 1, 250, now=0), "b")[0].granted  # b borrows 150 beyond its guarantee
    assert st.members["b"].borrowed == 150
    outs = st.acquire("a", 2, 100, now=1)  # a wants its whole share: 50 free, 50 must come back from b
    assert _grants(outs, "a") == [] and _reclaims(outs) == {"b": 200}
    assert st.members["b"].reclaim_deadline == 2.0
    assert not _grants(st.acquire("b", 3, 10, now=1), "b")[0].granted  # no borrowing while an owner waits
    outs = st.release("b", 50, now=1.5)
    assert _grants(outs, "a") == [Grant(2, True)]
    assert st.members["a"].used == 100 and st.members["b"].used == 200
    assert st.members["b"].reclaim_target is None and st.overdue(10) == []


def test_borrowing_is_bounded_by_the_ceiling_and_free_memory() -> None:
    st = BrokerState({"gpu0": 280}, max_borrow=50, reclaim_timeout=1.0)
    st.register("a", "gpu0", G, 0, now=0)
    st.register("b", "gpu0", G, 0, now=0)
    assert st.members["a"].ceiling == 150
    assert not _grants(st.acquire("a", 1, 160, now=0), "a")[0].granted
    assert _grants(st.acquire("a", 2, 150, now=0), "a")[0].granted
    assert _grants(st.acquire("b", 3, 100, now=0), "b")[0].granted  # its own share always fits
    grant = _grants(st.acquire("b", 4, 50, now=0), "b")[0]
    assert not grant.granted and grant.reason == "no free memory"


def test_static_policy_reclaims_every_borrower_and_overdue_is_reported() -> None:
    st = BrokerState({"gpu0": 400}, max_borrow=None, reclaim_timeout=2.0)
    for name in ("a", "b"):
        st.register(name, "gpu0", G, 0, now=0)
    st.acquire("a", 1, 180, now=0)
    outs = st.set_policy(0, now=5)
    assert {m.ceiling for _, m in outs if isinstance(m, Limits)} == {G}
    assert _reclaims(outs) == {"a": G}
    assert st.overdue(6.9) == [] and st.overdue(7.1) == ["a"]
    st.release("a", 80, now=8)
    assert st.overdue(9) == []


def test_a_member_that_leaves_frees_its_memory_for_waiting_owners() -> None:
    st = BrokerState({"gpu0": 200}, max_borrow=None)
    st.register("a", "gpu0", G, 0, now=0)
    st.register("b", "gpu0", G, 0, now=0)
    st.acquire("b", 1, 200, now=0)
    assert _grants(st.acquire("a", 2, 60, now=0), "a") == []
    assert _grants(st.leave("b", now=1), "a") == [Grant(2, True)]


@pytest.fixture()
def server(tmp_path):
    overdue: list[str] = []
    srv = BrokerServer(f"ipc://{tmp_path}/broker.ipc", BrokerState({"gpu0": 300}, None, reclaim_timeout=0.5),
                       on_overdue=overdue.append).start()
    srv.overdue_seen = overdue
    yield srv
    srv.stop()


def test_over_zmq_owner_waits_for_a_borrower_and_a_hung_borrower_is_reported(server) -> None:
    a, b = BrokerLink(server.address, "a", "gpu0"), BrokerLink(server.address, "b", "gpu0")
    try:
        assert a.register(G) == 300 and b.register(G) == 300
        assert b.acquire(280, wait_s=2.0)[1] is True
        t0 = time.monotonic()
        seq, granted = a.acquire(G, wait_s=0.1)
        assert granted is None  # waits for b
        while not server.overdue_seen and time.monotonic() - t0 < 5:  # b never answers its Reclaim
            time.sleep(0.02)
        assert server.overdue_seen == ["b"] and 0.45 < time.monotonic() - t0 < 2.0
        assert any(isinstance(m, Reclaim) and m.target == 200 for m in b.poll())
        b.release(80)  # late, but then a gets its share
        deadline = time.monotonic() + 2
        msgs: list = []
        while not msgs and time.monotonic() < deadline:
            msgs = a.poll()
            time.sleep(0.01)
        assert Grant(seq, True) in msgs
        ctl = BrokerControl(server.address)
        st = ctl.status()
        assert st["members"]["a"]["used"] == G and st["members"]["b"]["borrowed"] == 100
        st = ctl.set_policy(0)
        assert st["members"]["b"]["reclaim_target"] == G and st["max_borrow"] == 0
        ctl.close()
    finally:
        a.close()
        b.close()
