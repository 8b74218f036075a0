"""Process limits a router needs: one connection to the client and one to a replica per request in flight, so
thousands of concurrent streams need thousands of file descriptors (the usual soft limit is 1024)."""

from __future__ import annotations

import logging
import resource

logger = logging.getLogger("slicelm.router")


def raise_open_files_limit() -> int:
    """Raises the soft ``RLIMIT_NOFILE`` to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            logger.warning("could not raise the open-files limit from %d to %d: %s", soft, target, e)
    return soft
