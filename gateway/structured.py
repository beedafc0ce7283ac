"""Structured output on the gateway: OpenAI's `response_format` and vLLM's `guided_*` fields as a
common_pb2.StructuredOutput, checked as far as is cheap here (JSON, the JSON Schema's shape
with `jsonschema`, choices). The tiers compile it with xgrammar (which imports torch, so never
here); a spec that does not compile comes back INVALID_ARGUMENT with STRUCTURED_ERROR_PREFIX,
and the gateway names the request field that carried it (`RequestStream.structured_param`).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import jsonschema

from gateway.errors import invalid
from gateway.protocol import SamplingRequest
from protos.tandem.v1 import common_pb2


class Structured(NamedTuple):
    """A request's grammar and the field that set it (named by a 400 about it)."""

    output: common_pb2.StructuredOutput
    param: str


def check_schema(schema: Any, param: str) -> str:
    """A JSON Schema (a dict, or JSON text of one) as JSON text; a 400 naming `param` when it is
    not JSON, not an object, or not a valid schema (its meta-schema)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise invalid(f"{param} is not valid JSON: {e}", param) from e
    if not isinstance(schema, dict):
        raise invalid(f"{param} must be a JSON Schema object", param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise invalid(f"{param} is not a valid JSON Schema: {e.message}", param) from e
    return json.dumps(schema, ensure_ascii=False)


def _response_format(value: dict[str, Any]) -> Structured | None:
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Structured(common_pb2.StructuredOutput(json_object=True), "response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise invalid("response_format.json_schema must be an object with a `schema`",
                          "response_format.json_schema")
        param = "response_format.json_schema.schema"
        schema = check_schema(spec.get("schema", {"type": "object"}), param)
        return Structured(common_pb2.StructuredOutput(json_schema=schema), param)
    raise invalid(f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                  "response_format.type")


def _guided(req: SamplingRequest) -> list[Structured]:
    """vLLM's guided_* fields that are set."""
    found = []
    if req.guided_json is not None:
        schema = check_schema(req.guided_json, "guided_json")
        found.append(Structured(common_pb2.StructuredOutput(json_schema=schema), "guided_json"))
    if req.guided_regex is not None:
        if not req.guided_regex:
            raise invalid("guided_regex is empty", "guided_regex")
        found.append(Structured(common_pb2.StructuredOutput(regex=req.guided_regex),
                                "guided_regex"))
    if req.guided_choice is not None:
        if not req.guided_choice or not all(req.guided_choice):
            raise invalid("guided_choice needs at least one string, none empty", "guided_choice")
        choices = common_pb2.Choices(values=req.guided_choice)
        found.append(Structured(common_pb2.StructuredOutput(choice=choices), "guided_choice"))
    if req.guided_grammar is not None:
        if not req.guided_grammar.strip():
            raise invalid("guided_grammar is empty", "guided_grammar")
        found.append(Structured(common_pb2.StructuredOutput(grammar=req.guided_grammar),
                                "guided_grammar"))
    return found


def from_request(req: SamplingRequest, forced: Structured | None = None) -> Structured | None:
    """The request's grammar: response_format, a guided_* field or `forced` (a tool call the
    tool_choice requires), at most one of them (a 400 naming the second otherwise)."""
    found = [] if req.response_format is None else [_response_format(req.response_format)]
    found = [s for s in [*found, *_guided(req), forced] if s is not None]
    if len(found) > 1:
        raise invalid(f"{found[0].param} and {found[1].param} both constrain the output; "
                      "set one", found[1].param)
    return found[0] if found else None


def check_pb(output: common_pb2.StructuredOutput, param: str) -> None:
    """The gRPC API's StructuredOutput: a json_schema must be a valid JSON Schema."""
    if output.WhichOneof("kind") == "json_schema":
        check_schema(output.json_schema, f"{param}.json_schema")
