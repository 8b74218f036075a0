"""Session affinity: a consistent-hash ring over the endpoints keyed on ``--session-key`` (header, then body).

Each endpoint owns ``VNODES`` points on the ring, so when one joins or leaves only the sessions on its arcs move.
Requests without a session id go to the least-loaded endpoint.
"""

from __future__ import annotations

import bisect
import hashlib

from slicelm.router.backends import Backend
from slicelm.router.logic.base import RoutingLogic, RoutingRequest

VNODES = 160


def _point(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class HashRing:
    def __init__(self, nodes: list[str]) -> None:
        assert nodes, "a hash ring needs at least one node"
        pairs = sorted((_point(f"{n}#{i}"), n) for n in nodes for i in range(VNODES))
        self._points = [p for p, _ in pairs]
        self._nodes = [n for _, n in pairs]

    def get(self, key: str) -> str:
        i = bisect.bisect(self._points, _point(key)) % len(self._points)
        return self._nodes[i]


class SessionLogic(RoutingLogic):
    name = "session"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._rings: dict[tuple[str, ...], HashRing] = {}

    def ring(self, urls: tuple[str, ...]) -> HashRing:
        ring = self._rings.get(urls)
        if ring is None:
            if len(self._rings) > 256:
                self._rings.clear()
            ring = self._rings[urls] = HashRing(list(urls))
        return ring

    def route(self, backends: list[Backend], req: RoutingRequest) -> Backend:
        if req.session_id is None:
            return self.least_loaded(backends)
        by_url = {b.url: b for b in backends}
        return by_url[self.ring(tuple(by_url)).get(req.session_id)]
