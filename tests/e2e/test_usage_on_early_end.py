"""Usage on the last message of a stream the server ends early, through a real `tandem serve`
whose decode steps are slowed (tests/e2e/slow_tiers) and whose gateway has a 3 s
--request-timeout: the public Abort, the gateway's own deadline and a caller's gRPC deadline
each give a last message with finish_reason ABORT and the usage so far (the tokens the client
received) before the status; over HTTP with stream_options.include_usage, the usage chunk comes
before the error frame. Every block is free afterwards."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import openai
import pytest

from protos.tandem.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.e2e.conftest import start_serve, stop_serve, wait_for

REQUEST_TIMEOUT_S = 3.0
PROMPT = [5, 6, 7, 8]
# 0.05 s a decode step: 300 tokens would take 15 s, so only the deadline or Abort ends them
SAMPLING = dict(max_tokens=300, ignore_eos=True, temperature=0.0)


@pytest.fixture(scope="module")
def served(tiny_models):
    env = {"PYTHONPATH": str(Path(__file__).parent / "slow_tiers"),
           "TANDEM_TEST_SLOW": "decode_step=0.05"}
    served = start_serve(tiny_models["llama"], "--request-timeout", str(REQUEST_TIMEOUT_S),
                         env=env)
    yield served
    assert stop_serve(served) == 0, "".join(served.output[-40:])


@pytest.fixture
def stub(served):
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        yield generation_pb2_grpc.GenerationStub(channel)
    served.assert_all_blocks_free()


def read_until_error(call) -> tuple[list[generation_pb2.GenerateResponse], grpc.RpcError]:
    responses = []
    with pytest.raises(grpc.RpcError) as info:
        for response in call:
            responses.append(response)
    return responses, info.value


def check_last_carries_usage(responses: list[generation_pb2.GenerateResponse]) -> None:
    *streamed, last = responses
    assert last.finish_reason == common_pb2.FINISH_REASON_ABORT and not last.token_ids
    assert last.usage.prompt_tokens == len(PROMPT)
    assert last.usage.completion_tokens == sum(len(r.token_ids) for r in streamed)
    assert all(r.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for r in streamed)


def generate(stub, request_id: str, timeout: float | None = None):
    request = generation_pb2.GenerateRequest(
        request_id=request_id, token_ids=generation_pb2.TokenIds(ids=PROMPT),
        sampling=common_pb2.SamplingParams(**SAMPLING))
    return stub.Generate(request, timeout=timeout)


def test_abort_ends_the_stream_with_the_usage_then_cancelled(stub):
    call = generate(stub, "to-abort")
    first = next(call)
    assert first.token_ids
    assert stub.Abort(generation_pb2.AbortRequest(request_id="to-abort"), timeout=10).aborted
    responses, error = read_until_error(call)
    assert error.code() == grpc.StatusCode.CANCELLED
    check_last_carries_usage([first, *responses])


def test_the_gateways_deadline_ends_the_stream_with_the_usage(stub):
    responses, error = read_until_error(generate(stub, "server-deadline"))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(responses) > 1  # tokens were streamed before the deadline
    check_last_carries_usage(responses)


def test_a_callers_deadline_ends_the_stream_with_the_usage_first(stub):
    """The tiers get the caller's deadline less a margin (10% of 2 s here), so the gateway sees
    it pass first and sends the usage before the caller's own deadline."""
    responses, error = read_until_error(generate(stub, "caller-deadline", timeout=2.0))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    check_last_carries_usage(responses)


def test_http_include_usage_gets_the_usage_before_the_error(served):
    client = openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=60)
    stream = client.completions.create(model=served.model_dir.name, prompt=PROMPT, stream=True,
                                       stream_options={"include_usage": True}, logprobs=0,
                                       extra_body={"ignore_eos": True}, max_tokens=300,
                                       temperature=0)
    chunks = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            chunks.append(chunk)
    *streamed, last = chunks
    assert last.choices == [] and last.usage.prompt_tokens == len(PROMPT)
    assert last.usage.completion_tokens == sum(len(c.choices[0].logprobs.tokens)
                                               for c in streamed if c.choices[0].logprobs)
    assert last.usage.completion_tokens > 0
    served.assert_all_blocks_free()


def test_a_cancelled_call_leaves_nothing_held(served, stub):
    """A caller that cancels its own call can receive nothing more; the request still ends."""
    call = generate(stub, "cancelled-by-caller")
    next(call)
    threading.Thread(target=call.cancel).start()
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    wait_for(lambda: not any(i.num_running_requests for i in served.instance_infos()),
             "the request to end on every tier", timeout=10)
