"""The request surface of structured outputs, as vLLM serves it.

``structured_outputs: {json | regex | choice | grammar | json_object | structural_tag, disable_any_whitespace,
disable_additional_properties, whitespace_pattern}``; the older ``guided_json`` / ``guided_regex`` /
``guided_choice`` / ``guided_grammar`` (+ ``guided_whitespace_pattern``) as aliases; ``response_format``
``{type: text | json_object | json_schema | structural_tag}``; the legacy ``guided_decoding_backend`` when it names
the server's backend (otherwise a 400, as vLLM's V1 engine answers). The constraint is checked here, without the
vocabulary (llguidance parses schemas, regexes and grammars on their own), so a bad one is a 400 naming the
request field before anything reaches the engine core.
"""

from __future__ import annotations

import json
from typing import Any

from slicelm.engine.structured_output.guidance import to_llguidance
from slicelm.engine.structured_output.spec import GrammarError, grammar_spec
from slicelm.entrypoints.server.errors import bad_request
from slicelm.entrypoints.server.protocol import SamplingFields
from slicelm.sampling_params import SamplingParamsError, StructuredOutputsParams

_ALIASES = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _from_structured_outputs(value: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    unknown = sorted(set(value) - set(StructuredOutputsParams.__dataclass_fields__))
    if unknown:
        raise bad_request(f"structured_outputs.{unknown[0]}: unknown field", param=f"structured_outputs.{unknown[0]}")
    return dict(value), {k: f"structured_outputs.{k}" for k in value}


def _from_response_format(req: SamplingFields) -> tuple[dict[str, Any], dict[str, str]] | None:
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    extra = rf.model_extra or {}
    if rf.type == "json_object":
        return {"json_object": True}, {"json_object": "response_format"}
    if rf.type == "json_schema":
        js = extra.get("json_schema")
        if not isinstance(js, dict) or ("schema" not in js and "json_schema" not in js):
            raise bad_request("response_format.json_schema: type 'json_schema' needs json_schema.schema",
                              param="response_format.json_schema")
        schema = js.get("schema", js.get("json_schema"))
        return {"json": schema}, {"json": "response_format.json_schema.schema"}
    tag = {k: v for k, v in extra.items() if k in ("structures", "triggers")}
    return {"structural_tag": json.dumps(tag)}, {"structural_tag": "response_format"}


def check_backend_field(req: SamplingFields, backend: str) -> None:
    """vLLM's legacy ``guided_decoding_backend`` (options after ``:``): the V1 engine refuses a backend other than
    the one the server was started with, since the backend is chosen per engine, not per request."""
    asked = req.guided_decoding_backend
    if asked is not None and asked.split(":", 1)[0] != backend:
        raise bad_request(f"guided_decoding_backend: request-level structured output backend selection is not "
                          f"supported; the request asks for {asked!r} but the server was started with {backend!r} "
                          "(--structured-outputs-config); remove the field from the request",
                          param="guided_decoding_backend")


def request_structured_outputs(req: SamplingFields, backend: str) -> StructuredOutputsParams | None:
    """The request's constraint, validated (400 naming the field), or None. ``backend``: the server's
    (``--structured-outputs-config``), which ``guided_decoding_backend`` must name if it is given."""
    check_backend_field(req, backend)
    sources = []
    if req.structured_outputs:
        sources.append(_from_structured_outputs(req.structured_outputs))
    guided = {kind: getattr(req, alias) for alias, kind in _ALIASES.items() if getattr(req, alias) is not None}
    if guided:
        if req.guided_whitespace_pattern is not None:
            guided["whitespace_pattern"] = req.guided_whitespace_pattern
        sources.append((guided, {k: a for a, k in _ALIASES.items()}))
    if (rf := _from_response_format(req)) is not None:
        sources.append(rf)
    if not sources:
        return None
    if len(sources) > 1:
        raise bad_request("structured_outputs: give one of structured_outputs, guided_* or response_format",
                          param="structured_outputs")
    fields, names = sources[0]
    try:
        params = StructuredOutputsParams(**fields)
        to_llguidance(grammar_spec(params))
    except GrammarError as e:
        kind = e.field.rsplit(".", 1)[-1]
        field = names.get(kind, e.field)
        raise bad_request(f"{field}: {str(e).split(': ', 1)[-1]}", param=field) from e
    except SamplingParamsError as e:
        field = names.get(e.field.rsplit(".", 1)[-1], e.field)
        raise bad_request(f"{field}: {str(e).split(': ', 1)[-1]}", param=field) from e
    except TypeError as e:
        raise bad_request(f"structured_outputs: {e}", param="structured_outputs") from e
    return params
