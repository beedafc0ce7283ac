"""What the sync and asyncio clients share: request building, call settings (metadata,
deadline, retry decisions), channel options, the tries of one call (Attempts) and the client's
constructor (ClientBase)."""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import grpc

from tandem_client._pb import common_pb2, generation_pb2, generation_pb2_grpc
from tandem_client.errors import TandemError, error_from_rpc
from tandem_client.retry import Deadline, RetryPolicy
from tandem_client.types import Completion, GenerateChunk

# the server's gRPC message limit (engine/grpc_server.py MAX_MESSAGE_BYTES)
MAX_MESSAGE_BYTES = 16 * 2**20
DEFAULT_MAX_TOKENS = 16
SAMPLING_FIELDS = frozenset(common_pb2.SamplingParams.DESCRIPTOR.fields_by_name)

# on_retry(attempt, delay_s, error): try number `attempt` (0-based) failed, retrying in delay_s
OnRetry = Callable[[int, float, TandemError], None]
Prompt = str | Sequence[int]


def structured_output(value: Any) -> Any:
    """StructuredOutput from a dict naming one of its kinds (`{"regex": "[a-z]+"}`,
    `{"json_object": True}`, ...), where `json_schema` and `structural_tag` may also be a dict
    (sent as its JSON text) and `choice` a list of strings; anything else (a StructuredOutput
    message) as it is. An unknown kind raises ValueError (protobuf's)."""
    if not isinstance(value, dict):
        return value
    value = dict(value)
    for kind in ("json_schema", "structural_tag"):
        if isinstance(value.get(kind), (dict, list)):
            value[kind] = json.dumps(value[kind])
    if isinstance(value.get("choice"), (list, tuple)):
        value["choice"] = {"values": list(value["choice"])}
    return common_pb2.StructuredOutput(**value)


def sampling_params(sampling: dict[str, Any]) -> common_pb2.SamplingParams:
    """SamplingParams from keyword arguments named as its fields (max_tokens defaults to 16;
    `stop` may be one string; `structured_output` a dict, see structured_output()). Unknown
    names raise TypeError."""
    unknown = sorted(set(sampling) - SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {unknown}; "
                        f"known: {sorted(SAMPLING_FIELDS)}")
    sampling = {"max_tokens": DEFAULT_MAX_TOKENS, **sampling}
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = [sampling["stop"]]
    if sampling.get("structured_output") is not None:
        sampling["structured_output"] = structured_output(sampling["structured_output"])
    return common_pb2.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})


@dataclass(frozen=True, slots=True)
class Branches:
    """How many completions a Generate call asks for: `n` returned, of `best_of` generated
    (None: n). The server checks the ranges (n in [1, 16], n <= best_of <= 16)."""

    n: int = 1
    best_of: int | None = None


def generate_request(prompt: Prompt, model: str, request_id: str | None,
                     sampling: dict[str, Any],
                     branches: Branches = Branches()) -> generation_pb2.GenerateRequest:
    """The GenerateRequest for a text prompt (str) or a token-id prompt (a sequence of ints),
    with a fresh `sdk-...` request id unless one is given."""
    request = generation_pb2.GenerateRequest(request_id=request_id or f"sdk-{uuid.uuid4().hex}",
                                             model=model, sampling=sampling_params(sampling),
                                             n=branches.n, best_of=branches.best_of or 0)
    if isinstance(prompt, str):
        request.text = prompt
    elif isinstance(prompt, Sequence) and all(isinstance(i, int) for i in prompt):
        request.token_ids.ids.extend(prompt)
    else:
        raise TypeError("prompt must be a str or a sequence of token ids, "
                        f"not {type(prompt).__name__}")
    return request


def channel_options(retry: RetryPolicy, extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The server's message limits, and reconnect backoff no slower than the retry policy, so a
    retry after a refused connection finds the channel trying again."""
    return [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", int(retry.initial_backoff_s * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(retry.initial_backoff_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(retry.max_backoff_s * 1000)), *extra]


@dataclass(frozen=True, slots=True)
class CallSettings:
    """Per-client settings every call uses."""

    metadata: tuple[tuple[str, str], ...]
    timeout_s: float | None
    retry: RetryPolicy
    on_retry: OnRetry | None

    @classmethod
    def build(cls, api_key: str | None, metadata: Sequence[tuple[str, str]],
              timeout_s: float | None, retry: RetryPolicy | None,
              on_retry: OnRetry | None) -> CallSettings:
        auth = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        return cls(auth + tuple(metadata), timeout_s, retry or RetryPolicy(), on_retry)

    def deadline(self, timeout_s: float | None) -> Deadline:
        """The deadline of one call: `timeout_s` when given, else the client's."""
        return Deadline(self.timeout_s if timeout_s is None else timeout_s)

    def retry_delay(self, attempt: int, error: TandemError, deadline: Deadline) -> float | None:
        """The wait before retrying (after telling on_retry), or None when `error` is final."""
        delay = self.retry.delay_s(attempt, error, deadline.remaining_s())
        if delay is not None and self.on_retry is not None:
            self.on_retry(attempt, delay, error)
        return delay


class Attempts:
    """One call's state across its tries (a Generate stream's, or a unary call's), shared by a
    stream and its chunk generator. The generator holds this, never the stream, so dropping the
    stream's last reference closes it at once (no reference cycle waiting for the garbage
    collector). `lock` orders begin() and cancel(), which any thread may call."""

    def __init__(self, start: Callable[[float | None], Any], request_id: str,
                 settings: CallSettings, timeout_s: float | None) -> None:
        self.request_id, self.start, self.settings = request_id, start, settings
        self.deadline = settings.deadline(timeout_s)
        self.call: Any = None
        self.closed = False
        self.lock = threading.Lock()

    def begin(self) -> Any:
        """Starts a try (the call object), or None once closed."""
        with self.lock:
            if self.closed:
                return None
            self.call = self.start(self.deadline.remaining_s())
            return self.call

    def failed(self, rpc: grpc.RpcError, received: Sequence[GenerateChunk]) -> None:
        """A call failed after its first response: raises its typed error, its `partial` the
        chunks `received` joined (with the usage of the ABORT messages the server sends before
        CANCELLED or DEADLINE_EXCEEDED), unless the stream was closed (then the caller ends
        quietly). Never retried: tokens have been handed out."""
        if not self.closed:
            error = error_from_rpc(rpc, self.request_id or None)
            error.partial = Completion.from_chunks(received) if received else None
            raise error from None

    def after_failure(self, attempt: int, rpc: grpc.RpcError) -> float | None:
        """The wait before the next try after try `attempt` failed before any response, or None
        when the stream was closed meanwhile (end quietly); raises the typed error when final."""
        if self.closed:
            return None
        error = error_from_rpc(rpc, self.request_id or None)
        delay = self.settings.retry_delay(attempt, error, self.deadline)
        if delay is None:
            raise error from None
        return delay

    def cancel(self) -> None:
        """Closes: the running try is cancelled (the server aborts the request), none starts."""
        with self.lock:
            self.closed = True
            if self.call is not None:
                self.call.cancel()


class ClientBase:
    """What Client and AsyncClient share: call settings, the channel (made by `_channels`, grpc
    or grpc.aio) and its stub, and the tries of a Generate call. Arguments: see Client."""

    _channels: Any = grpc

    def __init__(self, target: str = "localhost:50051", *, api_key: str | None = None,
                 timeout_s: float | None = 120.0, retry: RetryPolicy | None = None,
                 on_retry: OnRetry | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 metadata: Sequence[tuple[str, str]] = (),
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        self._settings = CallSettings.build(api_key, metadata, timeout_s, retry, on_retry)
        opts = channel_options(self._settings.retry, options)
        self._channel = (self._channels.secure_channel(target, credentials, opts) if credentials
                         else self._channels.insecure_channel(target, opts))
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    def _unary_attempts(self, method: Any, request: Any, timeout_s: float | None) -> Attempts:
        """Tries of a unary call: each begin() makes the call (sync: its response; asyncio: an
        awaitable)."""
        def start(remaining_s: float | None) -> Any:
            return method(request, timeout=remaining_s, metadata=self._settings.metadata)
        return Attempts(start, "", self._settings, timeout_s)

    def _attempts(self, prompt: Prompt, model: str, request_id: str | None,
                  timeout_s: float | None, branches: Branches,
                  sampling: dict[str, Any]) -> Attempts:
        request = generate_request(prompt, model, request_id, sampling, branches)

        def start(remaining_s: float | None) -> Any:
            return self._stub.Generate(request, timeout=remaining_s,
                                       metadata=self._settings.metadata)
        return Attempts(start, request.request_id, self._settings, timeout_s)
