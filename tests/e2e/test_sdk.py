"""The Python SDK (gateway/sdk, `tandem_client`) against a real `tandem serve --api-key ...`:
built from the source tree as pip builds it, imported without torch; sync and asyncio streams
equal to transformers' greedy output; n with a seed (different, reproducible choices), best_of,
prompt logprobs (equal to transformers' log-softmax) and structured output; deadlines, explicit
Abort (the usage so far in the exception's `partial`) and a stream dropped by its reader free
every KV block; UNAVAILABLE is retried before the first response (a client pointed
at a port where the gateway's proxy only starts listening once the first try failed) and never
after it (the connection cut mid-stream); auth and the typed errors."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from tests.e2e.conftest import ROOT, free_port
from tests.faults import FaultProxy
from tests.reference import hf_greedy, hf_logits

KEY = "tandem-sdk-key"
PROMPT = [11, 12, 13, 14, 15]
LONG = dict(max_tokens=1000, ignore_eos=True, temperature=0.0)  # ~2 s on a CPU (context 1024)


@pytest.fixture(scope="module")
def sdk_site(tmp_path_factory) -> Path:
    """The package installed by pip (no deps; offline where this environment's setuptools can
    build a wheel) from a copy of the source tree, so its build hook copies the repository's
    stubs as it does for `pip install ./gateway/sdk`."""
    tmp = tmp_path_factory.mktemp("sdk")
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "*_pb2*.py*")
    shutil.copytree(ROOT / "gateway" / "sdk", tmp / "repo" / "gateway" / "sdk", ignore=ignore)
    shutil.copytree(ROOT / "protos" / "tandem" / "v1", tmp / "repo" / "protos" / "tandem" / "v1")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp / "site"),
           str(tmp / "repo" / "gateway" / "sdk")]
    offline = subprocess.run(pip + ["--no-index", "--no-build-isolation"], capture_output=True)
    if offline.returncode != 0:  # no setuptools (with bdist_wheel) here: pip fetches one
        subprocess.run(pip, check=True, capture_output=True)
    return tmp / "site"


@pytest.fixture(scope="module")
def sdk(sdk_site):
    sys.path.insert(0, str(sdk_site))
    import tandem_client
    yield tandem_client
    sys.path.remove(str(sdk_site))


@pytest.fixture(scope="module")
def served(tiny_models, serve_model):
    return serve_model(tiny_models["llama"], "--api-key", KEY)


@pytest.fixture
def client(sdk, served):
    with sdk.Client(f"127.0.0.1:{served.grpc_port}", api_key=KEY, timeout_s=60) as client:
        yield client
    served.assert_all_blocks_free()


@pytest.fixture
def proxy(served):
    proxy = FaultProxy(f"127.0.0.1:{served.grpc_port}")
    yield proxy
    proxy.close()


def test_imports_without_torch_or_server_code(sdk_site):
    code = ("import sys, tandem_client; "
            "assert not {'torch', 'protos', 'engine', 'gateway'} & set(sys.modules), sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=sdk_site,
                   env={"PYTHONPATH": str(sdk_site), "PATH": "/usr/bin:/bin"})


def test_sampling_kwargs_map_onto_the_proto(sdk, client):
    with pytest.raises(TypeError, match="temprature"):
        client.generate_stream(PROMPT, temprature=0.5)
    with pytest.raises(TypeError, match="prompt"):
        client.generate_stream(3.5)
    from tandem_client._calls import sampling_params
    params = sampling_params(dict(stop="x", logit_bias={5: 1.5}, top_k=3, seed=None))
    assert list(params.stop) == ["x"] and dict(params.logit_bias) == {5: 1.5}
    assert params.top_k == 3 and params.max_tokens == 16 and not params.HasField("seed")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    params = sampling_params(dict(structured_output={"json_schema": schema}))
    assert json.loads(params.structured_output.json_schema) == schema
    params = sampling_params(dict(structured_output={"choice": ["yes", "no"]}))
    assert list(params.structured_output.choice.values) == ["yes", "no"]
    with pytest.raises(ValueError, match="regx"):
        client.generate_stream(PROMPT, structured_output={"regx": "a"})


def test_retry_policy_and_retry_after(sdk):
    policy = sdk.RetryPolicy(max_attempts=4, initial_backoff_s=0.1, max_backoff_s=0.3,
                             multiplier=2.0, jitter=0.2)
    for retry, step in enumerate([0.1, 0.2, 0.3, 0.3]):
        assert all(0.8 * step <= policy.backoff_s(retry) <= step for _ in range(50))
    unavailable = sdk.Unavailable(grpc.StatusCode.UNAVAILABLE, "down")
    assert policy.delay_s(0, unavailable, None) is not None
    assert policy.delay_s(3, unavailable, None) is None  # the 4th try was the last
    assert policy.delay_s(0, unavailable, 0.05) is None  # the deadline would pass first
    assert policy.delay_s(0, sdk.ServerError(grpc.StatusCode.INTERNAL, "bug"), None) is None
    with pytest.raises(ValueError):
        sdk.RetryPolicy(max_attempts=0)
    full = grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sdk.ResourceExhausted(full, "full", trailing_metadata=(("retry-after", "2"),)
                                 ).retry_after_s == 2.0
    assert sdk.ResourceExhausted(full, "full", trailing_metadata=(
        ("grpc-retry-pushback-ms", "1500"),)).retry_after_s == 1.5
    assert sdk.ResourceExhausted(full, "full").retry_after_s is None


# generation
def test_sync_stream_and_generate_match_transformers(sdk, served, client):
    expected = hf_greedy(served.model_dir, PROMPT, 9)
    chunks = list(client.generate_stream(PROMPT, max_tokens=9, temperature=0.0))
    assert [t for c in chunks for t in c.token_ids] == expected
    last = chunks[-1]
    assert last.finish_reason in (sdk.FinishReason.STOP, sdk.FinishReason.LENGTH)
    assert last.usage == sdk.Usage(prompt_tokens=5, completion_tokens=len(expected),
                                   cached_prompt_tokens=last.usage.cached_prompt_tokens)
    assert last.timings.transfer_bytes > 0 and last.timings.time_to_first_token_s > 0
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    completion = client.generate(PROMPT, max_tokens=9, temperature=0.0, request_id="sdk-one")
    assert list(completion.token_ids) == expected and completion.request_id == "sdk-one"
    assert completion.text == "".join(c.text for c in chunks) and completion.logprobs is None
    text = client.generate("hello world", max_tokens=4, temperature=0.0)
    assert text.usage.completion_tokens == len(text.token_ids) > 0
    info = client.model_info()
    assert info.name == served.model_dir.name and info.max_model_len > 0 and info.eos_token_ids


def test_logprobs_when_the_server_sends_them(sdk, served, client):
    from tandem_client._calls import SAMPLING_FIELDS
    if "logprobs" not in SAMPLING_FIELDS:
        pytest.skip("these stubs have no SamplingParams.logprobs")
    completion = client.generate(PROMPT, max_tokens=4, temperature=0.0, logprobs=2)
    ids = list(completion.token_ids)
    assert [lp.token_id for lp in completion.logprobs] == ids
    expected = torch.log_softmax(hf_logits(served.model_dir, PROMPT + ids), -1)[len(PROMPT) - 1:]
    for lp, row in zip(completion.logprobs, expected):
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
        assert len(lp.top_logprobs) == 2 and lp.top_logprobs[0].token_id == lp.token_id
    assert client.generate(PROMPT, max_tokens=2).logprobs is None


def test_n_with_a_seed_gives_different_reproducible_choices(sdk, client):
    sampling = dict(max_tokens=8, temperature=1.0, ignore_eos=True, seed=1234)
    completion = client.generate(PROMPT, n=3, **sampling)
    choices = completion.choices
    assert [c.index for c in choices] == [0, 1, 2]
    assert len({c.token_ids for c in choices}) == 3  # three different completions
    again = client.generate(PROMPT, n=3, **sampling).choices  # reproducible
    assert [(c.text, c.token_ids) for c in again] == [(c.text, c.token_ids) for c in choices]
    for choice in choices:  # branch i samples with seed + i: what n = 1 gives with that seed
        alone = client.generate(PROMPT, **{**sampling, "seed": 1234 + choice.index})
        assert alone.token_ids == choice.token_ids and alone.text == choice.text
        assert choice.finish_reason == sdk.FinishReason.LENGTH
        assert choice.usage.prompt_tokens == len(PROMPT) and choice.usage.completion_tokens == 8
    assert completion.usage.prompt_tokens == len(PROMPT)  # the prompt counted once
    assert completion.usage.completion_tokens == 3 * 8
    assert completion.token_ids == choices[0].token_ids
    chunks = list(client.generate_stream(PROMPT, n=3, **sampling))
    assert {c.index for c in chunks} == {0, 1, 2}
    streamed = sdk.Completion.from_chunks(chunks).choices
    assert [c.token_ids for c in streamed] == [c.token_ids for c in choices]


def test_best_of_returns_the_likeliest_branches(sdk, client):
    sampling = dict(max_tokens=6, temperature=1.0, seed=99, logprobs=0)
    branches = client.generate(PROMPT, n=3, **sampling).choices
    best = max(branches, key=lambda c: (sum(lp.logprob for lp in c.logprobs), -c.index))
    completion = client.generate(PROMPT, n=1, best_of=3, **sampling)
    assert len(completion.choices) == 1 and completion.choices[0].index == 0
    assert completion.token_ids == best.token_ids
    assert completion.usage.completion_tokens == sum(len(c.token_ids) for c in branches)
    unranked = client.generate(PROMPT, n=2, best_of=3, max_tokens=6, temperature=1.0, seed=99)
    assert [c.index for c in unranked.choices] == [0, 1] and unranked.logprobs is None
    with pytest.raises(sdk.InvalidRequest, match="best_of"):
        client.generate(PROMPT, n=3, best_of=2)


def test_prompt_logprobs(sdk, served, client):
    completion = client.generate(PROMPT, max_tokens=2, temperature=0.0, prompt_logprobs=2)
    prompt = completion.prompt_logprobs
    assert [lp.token_id for lp in prompt] == PROMPT[1:]
    expected = torch.log_softmax(hf_logits(served.model_dir, PROMPT), -1)
    for position, lp in enumerate(prompt):
        assert lp.logprob == pytest.approx(expected[position, lp.token_id].item(), abs=1e-4)
        top = expected[position].topk(2)
        assert [t.token_id for t in lp.top_logprobs] == top.indices.tolist()
        assert [t.logprob for t in lp.top_logprobs] == pytest.approx(top.values.tolist(),
                                                                     abs=1e-4)
    chunks = list(client.generate_stream(PROMPT, max_tokens=3, prompt_logprobs=0))
    assert [lp.token_id for lp in chunks[0].prompt_logprobs] == PROMPT[1:]
    assert all(c.prompt_logprobs is None for c in chunks[1:])
    assert completion.logprobs is None and client.generate(PROMPT).prompt_logprobs is None


def test_structured_output(sdk, client):
    words = client.generate("Hi", structured_output={"regex": "[a-z]+"}, max_tokens=8, seed=3)
    assert re.fullmatch("[a-z]+", words.text)
    picked = client.generate(PROMPT, structured_output={"choice": ["yes", "no"]}, max_tokens=8)
    assert picked.text in ("yes", "no") and picked.finish_reason == sdk.FinishReason.STOP
    schema = {"type": "object", "properties": {"c": {"enum": ["x", "y"]}}, "required": ["c"],
              "additionalProperties": False}
    done = client.generate(PROMPT, structured_output={"json_schema": schema}, max_tokens=32)
    assert json.loads(done.text)["c"] in ("x", "y")
    with pytest.raises(sdk.InvalidRequest, match="structured output"):
        client.generate(PROMPT, structured_output={"regex": "("})


def test_typed_errors_are_never_retried(sdk, served):
    retries = []
    with sdk.Client(f"127.0.0.1:{served.grpc_port}", api_key=KEY,
                    on_retry=lambda *r: retries.append(r)) as client:
        with pytest.raises(sdk.InvalidRequest) as info:
            client.generate(PROMPT, max_tokens=0)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.details
        assert info.value.request_id.startswith("sdk-")
        with pytest.raises(sdk.NotFound):
            client.generate(PROMPT, model="nope")
        assert not client.abort("no-such-request")
    assert retries == []


def test_auth(sdk, served):
    address = f"127.0.0.1:{served.grpc_port}"
    for api_key in (None, "wrong"):
        with sdk.Client(address, api_key=api_key) as client:
            with pytest.raises(sdk.Unauthenticated) as info:
                client.generate(PROMPT, max_tokens=2)
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(sdk.Unauthenticated):
                client.model_info()


# cancellation
def assert_usage_so_far(sdk, partial, num_branches: int) -> None:
    """`partial` (an exception's) has every branch, each ended by the server's ABORT message
    with its usage so far, and the request's usage counts the prompt once."""
    assert [c.index for c in partial.choices] == list(range(num_branches))
    for choice in partial.choices:
        assert choice.finish_reason == sdk.FinishReason.ABORT
        assert choice.usage.prompt_tokens == len(PROMPT)
        assert choice.usage.completion_tokens == len(choice.token_ids) < LONG["max_tokens"]
    assert partial.usage == sdk.Usage(
        prompt_tokens=len(PROMPT), cached_prompt_tokens=0,
        completion_tokens=sum(len(c.token_ids) for c in partial.choices))


def test_deadline_exceeded_frees_blocks_and_carries_the_usage(sdk, served, client):
    # ~3.5 s of decoding; the server sees the deadline 0.1 s before the client does and sends
    # each branch's last message (ABORT, usage so far), then DEADLINE_EXCEEDED
    with pytest.raises(sdk.DeadlineExceeded) as info:
        client.generate(PROMPT, n=2, seed=1, timeout_s=1.0, **LONG)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_usage_so_far(sdk, info.value.partial, 2)
    served.assert_all_blocks_free()


def test_explicit_abort_carries_the_usage_of_every_open_branch(sdk, served, client):
    stream = client.generate_stream(PROMPT, request_id="sdk-to-abort", n=2, seed=1, **LONG)
    received = [next(stream)]
    assert received[0].request_id == "sdk-to-abort"
    assert client.abort("sdk-to-abort")
    with pytest.raises(sdk.Cancelled) as info:
        for chunk in stream:
            received.append(chunk)
    assert not client.abort("sdk-to-abort")
    served.assert_all_blocks_free()
    # the usage arrives on the stream (one ABORT chunk per branch), then in the error
    lasts = {c.index: c for c in received if c.finish_reason is not None}
    assert sorted(lasts) == [0, 1]
    assert info.value.partial == sdk.Completion.from_chunks(received)
    assert_usage_so_far(sdk, info.value.partial, 2)
    assert [c.usage for c in info.value.partial.choices] == [lasts[0].usage, lasts[1].usage]


def test_leaving_the_stream_cancels_the_request(sdk, served, client):
    gc.disable()  # no reference cycle: the cancel happens at once, not at a collection
    try:
        for chunk in client.generate_stream(PROMPT, **LONG):
            break  # the stream's last reference is gone: its RPC is cancelled
        served.assert_all_blocks_free()
    finally:
        gc.enable()
    with client.generate_stream(PROMPT, **LONG) as stream:
        next(stream)
    served.assert_all_blocks_free()
    assert list(stream) == []  # a closed stream ends


# retries
def test_unavailable_is_retried_before_the_first_response(sdk, served):
    """Nothing listens on the client's port until its first try has failed; the retry then
    finds the gateway (through a proxy started on that port)."""
    port, retries, proxies = free_port(), [], []

    def on_retry(attempt, delay_s, error):
        retries.append((attempt, error))
        if not proxies:
            proxies.append(FaultProxy(f"127.0.0.1:{served.grpc_port}", listen_port=port))

    policy = sdk.RetryPolicy(max_attempts=10, initial_backoff_s=0.05, max_backoff_s=0.5)
    try:
        with sdk.Client(f"127.0.0.1:{port}", api_key=KEY, retry=policy,
                        on_retry=on_retry) as client:
            completion = client.generate(PROMPT, max_tokens=9, temperature=0.0)
    finally:
        for proxy in proxies:
            proxy.close()
    assert list(completion.token_ids) == hf_greedy(served.model_dir, PROMPT, 9)
    assert retries and all(isinstance(e, sdk.Unavailable) for _, e in retries)
    assert retries[0][0] == 0


def test_retries_give_up_after_max_attempts(sdk):
    retries = []
    policy = sdk.RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
    with sdk.Client(f"127.0.0.1:{free_port()}", retry=policy,
                    on_retry=lambda a, d, e: retries.append(a)) as client:
        with pytest.raises(sdk.Unavailable):
            client.generate(PROMPT)
        with pytest.raises(sdk.Unavailable):
            client.model_info()
    assert retries == [0, 1, 0, 1]


def test_no_retry_after_the_first_response(sdk, served, proxy):
    retries = []
    with sdk.Client(proxy.address, api_key=KEY, on_retry=lambda *r: retries.append(r)) as client:
        stream = client.generate_stream(PROMPT, **LONG)
        next(stream)
        proxy.cut()
        with pytest.raises(sdk.Unavailable):
            list(stream)
    assert retries == [] and proxy.num_connections == 1
    served.assert_all_blocks_free()


# asyncio
def test_async_client(sdk, served, client):
    expected = hf_greedy(served.model_dir, PROMPT, 9)
    n_sampling = dict(max_tokens=4, temperature=1.0, seed=5)
    sync_two = client.generate(PROMPT, n=2, **n_sampling)

    async def main() -> None:
        async with sdk.AsyncClient(f"127.0.0.1:{served.grpc_port}", api_key=KEY) as client:
            stream = client.generate_stream(PROMPT, max_tokens=9, temperature=0.0)
            chunks = [chunk async for chunk in stream]
            assert [t for c in chunks for t in c.token_ids] == expected
            assert chunks[-1].usage.completion_tokens == len(expected)
            completion = await client.generate(PROMPT, max_tokens=9, temperature=0.0)
            assert list(completion.token_ids) == expected
            two = await client.generate(PROMPT, n=2, **n_sampling)
            assert [c.token_ids for c in two.choices] == [c.token_ids for c in sync_two.choices]
            assert (await client.model_info()).name == served.model_dir.name
            await cancelled_task(client)
            await aborted(client)
        async with sdk.AsyncClient(f"127.0.0.1:{served.grpc_port}") as anonymous:
            with pytest.raises(sdk.Unauthenticated):
                await anonymous.generate(PROMPT)

    async def cancelled_task(client) -> None:
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in client.generate_stream(PROMPT, **LONG):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(served.assert_all_blocks_free)

    async def aborted(client) -> None:
        async with client.generate_stream(PROMPT, request_id="sdk-async-abort", **LONG) as stream:
            await anext(stream)
            assert await client.abort("sdk-async-abort")
            with pytest.raises(sdk.Cancelled) as info:
                async for _ in stream:
                    pass
            assert_usage_so_far(sdk, info.value.partial, 1)

    asyncio.run(main())
    served.assert_all_blocks_free()
