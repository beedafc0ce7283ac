"""The OpenAI-compatible HTTP API: `create_app(backend)`.

POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /version.
Validation happens before anything is sent: errors are OpenAI envelopes with 4xx statuses. A
stream waits up to `keepalive_s` for the first response so that an early tier error still gets
a proper HTTP status; after that, errors are `data: {"error": ...}` frames followed by
`data: [DONE]`. A client that disconnects cancels the gRPC call (the tiers abort the request).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from functools import partial
from importlib import metadata
from typing import Any, Callable, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from engine.tokenizer import TokenizerError
from gateway import convert
from gateway.backend import Backend
from gateway.errors import install_handlers, invalid, validation_error
from gateway.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from gateway.sse import (CHAT, COMPLETION, Call, Format, stream_response,
                         wait_unless_disconnected)

RequestT = TypeVar("RequestT", CompletionRequest, ChatCompletionRequest)
KEEPALIVE_S = 15.0
# Prompts longer than this (characters) are tokenized off the event loop.
_THREAD_TOKENIZE_CHARS = 20_000


def version() -> str:
    try:
        return metadata.version("tandem")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


async def _off_loop_if_long(fn: Callable[[], list[int]], size: int) -> list[int]:
    return await asyncio.to_thread(fn) if size > _THREAD_TOKENIZE_CHARS else fn()


async def _parse(request: Request, model: type[RequestT]) -> RequestT:
    """The JSON body as `model`, whatever the Content-Type (curl -d sends a form type)."""
    try:
        data = json.loads(await request.body())
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


async def _completion_ids(backend: Backend, req: CompletionRequest) -> list[int]:
    size = len(req.prompt) if isinstance(req.prompt, str) else 0
    fn = partial(convert.completion_prompt_ids, req.prompt, backend.tokenizer, backend.model)
    return await _off_loop_if_long(fn, size)


async def _chat_ids(backend: Backend, req: ChatCompletionRequest) -> list[int]:
    tokenizer = backend.tokenizer
    if tokenizer is None or not tokenizer.has_chat_template:
        raise invalid("this model has no chat template: use /v1/completions", "messages")
    messages = convert.chat_messages(req)
    size = sum(len(str(m.get("content", ""))) for m in messages)
    try:
        ids = await _off_loop_if_long(
            partial(tokenizer.encode_chat, messages, req.add_generation_prompt), size)
    except TokenizerError as e:
        raise invalid(str(e), "messages") from e
    return convert.check_prompt_ids(ids, backend.model, "messages")


# responses
async def _collect(call: Call) -> JSONResponse:
    """Reads the whole stream into one response."""
    texts: list[str] = []
    async for resp in call.stream:
        texts.append(resp.text)
    final = call.stream.final
    body = call.body("".join(texts), convert.finish_reason(final.finish_reason))
    return JSONResponse({**body, **call.final_fields(final)})


async def _collect_unless_disconnected(request: Request, call: Call) -> Response:
    """The whole answer, or a 499 nobody reads once the client is gone (the stream is closed
    either way: an unfinished call is cancelled, which aborts the request on the tiers)."""
    collect = asyncio.ensure_future(_collect(call))
    try:
        await wait_unless_disconnected(request, collect)
    finally:
        if not collect.done():
            collect.cancel()
        await call.stream.close()
    if not collect.done() or collect.cancelled():
        return Response(status_code=499)  # the client is gone
    return collect.result()


async def _respond(request: Request, backend: Backend, fmt: Format, prefix: str,
                   req: SamplingRequest, ids: list[int], keepalive_s: float) -> Response:
    sampling = convert.sampling_from_request(req, len(ids), backend.model)
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    call = Call(request_id, backend.model.name, int(time.time()), fmt,
                 backend.start(request_id, ids, sampling), req.include_usage())
    if req.stream:
        return await stream_response(request, call, keepalive_s)
    return await _collect_unless_disconnected(request, call)


def create_app(backend: Backend, keepalive_s: float = KEEPALIVE_S) -> FastAPI:
    """The HTTP app over `backend` (injectable: tests pass one with unreachable instances)."""
    app = FastAPI(title="Tandem", version=version())
    app.state.backend = backend
    install_handlers(app)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await _parse(request, CompletionRequest)
        _check_common(backend, req)
        ids = await _completion_ids(backend, req)
        return await _respond(request, backend, COMPLETION, "cmpl", req, ids, keepalive_s)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await _parse(request, ChatCompletionRequest)
        _check_common(backend, req)
        ids = await _chat_ids(backend, req)
        return await _respond(request, backend, CHAT, "chatcmpl", req, ids, keepalive_s)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        spec = backend.model
        return {"object": "list", "data": [{"id": spec.name, "object": "model", "created": 0,
                                            "owned_by": "tandem", "root": spec.name,
                                            "max_model_len": spec.max_model_len}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        ok, instances = await backend.check_health()
        return JSONResponse({"status": "ok" if ok else "unavailable", "instances": instances},
                            status_code=200 if ok else 503)

    @app.get("/version")
    async def get_version() -> dict[str, str]:
        return {"version": version()}

    return app
