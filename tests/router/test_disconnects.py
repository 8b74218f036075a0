"""A client that leaves lets go of its request at the router and at the replica: for every forwarded route, before
the first byte and mid-stream, streamed or not, and while the request waits in the router's queue. The replicas are
fake backends that count the requests cancelled under them (tests/router/fake_backend.py); the real server's side is
in test_real_backends.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from router_helpers import Proc, scrape, send_and_hold, start_fake, start_router, wait_for

from slicelm.router.app import PROXIED

pytestmark = pytest.mark.slow


def _gauge(url: str, name: str) -> float:
    return sum(scrape(url, name).values())


def _cancelled(fake: Proc) -> dict[str, float]:
    return {k.split('"')[1]: v for k, v in scrape(fake.url, "fake_cancelled_total").items()}


def _body(path: str, stream: bool) -> dict:
    return {"model": "fake", "prompt": "p", "messages": [], "stream": stream}


def test_leaving_client_cancels_the_replica_request_on_every_route(tmp_path: Path, procs: list[Proc]) -> None:
    fake = start_fake(tmp_path, "--delay", "120")  # silent far longer than the test: only a cancel ends it
    router = start_router(tmp_path, [fake.url], ["fake"])
    procs += [fake, router]
    socks = [send_and_hold(router.url, path, _body(path, stream)) for path in PROXIED for stream in (False, True)]
    try:
        wait_for(lambda: _gauge(fake.url, "vllm:num_requests_running") == len(socks), 20,
                 "every request to reach the replica")
    finally:
        for s in socks:
            s.close()
    t0 = time.time()
    wait_for(lambda: _gauge(fake.url, "vllm:num_requests_running") == 0, 10, "the replica to cancel them all")
    assert time.time() - t0 < 2.0
    assert _cancelled(fake) == dict.fromkeys(PROXIED, 2.0)


def test_leaving_mid_stream_cancels_at_once(tmp_path: Path, procs: list[Proc]) -> None:
    fake = start_fake(tmp_path, "--chunks", "100000", "--chunk-interval", "30")  # one chunk, then silence
    router = start_router(tmp_path, [fake.url], ["fake"])
    procs += [fake, router]
    sock = send_and_hold(router.url, "/v1/chat/completions", _body("", True))
    received = b""
    while b"data: " not in received:
        received += sock.recv(65536)
    sock.close()
    t0 = time.time()
    wait_for(lambda: _cancelled(fake).get("/v1/chat/completions") == 1, 10, "the stream to be cancelled")
    assert time.time() - t0 < 2.0


def test_queued_request_whose_client_left_never_reaches_a_replica(tmp_path: Path, procs: list[Proc]) -> None:
    fake = start_fake(tmp_path, "--delay", "3")
    router = start_router(tmp_path, [fake.url], ["fake"], "--max-inflight-per-replica", "1")
    procs += [fake, router]
    holder = send_and_hold(router.url, "/v1/completions", _body("", False))
    wait_for(lambda: _gauge(fake.url, "fake_served") == 1, 10, "the first request to take the only slot")
    queued = [send_and_hold(router.url, "/v1/completions", _body("", False)) for _ in range(5)]
    wait_for(lambda: _gauge(router.url, "slicelm_router_queued_requests") == 5, 10, "5 requests to queue")
    for s in queued:
        s.close()
    wait_for(lambda: _gauge(router.url, "slicelm_router_queued_requests") == 0, 2, "the queue to empty")
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += holder.recv(65536)
    holder.close()
    assert answer.startswith(b"HTTP/1.1 200")
    time.sleep(0.5)
    assert _gauge(fake.url, "fake_served") == 1  # none of the 5 was forwarded after its client left
    # the slots they held in the queue were given back: the next request is served at once
    sock = send_and_hold(router.url, "/v1/completions", _body("", False))
    wait_for(lambda: _gauge(fake.url, "fake_served") == 2, 2, "a new request to be forwarded")
    sock.close()
