"""vLLM's command-line spellings, rewritten before argparse sees them.

As vLLM's argument parser: ``--flag_name`` means ``--flag-name``, and ``--json-flag.key value`` (or
``--json-flag.key=value``, dots for nested keys) sets one key of a JSON flag; such keys merge into the
flag's JSON object (given whole or not). A value that parses as JSON is used as such, else as a string.
"""

from __future__ import annotations

import json
from typing import Any


def normalize_argv(argv: list[str]) -> list[str]:
    out: list[str] = []
    json_keys: dict[str, dict[str, Any]] = {}
    it = iter(argv)
    for arg in it:
        if arg == "--":  # the rest is positional
            out += [arg, *it]
            break
        if not arg.startswith("--"):
            out.append(arg)
            continue
        key, eq, value = arg.partition("=")
        name, dot, path = key[2:].partition(".")
        flag = "--" + name.replace("_", "-")
        if dot:
            _set_path(json_keys.setdefault(flag, {}), path.split("."), _parse(value if eq else next(it, "")))
        else:
            out.append(f"{flag}={value}" if eq else flag)
    for flag, keys in json_keys.items():
        _merge_json_flag(out, flag, keys)
    return out


def _merge_json_flag(argv: list[str], flag: str, keys: dict[str, Any]) -> None:
    """Merges ``keys`` into ``flag``'s JSON value in ``argv`` (appends the flag if it is not there)."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            argv[i + 1] = json.dumps({**_object(flag, argv[i + 1]), **keys})
            return
        if arg.startswith(flag + "="):
            argv[i] = f"{flag}={json.dumps({**_object(flag, arg[len(flag) + 1:]), **keys})}"
            return
    argv += [flag, json.dumps(keys)]


def _object(flag: str, raw: str) -> dict[str, Any]:
    value = _parse(raw)
    if not isinstance(value, dict):
        raise SystemExit(f"slicelm: error: {flag}: {raw!r} is not a JSON object, so {flag}.KEY cannot set a key")
    return value


def _parse(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = value
