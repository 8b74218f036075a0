"""Routing logics, one module each, behind ``RoutingLogic.route(backends, request) -> Backend``."""

from __future__ import annotations

from slicelm.router.logic.base import RoutingLogic, RoutingRequest
from slicelm.router.logic.leastloaded import LeastLoadedLogic
from slicelm.router.logic.prefixaware import PrefixAwareLogic
from slicelm.router.logic.roundrobin import RoundRobinLogic
from slicelm.router.logic.session import SessionLogic
from slicelm.router.stats import RequestStatsMonitor

LOGICS: dict[str, type[RoutingLogic]] = {
    "roundrobin": RoundRobinLogic,
    "session": SessionLogic,
    "prefixaware": PrefixAwareLogic,
    "leastloaded": LeastLoadedLogic,
}

__all__ = ["LOGICS", "RoutingLogic", "RoutingRequest", "make_logic"]


def make_logic(name: str, stats: RequestStatsMonitor, session_key: str | None = None,
               prefix_min_match_length: int = 0, prefix_max_imbalance: float = 4) -> RoutingLogic:
    if name not in LOGICS:
        raise ValueError(f"--routing-logic: unknown value {name!r} (choose from {', '.join(LOGICS)})")
    if name == "prefixaware":
        return PrefixAwareLogic(stats, session_key, prefix_min_match_length=prefix_min_match_length,
                                max_imbalance=prefix_max_imbalance)
    return LOGICS[name](stats, session_key)
