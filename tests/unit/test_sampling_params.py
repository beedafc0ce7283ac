"""The logits-processor sampling fields: ranges (an InvalidRequestError naming the field), the
protobuf round trip, and the gateway's conversion and 400s for HTTP and gRPC requests."""

from __future__ import annotations

import grpc
import pytest

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from gateway import convert
from gateway.errors import ApiError
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from protos.tandem.v1 import common_pb2

SPEC = convert.ModelSpec("tiny", max_model_len=64, vocab_size=2048, eos_token_ids=(2,),
                         architecture="LlamaForCausalLM")
NAN = float("nan")

OUT_OF_RANGE = [("presence_penalty", 2.5), ("presence_penalty", -2.01), ("presence_penalty", NAN),
                ("frequency_penalty", 3.0), ("frequency_penalty", -7.0),
                ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
                ("repetition_penalty", float("inf")), ("min_p", -0.1), ("min_p", 1.5),
                ("min_p", NAN), ("logit_bias", ((5, 100.5),)), ("logit_bias", ((5, -101.0),)),
                ("logit_bias", ((-1, 1.0),)),
                ("logit_bias", tuple((i, 1.0) for i in range(301)))]


@pytest.mark.parametrize("field,value", OUT_OF_RANGE)
def test_out_of_range_is_an_invalid_request_naming_the_field(field, value):
    with pytest.raises(InvalidRequestError, match=field) as info:
        SamplingParams(max_tokens=4, **{field: value}).validate()
    assert info.value.param == field


def test_limits_are_inclusive():
    SamplingParams(max_tokens=4, presence_penalty=-2.0, frequency_penalty=2.0, min_p=1.0,
                   repetition_penalty=1e-3,
                   logit_bias=tuple((i, 100.0 if i % 2 else -100.0) for i in range(300))).validate()


def test_protobuf_round_trip_and_defaults_left_unset():
    params = SamplingParams(max_tokens=8, presence_penalty=0.5, frequency_penalty=-1.25,
                            repetition_penalty=1.5, min_p=0.25,
                            logit_bias=((3, -100.0), (17, 2.5)), min_tokens=2)
    pb = params.to_pb()
    assert dict(pb.logit_bias) == {3: -100.0, 17: 2.5}
    assert SamplingParams.from_pb(pb) == params
    plain = SamplingParams(max_tokens=8).to_pb()
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
        assert not plain.HasField(name), name
    assert not plain.logit_bias
    assert SamplingParams.from_pb(common_pb2.SamplingParams(max_tokens=2)) == SamplingParams(2)
    assert not SamplingParams(2).has_penalties
    assert SamplingParams(2, repetition_penalty=1.1).has_penalties


@pytest.mark.parametrize("skip,include", [(False, True), (True, False), (False, False)])
def test_output_text_flags_round_trip_with_vllm_defaults(skip, include):
    params = SamplingParams(4, skip_special_tokens=skip, include_stop_str_in_output=include)
    pb = params.to_pb()
    assert pb.HasField("skip_special_tokens") == (not skip)
    assert pb.include_stop_str_in_output == include
    assert SamplingParams.from_pb(pb) == params
    default = SamplingParams.from_pb(common_pb2.SamplingParams(max_tokens=2))
    assert default.skip_special_tokens and not default.include_stop_str_in_output


def test_the_tiers_refuse_out_of_range_messages():
    pb = common_pb2.SamplingParams(max_tokens=4, presence_penalty=5.0)
    with pytest.raises(InvalidRequestError, match="presence_penalty must be in"):
        SamplingParams.from_pb(pb)


# the gateway
def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": [5, 6, 7], "max_tokens": 4, **fields})


def test_http_fields_reach_the_message():
    req = completion(presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.2,
                     min_p=0.1, logit_bias={"17": 100, "3": -5.5})
    sp = convert.sampling_from_request(req, 3, SPEC)
    assert sp.presence_penalty == 0.5 and sp.frequency_penalty == -1.0
    assert sp.repetition_penalty == pytest.approx(1.2) and sp.min_p == pytest.approx(0.1)
    assert dict(sp.logit_bias) == {17: 100.0, 3: -5.5}
    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                                 "logit_bias": {"9": 1}, "min_p": 0.5})
    sp = convert.sampling_from_request(chat, 3, SPEC)
    assert dict(sp.logit_bias) == {9: 1.0} and sp.min_p == 0.5
    plain = convert.sampling_from_request(completion(), 3, SPEC)
    assert not plain.HasField("repetition_penalty") and not plain.logit_bias


@pytest.mark.parametrize("fields,param", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_p": 1.01}, "min_p"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"2048": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"), ({"logit_bias": {"five": 1}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias")])
def test_http_out_of_range_is_400_naming_the_param(fields, param):
    with pytest.raises(ApiError) as info:
        convert.sampling_from_request(completion(**fields), 3, SPEC)
    err = info.value
    assert (err.http_status, err.param, err.code) == (400, param, None)
    assert param in err.message or "out of range [0, 2048)" in err.message


@pytest.mark.parametrize("fields,param", [
    ({"presence_penalty": 2.5}, "sampling.presence_penalty"),
    ({"repetition_penalty": -1}, "sampling.repetition_penalty"),
    ({"min_p": 2.0}, "sampling.min_p"), ({"logit_bias": {5: 500}}, "sampling.logit_bias"),
    ({"logit_bias": {4096: 1}}, "sampling.logit_bias"),
    ({"logit_bias": {-3: 1}}, "sampling.logit_bias")])
def test_grpc_out_of_range_is_invalid_argument_naming_the_field(fields, param):
    sp = common_pb2.SamplingParams(max_tokens=4, **fields)
    with pytest.raises(ApiError) as info:
        convert.check_sampling_pb(sp, 3, SPEC)
    assert (info.value.grpc_code, info.value.param) == (grpc.StatusCode.INVALID_ARGUMENT, param)


def test_grpc_fields_pass_through():
    sp = common_pb2.SamplingParams(max_tokens=4, presence_penalty=1.0, repetition_penalty=1.3,
                                   min_p=0.2, logit_bias={7: 50.0}, stop=["", "x"])
    clean = convert.check_sampling_pb(sp, 3, SPEC)
    assert dict(clean.logit_bias) == {7: 50.0} and list(clean.stop) == ["x"]
    assert clean.repetition_penalty == pytest.approx(1.3) and clean.min_p == pytest.approx(0.2)


def test_only_what_is_still_unsupported_is_refused():
    convert.check_supported(completion(presence_penalty=1, frequency_penalty=1, min_p=0.5,
                                       repetition_penalty=2, logit_bias={"1": 3}))
    with pytest.raises(ApiError) as info:
        convert.check_supported(completion(suffix="!"))
    assert info.value.code == "unsupported_parameter"


def test_prompt_logprobs_round_trip_and_bound():
    params = SamplingParams(max_tokens=2, prompt_logprobs=0)
    assert SamplingParams.from_pb(params.to_pb()) == params
    assert not SamplingParams(2).to_pb().HasField("prompt_logprobs")
    with pytest.raises(InvalidRequestError, match="prompt_logprobs must be in"):
        SamplingParams(max_tokens=2, prompt_logprobs=21).validate()
    top20 = SamplingParams(max_tokens=2, prompt_logprobs=20)
    top20.check_prompt_logprobs(62_000)  # 62,000 x (21 + 180) bytes < 12 MiB
    with pytest.raises(InvalidRequestError, match="would not fit one message") as info:
        top20.check_prompt_logprobs(63_000)
    assert info.value.param == "prompt_logprobs"
    SamplingParams(max_tokens=2).check_prompt_logprobs(10**9)  # none asked: no bound


def test_echo_and_prompt_logprobs_reach_the_message():
    """With echo, `logprobs` asks for the prompt's too (the larger count when both are set);
    echo with max_tokens 0 generates one token (left out of the answer)."""
    sp = convert.sampling_from_request(completion(echo=True, logprobs=2, max_tokens=0), 3, SPEC)
    assert (sp.max_tokens, sp.logprobs, sp.prompt_logprobs) == (1, 2, 2)
    sp = convert.sampling_from_request(completion(echo=True, logprobs=2, prompt_logprobs=5), 3,
                                       SPEC)
    assert (sp.logprobs, sp.prompt_logprobs) == (2, 5)
    sp = convert.sampling_from_request(completion(logprobs=2, max_tokens=4), 3, SPEC)
    assert not sp.HasField("prompt_logprobs")
    with pytest.raises(ApiError) as info:
        convert.sampling_from_request(completion(prompt_logprobs=-1), 3, SPEC)
    assert info.value.param == "prompt_logprobs"
@pytest.mark.parametrize("output", [
    common_pb2.StructuredOutput(json_schema='{"type": "object"}'),
    common_pb2.StructuredOutput(json_object=True), common_pb2.StructuredOutput(regex="a+"),
    common_pb2.StructuredOutput(choice=common_pb2.Choices(values=["é", "b"])),
    common_pb2.StructuredOutput(grammar='root ::= "a"'),
    common_pb2.StructuredOutput(structural_tag='{"type": "structural_tag"}')])
def test_structured_output_round_trip(output):
    pb = common_pb2.SamplingParams(max_tokens=4, structured_output=output)
    params = SamplingParams.from_pb(pb)
    assert params.structured_output.kind == output.WhichOneof("kind")
    assert params.to_pb().structured_output == output
    assert SamplingParams.from_pb(params.to_pb()) == params


@pytest.mark.parametrize("output, param", [
    (common_pb2.StructuredOutput(json_schema="{"), "sampling.structured_output.json_schema"),
    (common_pb2.StructuredOutput(json_schema="[1]"), "sampling.structured_output.json_schema"),
    (common_pb2.StructuredOutput(json_schema='{"type": 1}'),
     "sampling.structured_output.json_schema"),
    (common_pb2.StructuredOutput(regex=""), "sampling.structured_output.regex"),
    (common_pb2.StructuredOutput(choice=common_pb2.Choices(values=["a", ""])),
     "sampling.structured_output.choice")])
def test_a_bad_grpc_structured_output_is_invalid_naming_it(output, param):
    sp = common_pb2.SamplingParams(max_tokens=4, structured_output=output)
    with pytest.raises(ApiError) as info:
        convert.check_sampling_pb(sp, 3, SPEC)
    assert (info.value.grpc_code, info.value.param) == (grpc.StatusCode.INVALID_ARGUMENT, param)
    unset = common_pb2.SamplingParams(max_tokens=4, structured_output=common_pb2.StructuredOutput(
        json_object=False))
    assert SamplingParams.from_pb(convert.check_sampling_pb(unset, 3, SPEC)).structured_output \
        is None
