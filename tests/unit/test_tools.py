"""Tool calling on the gateway (gateway/tools.py): Hermes <tool_call> parsing as pure functions
on crafted text, whole and streamed in pieces, and what tools / tool_choice set up."""

from __future__ import annotations

import json

import pytest

from gateway.errors import ApiError
from gateway.protocol import ChatCompletionRequest
from gateway.tools import ToolCallParser, parse_tool_calls, setup

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
TWO_CALLS = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
             '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": "{}"}\n</tool_call>')


def names_and_arguments(calls) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_calls_are_parsed_and_the_rest_is_content():
    content, calls = parse_tool_calls(TWO_CALLS)
    assert content == "Let me check."
    assert names_and_arguments(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2


@pytest.mark.parametrize("text", [
    "Just text, no call.",
    "<tool_call>\n{not json}\n</tool_call>",
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',  # arguments not an object
    "a <tool_ca",  # a partial tag at the end stays text
])
def test_text_without_a_parseable_call_stays_content(text):
    assert parse_tool_calls(text) == (text, [])


def test_only_calls_give_null_content_and_an_unclosed_last_call_parses():
    content, calls = parse_tool_calls('<tool_call>\n{"name": "get_time", "arguments": {}}')
    assert content is None and names_and_arguments(calls) == [("get_time", {})]


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_streaming_in_any_pieces_gives_the_same_content_and_calls(piece):
    parser = ToolCallParser()
    content, calls = "", []
    for start in range(0, len(TWO_CALLS), piece):
        shown, done = parser.feed(TWO_CALLS[start:start + piece])
        assert "<" not in shown  # nothing of a tag is ever shown
        content, calls = content + shown, calls + done
    rest, more = parser.finish()
    assert content + rest == "Let me check.\n\n" and not more
    assert [c["index"] for c in calls] == [0, 1]
    assert names_and_arguments(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {})]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], **fields})


def test_choices_set_up_rendering_parsing_and_the_forcing_grammar():
    assert setup(chat()) == setup(chat(tools=[], tool_choice="none"))
    assert setup(chat()).tools is None
    auto = setup(chat(tools=[WEATHER, TIME]))
    assert auto.tools == [WEATHER, TIME] and auto.parse and auto.forced is None
    none = setup(chat(tools=[WEATHER], tool_choice="none"))
    assert none.tools == [WEATHER] and not none.parse  # rendered, not parsed (as vLLM)
    required = setup(chat(tools=[WEATHER, TIME], tool_choice="required"))
    tag = json.loads(required.forced.output.structural_tag)["format"]
    assert (tag["begin"], tag["end"], required.forced.param) == ("<tool_call>\n", "\n</tool_call>",
                                                                 "tool_choice")
    calls = tag["content"]["json_schema"]["anyOf"]
    assert [c["properties"]["name"] for c in calls] == [{"const": "get_weather"},
                                                        {"const": "get_time"}]
    assert calls[0]["properties"]["arguments"] == WEATHER["function"]["parameters"]
    named = setup(chat(tools=[WEATHER, TIME], tool_choice={"type": "function",
                                                           "function": {"name": "get_time"}}))
    schema = json.loads(named.forced.output.structural_tag)["format"]["content"]["json_schema"]
    assert schema["properties"]["name"] == {"const": "get_time"}


@pytest.mark.parametrize("fields, param", [
    ({"tools": [WEATHER, {"type": "code_interpreter"}]}, "tools.1.type"),
    ({"tools": [{"type": "function", "function": {}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
     "tools.0.function.parameters"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_bad_tools_are_400s_naming_the_field(fields, param):
    with pytest.raises(ApiError) as info:
        setup(chat(**fields))
    assert (info.value.http_status, info.value.param) == (400, param)
