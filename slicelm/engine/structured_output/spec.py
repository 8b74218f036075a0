"""What a structured-output request asks for, as one hashable ``GrammarSpec`` (API and core side alike).

``grammar_spec`` turns vLLM's ``structured_outputs`` into ``(kind, canonical text, whitespace options)``:
schemas, choices and structural tags are re-serialized (key order kept: it is the order properties are
generated in) so equal requests share one compiled grammar. ``GrammarError`` names the request field
that holds the bad constraint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from slicelm.sampling_params import StructuredOutputsParams


class GrammarError(ValueError):
    """A schema, regex, grammar or tag that cannot be compiled; ``field`` names the request field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class GrammarSpec:
    kind: str  # json | json_object | regex | choice | grammar | structural_tag
    text: str  # the schema / regex / grammar; choices and tags as canonical JSON
    whitespace_flexible: bool = True
    whitespace_pattern: str | None = None

    @property
    def field(self) -> str:
        return f"structured_outputs.{self.kind}"


def _canonical(value: Any, field_name: str) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise GrammarError(field_name, f"is not valid JSON: {e}") from e
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise GrammarError(field_name, f"cannot be serialized as JSON: {e}") from e


def _closed_objects(schema: Any) -> Any:
    """``disable_additional_properties``: every object schema without ``additionalProperties`` gets ``false``."""
    if isinstance(schema, list):
        return [_closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed_objects(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def grammar_spec(params: StructuredOutputsParams) -> GrammarSpec:
    kind = params.kind
    field_name = f"structured_outputs.{kind}"
    value: Any = getattr(params, kind)
    if kind == "json":
        text = _canonical(value, field_name)
        schema = json.loads(text)
        if not isinstance(schema, dict | bool):
            raise GrammarError(field_name, "a JSON schema must be an object")
        if params.disable_additional_properties:
            text = json.dumps(_closed_objects(schema), ensure_ascii=False)
    elif kind == "json_object":
        text = '{"type": "object"}'
    elif kind in ("choice", "structural_tag"):
        text = _canonical(value, field_name)
    else:
        if not isinstance(value, str) or not value:
            raise GrammarError(field_name, "must be a non-empty string")
        text = value
    return GrammarSpec(kind, text, not params.disable_any_whitespace, params.whitespace_pattern)
