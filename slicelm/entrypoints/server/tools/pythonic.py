"""``pythonic`` (Llama 3.2 / 4, ToolACE): a Python list of calls, ``[get_weather(city="Paris"), now()]``, with
literal arguments; it may follow ``<|python_start|>`` and precede ``<|python_end|>``."""

from __future__ import annotations

import ast
from typing import Any

from slicelm.entrypoints.server.tools.base import ToolParser


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Name) and node.id in ("true", "false", "null"):  # JSON spellings models write
        return {"true": True, "false": False, "null": None}[node.id]
    return ast.literal_eval(node)


class PythonicToolParser(ToolParser):
    name = "pythonic"
    start_markers = ("[", "<|python_start|>")

    def start_index(self, text: str) -> int | None:
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith(self.start_markers) else None

    def held_back(self, text: str) -> int:
        return len(text) if "<|python_start|>".startswith(text.lstrip()) and text.strip() else 0

    def parse(self, text: str) -> tuple[str | None, list[tuple[str, Any]]] | None:
        calls = _calls(_body(text))
        return None if calls is None else (None, calls)

    def complete_calls(self, text: str) -> list[tuple[str, Any]]:
        """The longest prefix that ends a call (at a ``)``) and closes as a list holds the complete calls."""
        body = _body(text)
        end = len(body)
        while (end := body.rfind(")", 0, end)) >= 0:
            calls = _calls(body[: end + 1] + "]")
            if calls is not None:
                return calls
        return []


def _body(text: str) -> str:
    return text.strip().removeprefix("<|python_start|>").removesuffix("<|python_end|>").strip()


def _calls(body: str) -> list[tuple[str, Any]] | None:
    """``[f(a=1), g()]`` as ``[(name, arguments)]``; None unless it is a list of calls with literal arguments."""
    try:
        tree = ast.parse(body, mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(tree, ast.List) or not all(isinstance(e, ast.Call) for e in tree.elts):
        return None
    calls = []
    for call in tree.elts:
        assert isinstance(call, ast.Call)
        if not isinstance(call.func, ast.Name) or call.args:
            return None
        try:
            calls.append((call.func.id, {kw.arg: _literal(kw.value) for kw in call.keywords}))
        except (ValueError, TypeError, SyntaxError):
            return None
    return calls
