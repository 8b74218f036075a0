"""Prefix affinity: a trie of hashed 128-character prompt chunks remembers which endpoints saw which prefixes.

A request goes to an endpoint holding its longest known prefix (the least loaded of them); below
``--prefix-min-match-length`` characters, or with no match, it goes to the least-loaded endpoint, and the prompt is
recorded either way. Affinity yields to load past ``--prefix-max-imbalance``: when the holder has that many more
requests than the least-loaded endpoint (a shared system prompt would otherwise pull every conversation onto one
replica), the least-loaded one takes the request and from then on holds its prefix too.
The trie is bounded: past ``max_nodes`` the least recently used nodes are dropped.
"""

from __future__ import annotations

import time
from typing import Any

from slicelm.router.backends import Backend
from slicelm.router.logic.base import RoutingLogic, RoutingRequest

CHUNK = 128


class _Node:
    __slots__ = ("children", "endpoints", "key", "last_used", "parent")

    def __init__(self, parent: _Node | None, key: int) -> None:
        self.children: dict[int, _Node] = {}
        self.endpoints: set[str] = set()
        self.parent = parent
        self.key = key
        self.last_used = 0.0


class PrefixTrie:
    def __init__(self, chunk_size: int = CHUNK, max_nodes: int = 200_000) -> None:
        self.chunk_size = chunk_size
        self.max_nodes = max_nodes
        self.root = _Node(None, 0)
        self.size = 0

    def _hashes(self, text: str) -> list[int]:
        c = self.chunk_size
        return [hash(text[i:i + c]) for i in range(0, len(text), c)]

    def longest_match(self, text: str, available: set[str]) -> tuple[int, set[str]]:
        """(matched characters, endpoints holding that prefix among ``available``)."""
        node, matched, selected = self.root, 0, available
        now = time.monotonic()
        for h in self._hashes(text):
            node = node.children.get(h)  # type: ignore[assignment]
            if node is None:
                break
            inter = node.endpoints & selected
            if not inter:
                break
            node.last_used = now
            matched += self.chunk_size
            selected = inter
        return min(matched, len(text)), selected

    def insert(self, text: str, endpoint: str) -> None:
        node = self.root
        now = time.monotonic()
        node.endpoints.add(endpoint)
        for h in self._hashes(text):
            child = node.children.get(h)
            if child is None:
                child = node.children[h] = _Node(node, h)
                self.size += 1
            child.endpoints.add(endpoint)
            child.last_used = now
            node = child
        if self.size > self.max_nodes:
            self.evict(self.size - self.max_nodes * 9 // 10)

    def evict(self, n: int) -> None:
        """Drop at least ``n`` nodes, least recently used first (a node is never newer than its parent)."""
        nodes: list[_Node] = []
        stack = list(self.root.children.values())
        while stack:
            x = stack.pop()
            nodes.append(x)
            stack.extend(x.children.values())
        nodes.sort(key=lambda x: x.last_used)
        removed = 0
        for x in nodes:
            if removed >= n:
                break
            parent = x.parent
            if parent is None or parent.children.get(x.key) is not x:
                continue  # already gone with an ancestor
            del parent.children[x.key]
            x.parent = None
            removed += self._count(x)
        self.size -= removed

    @staticmethod
    def _count(node: _Node) -> int:
        n, stack = 0, [node]
        while stack:
            x = stack.pop()
            n += 1
            stack.extend(x.children.values())
        return n


def prompt_text(body: dict[str, Any]) -> str:
    """Chat messages' text joined with newlines; else ``prompt`` / ``input`` / ``query``."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):
                parts.append(" ".join(p.get("text", "") for p in content if isinstance(p, dict)
                                      and p.get("type") == "text"))
            elif content is not None:
                parts.append(str(content))
        return "\n".join(parts)
    for key in ("prompt", "input", "query", "text"):
        v = body.get(key)
        if v is None:
            continue
        if isinstance(v, list):
            v = v[0] if v and isinstance(v[0], str) else ",".join(map(str, v))
        return str(v)
    return ""


class PrefixAwareLogic(RoutingLogic):
    name = "prefixaware"

    def __init__(self, *args, prefix_min_match_length: int = 0, max_imbalance: float = 4,
                 max_nodes: int = 200_000, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.min_match = prefix_min_match_length
        self.max_imbalance = max_imbalance
        self.trie = PrefixTrie(max_nodes=max_nodes)

    def route(self, backends: list[Backend], req: RoutingRequest) -> Backend:
        text = prompt_text(req.body)
        by_url = {b.url: b for b in backends}
        matched, holders = self.trie.longest_match(text, set(by_url))
        least = self.least_loaded(backends)
        if matched == 0 or matched < self.min_match:
            chosen = least
        else:
            chosen = self.least_loaded([by_url[u] for u in sorted(holders)])
            if chosen.load() - least.load() > self.max_imbalance:
                chosen = least
        self.trie.insert(text, chosen.url)
        return chosen
