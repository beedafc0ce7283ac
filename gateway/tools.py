"""Tool calling for chat in the Hermes format (Qwen, Hermes, many others):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call. `tools` go to the chat template (it renders them, as HF's
apply_chat_template passes them); the output is parsed into OpenAI `tool_calls` (arguments as a
JSON string), `content` being the text outside the blocks. tool_choice:

    "none"       tools rendered, output not parsed (as vLLM)
    "auto"       parsed best effort: a block that does not parse stays plain content
    "required"   a grammar forces one call of one of the tools, arguments valid for its schema
    {"type": "function", "function": {"name": N}}   the same, for N only
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import invalid
from gateway.protocol import ChatCompletionRequest
from gateway.structured import Structured, check_schema
from protos.tandem.v1 import common_pb2

BEGIN, END = "<tool_call>", "</tool_call>"
_NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolSetup:
    """What a chat request's tools mean: the template's `tools` (None: none), whether the
    output is parsed into tool_calls, and the grammar a required / named choice forces."""

    tools: list[dict[str, Any]] | None = None
    parse: bool = False
    forced: Structured | None = None


def _check_tool(i: int, tool: Any) -> tuple[str, dict[str, Any]]:
    """A tool's function name and parameters schema; a 400 naming the field otherwise."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else tool
        raise invalid(f"tools.{i}.type must be \"function\", got {kind!r}", f"tools.{i}.type")
    function = tool.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise invalid(f"tools.{i}.function.name is required", f"tools.{i}.function.name")
    parameters = function.get("parameters")
    if parameters is None:
        return name, _NO_PARAMETERS
    param = f"tools.{i}.function.parameters"
    return name, json.loads(check_schema(parameters, param))


def _chosen(choice: Any, names: list[str]) -> list[str] | None:
    """The names a call must be of (None: no call is forced); a 400 naming tool_choice for an
    unknown value or name."""
    if choice in ("none", "auto"):
        return None
    if choice == "required":
        return names
    function = choice.get("function") if isinstance(choice, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function"
            and isinstance(function, dict) and isinstance(function.get("name"), str)):
        raise invalid("tool_choice must be \"none\", \"auto\", \"required\" or "
                      "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    if function["name"] not in names:
        raise invalid(f"tool_choice names the function {function['name']!r}, which is not in "
                      "tools", "tool_choice")
    return [function["name"]]


def setup(req: ChatCompletionRequest) -> ToolSetup:
    """Checks `tools` and `tool_choice` (400s naming the field) and says what they mean."""
    if req.tools is None or req.tools == []:
        if req.tool_choice not in (None, "none"):
            raise invalid("tool_choice needs tools", "tool_choice")
        return ToolSetup()
    schemas = dict(_check_tool(i, tool) for i, tool in enumerate(req.tools))
    choice = "auto" if req.tool_choice is None else req.tool_choice
    names = _chosen(choice, list(schemas))
    forced = None if names is None else Structured(
        common_pb2.StructuredOutput(structural_tag=json.dumps(_call_tag(names, schemas))),
        "tool_choice")
    return ToolSetup(list(req.tools), parse=choice != "none", forced=forced)


def _call_tag(names: list[str], schemas: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """An xgrammar structural tag: one Hermes block whose JSON is a call of one of `names`
    (at most one whitespace character in a row: a model could otherwise pad it forever)."""
    calls = [{"type": "object", "properties": {"name": {"const": name},
                                               "arguments": schemas[name]},
              "required": ["name", "arguments"], "additionalProperties": False}
             for name in names]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {"type": "structural_tag",
            "format": {"type": "tag", "begin": BEGIN + "\n",
                       "content": {"type": "json_schema", "json_schema": schema,
                                   "max_whitespace_cnt": 1},
                       "end": "\n" + END}}


def parse_call(body: str) -> dict[str, Any] | None:
    """One block's JSON as an OpenAI tool call (a fresh id, arguments as JSON text), or None
    when it is not {"name": str, "arguments": object or JSON text of one}."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"],
                         "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _partial_begin(text: str) -> int:
    """Length of the longest end of `text` that begins BEGIN (held back: a tag may follow)."""
    return next((n for n in range(min(len(text), len(BEGIN) - 1), 0, -1)
                 if BEGIN.startswith(text[-n:])), 0)


@dataclass
class ToolCallParser:
    """Splits streamed text into content and tool calls: `feed` returns the content that can
    be shown now (text that may start a tag is held back) and the calls completed by it;
    `finish` the rest. A block that does not parse is given back as content."""

    buffer: str = ""
    in_call: bool = False
    calls: list[dict[str, Any]] = field(default_factory=list)

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self.buffer += text
        content, done = [], []
        while True:
            if not self.in_call:
                start = self.buffer.find(BEGIN)
                if start < 0:
                    keep = _partial_begin(self.buffer)
                    content.append(self.buffer[:len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    break
                content.append(self.buffer[:start])
                self.buffer, self.in_call = self.buffer[start + len(BEGIN):], True
            else:
                end = self.buffer.find(END)
                if end < 0:
                    break
                body, self.buffer = self.buffer[:end], self.buffer[end + len(END):]
                self.in_call = False
                content.append(self._take(body, done))
        return "".join(content), done

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The text left at the end: an unclosed last block is parsed too."""
        rest, self.buffer = self.buffer, ""
        if not self.in_call:
            return rest, []
        self.in_call = False
        done: list[dict[str, Any]] = []
        return self._take(rest, done, closed=False), done

    def _take(self, body: str, done: list[dict[str, Any]], closed: bool = True) -> str:
        """Records the block's call (with its index), or gives the block back as content."""
        call = parse_call(body)
        if call is None:
            return BEGIN + body + (END if closed else "")
        done.append({"index": len(self.calls), **call})
        self.calls.append(call)
        return ""


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole output's content (None when only whitespace is left; trimmed when there are
    calls) and tool calls."""
    parser = ToolCallParser()
    content, _ = parser.feed(text)
    rest, _ = parser.finish()
    content += rest
    if parser.calls:
        content = content.strip()
    return (content if content.strip() else None), parser.calls
