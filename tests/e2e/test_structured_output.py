"""Structured output and tool calling through `tandem serve` on the random-weight tiny llama,
with the official openai client and the public gRPC API: 50 random JSON Schemas (seeded) give
output that validates; json_object, guided_regex and guided_choice, streamed and not; a chat
with tools and tool_choice required or named gives a call whose arguments validate; what does
not compile on the tiers is a 400 naming the field (INVALID_ARGUMENT over gRPC)."""

from __future__ import annotations

import json
import random
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import openai
import pytest

from protos.tandem.v1 import common_pb2, generation_pb2
from tests.e2e.test_sampling_params import served  # noqa: F401 - fixtures

NUM_SCHEMAS = 50
MAX_TOKENS = 400  # every generated schema completes well within it
WORDS = ("alpha", "beta", "gamma", "delta", "omega", "red", "green", "blue", "x1", "y2")


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A JSON Schema whose every instance is short: nested objects (some properties required),
    arrays with maxItems, enums, strings with maxLength, bounded integers, booleans."""
    kinds = ["string", "integer", "boolean", "enum"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "object":
        names = rng.sample(WORDS, rng.randint(1, 4))
        required = [n for n in names if rng.random() < 0.6]
        return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
                "required": required, "additionalProperties": False}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1),
                "minItems": rng.randint(0, 1), "maxItems": rng.randint(1, 3)}
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(2, 8)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "enum":
        return {"enum": rng.sample(["on", "off", "auto", 1, 2, None, True], rng.randint(1, 4))}
    return {"type": "boolean"}


def top_schema(rng: random.Random) -> dict:
    schema = random_schema(rng, 1)
    properties = {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "value": schema}
    return {"type": "object", "properties": properties, "required": ["id", "value"]}


def structured_request(client, served, i: int, schema: dict):
    """Even i: chat with response_format json_schema; odd: completions with guided_json."""
    if i % 2:
        return client.completions.create(
            model=served.model_dir.name, prompt=f"Record {i}:", max_tokens=MAX_TOKENS, seed=i,
            extra_body={"guided_json": schema})
    return client.chat.completions.create(
        model=served.model_dir.name, messages=[{"role": "user", "content": f"Record {i}"}],
        max_tokens=MAX_TOKENS, seed=i,
        response_format={"type": "json_schema",
                         "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}})


def text_of(response) -> str:
    choice = response.choices[0]
    return choice.message.content if hasattr(choice, "message") else choice.text


def test_random_json_schemas_give_valid_json(served, client):
    rng = random.Random(8)
    schemas = [top_schema(rng) for _ in range(NUM_SCHEMAS)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda a: structured_request(client, served, *a),
                                  enumerate(schemas)))
    for schema, response in zip(schemas, responses):
        assert response.choices[0].finish_reason == "stop", text_of(response)
        jsonschema.validate(json.loads(text_of(response)), schema)


def complete(client, served, stream: bool, **extra) -> tuple[str, str]:
    """(text, finish_reason) of a seeded completion, streamed or not."""
    response = client.completions.create(model=served.model_dir.name, prompt="Hello",
                                         max_tokens=100, seed=3, stream=stream, extra_body=extra)
    if not stream:
        return response.choices[0].text, response.choices[0].finish_reason
    chunks = [c for c in response if c.choices]
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_regex_and_choice(served, client, stream):
    text, finish = complete(client, served, stream, response_format={"type": "json_object"})
    assert finish == "stop" and isinstance(json.loads(text), dict)
    regex = r"[a-z]{2,5}-[0-9]{2}( [A-Z]+)?"
    text, finish = complete(client, served, stream, guided_regex=regex)
    assert finish == "stop" and re.fullmatch(regex, text)
    choices = ["yes", "no", "maybe later"]
    text, finish = complete(client, served, stream, guided_choice=choices)
    assert finish == "stop" and text in choices


def test_grpc_structured_output(served, stub):
    sampling = common_pb2.SamplingParams(max_tokens=50, seed=1, structured_output=(
        common_pb2.StructuredOutput(choice=common_pb2.Choices(values=["left", "right"]))))
    request = generation_pb2.GenerateRequest(text="Go", sampling=sampling)
    responses = list(stub.Generate(request, timeout=60))
    assert "".join(r.text for r in responses) in ("left", "right")
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    sampling.structured_output.CopyFrom(common_pb2.StructuredOutput(regex="(unclosed"))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(generation_pb2.GenerateRequest(text="Go", sampling=sampling),
                           timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "regex does not compile" in info.value.details()


WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "minLength": 1, "maxLength": 12},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "unit"]}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}},
        "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


def check_calls(calls, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("choice, names", [
    ("required", {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})])
def test_a_required_or_named_tool_choice_gives_a_valid_call(served, client, choice, names):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    for seed in (0, 1):
        response = client.chat.completions.create(
            model=served.model_dir.name, messages=messages, tools=TOOLS, tool_choice=choice,
            max_tokens=200, seed=seed)
        assert response.choices[0].finish_reason == "tool_calls"
        message = response.choices[0].message
        assert message.content is None
        check_calls(message.tool_calls, names)
    stream = client.chat.completions.create(
        model=served.model_dir.name, messages=messages, tools=TOOLS, tool_choice=choice,
        max_tokens=200, seed=0, stream=True)
    chunks = [c for c in stream if c.choices]
    deltas = [call for c in chunks for call in c.choices[0].delta.tool_calls or []]
    assert [d.index for d in deltas] == [0] and chunks[-1].choices[0].finish_reason == "tool_calls"
    check_calls(deltas, names)
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)
    # the call goes back in the conversation, with the tool's answer
    call = message.tool_calls[0]
    history = messages + [
        {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    follow = client.chat.completions.create(model=served.model_dir.name, messages=history,
                                            tools=TOOLS, tool_choice="none", max_tokens=5)
    assert follow.choices[0].message.tool_calls is None


@pytest.mark.parametrize("extra, param", [
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "required": "name"}}}},
     "response_format.json_schema.schema"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_what_does_not_compile_is_a_400_naming_the_field(served, client, extra, param, stream):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=served.model_dir.name, stream=stream,
                                       messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=5, extra_body=extra)
    assert info.value.body["param"] == param


@pytest.mark.parametrize("stream", [False, True])
def test_every_branch_follows_the_grammar(served, client, stream):
    """n > 1 with a grammar: each branch has its own matcher (the grammar compiled once); with a
    seed the branches differ, and every one is a valid answer."""
    regex = r"[a-z]{3,6}( [a-z]{3,6}){1,3}"
    kwargs = dict(model=served.model_dir.name, prompt="Words:", max_tokens=60, n=4, seed=3,
                  extra_body={"guided_regex": regex})
    if stream:
        texts, finishes = {}, {}
        for chunk in client.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
                finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
        texts = [texts[i] for i in range(4)]
        assert [finishes[i] for i in range(4)] == ["stop"] * 4
    else:
        response = client.completions.create(**kwargs)
        assert [c.index for c in response.choices] == [0, 1, 2, 3]
        assert {c.finish_reason for c in response.choices} == {"stop"}
        texts = [c.text for c in response.choices]
    assert all(re.fullmatch(regex, t) for t in texts), texts
    assert len(set(texts)) > 1  # seed + i per branch


def test_each_branch_of_a_forced_tool_call_parses(served, client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    response = client.chat.completions.create(
        model=served.model_dir.name, messages=messages, tools=TOOLS, tool_choice="required",
        max_tokens=200, seed=5, n=2)
    assert [c.index for c in response.choices] == [0, 1]
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message.tool_calls, {"get_weather", "get_time"})
