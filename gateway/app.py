"""The OpenAI-compatible HTTP API: `create_app(backend)`.

POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /version,
GET|POST /ping, and vLLM's POST /tokenize and /detokenize (also under /v1).
Validation happens before anything is sent: errors are OpenAI envelopes with 4xx statuses. A
stream waits up to `keepalive_s` for the first response so that an early tier error still gets
a proper HTTP status; after that, errors are `data: {"error": ...}` frames followed by
`data: [DONE]`. A client that disconnects cancels the gRPC call (the tiers abort the request).

Shutdown: once `draining` is set (the gateway got SIGTERM), every request but /metrics and
/version gets a 503 envelope (/health and /ping included, so load balancers stop sending traffic);
requests already in flight are not affected.

Access: with an API key, every path under /v1 needs `Authorization: Bearer KEY` (vLLM's rule:
/health, /ping, /version, /metrics and the unversioned /tokenize, /detokenize stay open); CORS
answers browsers from `allowed_origins` (default every origin, as vLLM).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from functools import partial
from importlib import metadata
from typing import Any, Callable, Sequence, TypeVar

import grpc
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.grpc_server import SHUTTING_DOWN
from engine.tokenizer import Tokenizer, TokenizerError
from gateway import convert, structured, tools
from gateway.backend import Backend, RequestStream
from gateway.choices import Choices
from gateway.errors import (ApiError, ApiKey, PayloadTooLarge, error_response, install_handlers,
                            invalid, validation_error)
from gateway.flags import DEFAULT_MAX_REQUEST_BYTES
from gateway.metrics import install_metrics
from gateway.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                              SamplingRequest, TokenizeRequest)
from gateway.sse import (CHAT, COMPLETION, Call, Echo, Format, stream_response,
                         wait_unless_disconnected)
from protos.tandem.v1 import common_pb2

RequestT = TypeVar("RequestT", CompletionRequest, ChatCompletionRequest, TokenizeRequest,
                   DetokenizeRequest)
T = TypeVar("T")
KEEPALIVE_S = 15.0
# Texts longer than this (characters, or ids to decode) are (de)tokenized off the event loop.
_THREAD_TOKENIZE_SIZE = 20_000


def version() -> str:
    try:
        return metadata.version("tandem")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


async def _off_loop_if_long(fn: Callable[[], T], size: int) -> T:
    return await asyncio.to_thread(fn) if size > _THREAD_TOKENIZE_SIZE else fn()


async def _body(request: Request) -> bytes:
    """The request body, refused with 413 once it is known to exceed the app's limit: from its
    Content-Length before reading, else while reading (chunked bodies), never read in full."""
    limit = request.app.state.max_request_bytes
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(limit)
    return bytes(body)


async def _parse(request: Request, model: type[RequestT]) -> RequestT:
    """The JSON body as `model`, whatever the Content-Type (curl -d sends a form type)."""
    try:
        data = json.loads(await _body(request))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(f"malformed JSON body: {e}") from e
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from e


def _check_common(backend: Backend, req: SamplingRequest) -> None:
    convert.check_model(req.model, backend.model)
    convert.check_supported(req)
    convert.check_stream_options(req)


def _refuse_surely_too_long(backend: Backend, text: str, param: str) -> None:
    """A 400 context_length_exceeded for a text that surely has more tokens than the context,
    found without encoding all of it (`Tokenizer.surely_longer_than`): a 12 MB prompt is
    refused in microseconds, not after seconds of tokenizing."""
    limit = backend.model.max_model_len
    count = backend.tokenizer.surely_longer_than(text, limit) if backend.tokenizer else None
    if count is not None:
        raise invalid(f"This model's maximum context length is {limit} tokens. However, your "
                      f"prompt has more than {count} tokens.", param, "context_length_exceeded")


async def _completion_ids(backend: Backend, req: CompletionRequest) -> list[list[int]]:
    """Each prompt of the request (a batch of one for a single prompt) as token ids; a 400
    naming the first bad one (`prompt.I` in a batch of several)."""
    prompts = convert.completion_prompts(req.prompt)
    size = sum(len(p) for p in prompts if isinstance(p, str))

    def encode() -> list[list[int]]:
        ids = []
        for i, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            if isinstance(prompt, str):
                _refuse_surely_too_long(backend, prompt, param)
            ids.append(convert.completion_prompt_ids(prompt, backend.tokenizer, backend.model,
                                                     param))
        return ids

    return await _off_loop_if_long(encode, size)


async def _chat_ids(backend: Backend, req: ChatCompletionRequest,
                    tool_setup: tools.ToolSetup) -> list[int]:
    tokenizer = backend.tokenizer
    if tokenizer is None or not tokenizer.has_chat_template:
        raise invalid("this model has no chat template: use /v1/completions", "messages")
    messages = convert.chat_messages(req.messages)
    size = sum(len(str(m.get("content", ""))) for m in messages)

    def encode() -> list[int]:
        for message in messages:
            if isinstance(message.get("content"), str):
                _refuse_surely_too_long(backend, message["content"], "messages")
        return tokenizer.encode_chat(messages, req.add_generation_prompt, tools=tool_setup.tools)

    try:
        ids = await _off_loop_if_long(encode, size)
    except TokenizerError as e:
        raise invalid(str(e), "messages") from e
    return convert.check_prompt_ids(ids, backend.model, "messages")


def _loaded_tokenizer(backend: Backend) -> Tokenizer:
    if backend.tokenizer is None:
        raise ApiError(grpc.StatusCode.UNAVAILABLE, "the tokenizer is not loaded yet")
    return backend.tokenizer


async def _tokenize(backend: Backend, req: TokenizeRequest) -> dict[str, Any]:
    """vLLM's TokenizeResponse: count, max_model_len, tokens, and token_strs (the vocabulary
    strings, with return_token_strs: true; else null)."""
    convert.check_model(req.model, backend.model)
    tokenizer = _loaded_tokenizer(backend)
    size = len(req.prompt or "") + sum(len(str(m.content or "")) for m in req.messages or ())
    try:
        ids = await _off_loop_if_long(partial(convert.tokenize_ids, req, tokenizer), size)
    except TokenizerError as e:
        raise invalid(str(e), "messages") from e
    token_strs = tokenizer.id_to_token(ids) if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": backend.model.max_model_len, "tokens": ids,
            "token_strs": token_strs}


async def _detokenize(backend: Backend, req: DetokenizeRequest) -> dict[str, str]:
    """vLLM's DetokenizeResponse: the ids' text, special tokens kept (as HF's decode)."""
    convert.check_model(req.model, backend.model)
    ids = convert.check_token_ids(req.tokens, backend.model, "tokens")
    decode = partial(_loaded_tokenizer(backend).decode, ids, skip_special_tokens=False)
    return {"prompt": await _off_loop_if_long(decode, len(ids))}


# responses
async def _collect(call: Call) -> JSONResponse:
    """Reads every choice's stream into one response."""
    texts: dict[int, list[str]] = {}
    async for index, resp in call.choices:
        texts.setdefault(index, []).append(resp.text)
    finals = call.choices.finals
    bodies = [call.whole("".join(texts.get(i, ())), convert.finish_reason(finals[i].finish_reason),
                         i) for i in range(call.choices.num_choices)]
    body = {**bodies[0], "choices": [choice for b in bodies for choice in b["choices"]]}
    return JSONResponse({**body, **call.final_fields()})


async def _collect_unless_disconnected(request: Request, call: Call) -> Response:
    """The whole answer, or a 499 nobody reads once the client is gone (the stream is closed
    either way: an unfinished call is cancelled, which aborts the request on the tiers)."""
    collect = asyncio.ensure_future(_collect(call))
    try:
        await wait_unless_disconnected(request, collect)
    finally:
        if not collect.done():
            collect.cancel()
        await call.choices.close()
    if not collect.done() or collect.cancelled():
        return Response(status_code=499)  # the client is gone
    return collect.result()


async def _start_all(backend: Backend, request_id: str, prompts: list[list[int]],
                     samplings: list[common_pb2.SamplingParams],
                     best_of: int) -> list[RequestStream]:
    """One backend request per prompt (ids `request_id`, or `request_id-I` in a batch); if one
    cannot start, those started are closed (aborted) and its error raised."""
    streams: list[RequestStream] = []
    try:
        for i, (ids, sampling) in enumerate(zip(prompts, samplings)):
            rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            streams.append(backend.start(rid, ids, sampling, n=best_of))
    except BaseException:
        for stream in streams:
            await stream.close()
        raise
    return streams


async def _respond(request: Request, backend: Backend, fmt: Format, prefix: str,
                   req: SamplingRequest, prompts: list[list[int]], keepalive_s: float,
                   tool_setup: tools.ToolSetup = tools.ToolSetup()) -> Response:
    """Validates everything for every prompt, then starts one backend request per prompt
    (each with best_of branches) and answers with their choices merged."""
    n, best_of = convert.num_choices(req, len(prompts))
    grammar = structured.from_request(req, tool_setup.forced)
    samplings = [convert.sampling_from_request(req, len(ids), backend.model, grammar)
                 for ids in prompts]
    echoes = None
    if isinstance(req, CompletionRequest) and req.echo:
        tokenizer = _loaded_tokenizer(backend)
        echoes = [Echo(convert.echo_text(prompt, ids, tokenizer), ids[0], convert.echo_only(req))
                  for prompt, ids in zip(convert.completion_prompts(req.prompt), prompts)]
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    streams = await _start_all(backend, request_id, prompts, samplings, best_of)
    for stream in streams:
        stream.structured_param = grammar.param if grammar else None
    call = Call(request_id, backend.model.name, int(time.time()), fmt,
                Choices(streams, n, best_of, convert.wants_logprobs(req)),
                req.include_usage(), req.continuous_usage(), echoes, req.prompt_logprobs,
                parse_tools=tool_setup.parse)
    if req.stream:
        return await stream_response(request, call, keepalive_s)
    return await _collect_unless_disconnected(request, call)


# access
def _under_v1(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


class _BearerAuth:
    """ASGI middleware: a request for a path under /v1 needs `Authorization: Bearer KEY`, else
    it gets a 401 OpenAI envelope (code invalid_api_key). Other paths, and OPTIONS requests
    (CORS preflights carry no credentials), pass unchecked."""

    def __init__(self, app: ASGIApp, api_key: ApiKey) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and _under_v1(scope["path"]):
            try:
                self.api_key.check(Headers(scope=scope).get("authorization"))
            except ApiError as e:
                response = error_response(e)
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _RefuseWhileDraining:
    """ASGI middleware: once `draining` is set, answers every HTTP request (but /metrics and
    /version, which operators read during a drain) with a 503 OpenAI envelope; requests already
    past it run to their end."""

    OPEN_PATHS = frozenset({"/metrics", "/version"})

    def __init__(self, app: ASGIApp, draining: asyncio.Event) -> None:
        self.app, self.draining = app, draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and self.draining.is_set()
                and scope["path"] not in self.OPEN_PATHS):
            err = ApiError(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN, code="shutting_down")
            await error_response(err)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _documented_body(model: type[RequestT]) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that parses `model` itself (see `_parse`), so the
    schema at /openapi.json documents it (clients and fuzzers read it from there)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _install_openapi(app: FastAPI, models: Sequence[type[BaseModel]]) -> None:
    """/openapi.json with the request models' schemas among its components."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = build


def _install_access(app: FastAPI, api_key: ApiKey | None, allowed_origins: Sequence[str]) -> None:
    if api_key is not None:
        app.add_middleware(_BearerAuth, api_key=api_key)
    # added last, so outermost: preflights never reach the key check, and 401s carry CORS headers
    app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                       allow_headers=["*"])


def create_app(backend: Backend, keepalive_s: float = KEEPALIVE_S, *,
               api_key: ApiKey | None = None, allowed_origins: Sequence[str] = ("*",),
               draining: asyncio.Event | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The HTTP app over `backend` (injectable: tests pass one with unreachable instances).
    `api_key`: required under /v1 when given; `allowed_origins`: CORS origins ("*": any);
    `draining`: once set, new requests get 503 (see the module's docstring);
    `max_request_bytes`: the largest request body (413 past it)."""
    app = FastAPI(title="Tandem", version=version())
    app.state.backend = backend
    app.state.max_request_bytes = max_request_bytes
    install_handlers(app)
    install_metrics(app, backend)
    if draining is not None:  # innermost: its 503s still get CORS headers
        app.add_middleware(_RefuseWhileDraining, draining=draining)
    _install_access(app, api_key, allowed_origins)

    _install_openapi(app, [CompletionRequest, ChatCompletionRequest, TokenizeRequest,
                           DetokenizeRequest])

    @app.post("/v1/completions", openapi_extra=_documented_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        req = await _parse(request, CompletionRequest)
        _check_common(backend, req)
        ids = await _completion_ids(backend, req)
        return await _respond(request, backend, COMPLETION, "cmpl", req, ids, keepalive_s)

    @app.post("/v1/chat/completions", openapi_extra=_documented_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        req = await _parse(request, ChatCompletionRequest)
        _check_common(backend, req)
        tool_setup = tools.setup(req)
        ids = await _chat_ids(backend, req, tool_setup)
        return await _respond(request, backend, CHAT, "chatcmpl", req, [ids], keepalive_s,
                              tool_setup)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        spec = backend.model
        return {"object": "list", "data": [{"id": spec.name, "object": "model", "created": 0,
                                            "owned_by": "tandem", "root": spec.name,
                                            "max_model_len": spec.max_model_len}]}

    @app.post("/tokenize", openapi_extra=_documented_body(TokenizeRequest))
    @app.post("/v1/tokenize", openapi_extra=_documented_body(TokenizeRequest))
    async def tokenize(request: Request) -> dict[str, Any]:
        return await _tokenize(backend, await _parse(request, TokenizeRequest))

    @app.post("/detokenize", openapi_extra=_documented_body(DetokenizeRequest))
    @app.post("/v1/detokenize", openapi_extra=_documented_body(DetokenizeRequest))
    async def detokenize(request: Request) -> dict[str, str]:
        return await _detokenize(backend, await _parse(request, DetokenizeRequest))

    @app.get("/health")
    async def health() -> JSONResponse:
        ok, instances = await backend.check_health()
        return JSONResponse({"status": "ok" if ok else "unavailable", "instances": instances},
                            status_code=200 if ok else 503)

    # one route per method: one route with both would give both the same operationId
    @app.get("/ping")
    @app.post("/ping")
    async def ping() -> Response:
        """vLLM's and SageMaker's probe: /health's status, no body."""
        ok, _ = await backend.check_health()
        return Response(status_code=200 if ok else 503)

    @app.get("/version")
    async def get_version() -> dict[str, str]:
        return {"version": version()}

    return app
