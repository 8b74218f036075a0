"""Least loaded: scraped ``vllm:num_requests_running`` + ``waiting`` plus the router's in-flight count."""

from __future__ import annotations

from slicelm.router.backends import Backend
from slicelm.router.logic.base import RoutingLogic, RoutingRequest


class LeastLoadedLogic(RoutingLogic):
    name = "leastloaded"

    def route(self, backends: list[Backend], req: RoutingRequest) -> Backend:
        return self.least_loaded(backends)
