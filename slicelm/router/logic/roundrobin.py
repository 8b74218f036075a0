"""Round robin over the model's endpoints sorted by URL (order of arrival does not matter)."""

from __future__ import annotations

from slicelm.router.backends import Backend
from slicelm.router.logic.base import RoutingLogic, RoutingRequest


class RoundRobinLogic(RoutingLogic):
    name = "roundrobin"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._next: dict[tuple[str, ...], int] = {}

    def route(self, backends: list[Backend], req: RoutingRequest) -> Backend:
        assert backends, "roundrobin needs at least one endpoint"
        key = tuple(b.url for b in backends)
        i = self._next.get(key, 0)
        if len(self._next) > 1024 and key not in self._next:
            self._next.clear()
        self._next[key] = i + 1
        return backends[i % len(backends)]
