"""One error type for both public APIs, its OpenAI HTTP envelope and its gRPC status; and the
API key both APIs check.

`ApiError(grpc_code, message, param, code)`: the HTTP status is derived from the gRPC code
(INVALID_ARGUMENT and FAILED_PRECONDITION -> 400, UNAUTHENTICATED -> 401, NOT_FOUND -> 404,
RESOURCE_EXHAUSTED -> 429 with `Retry-After`, UNAVAILABLE -> 503, DEADLINE_EXCEEDED -> 504,
anything else -> 500).
Deterministic errors are 4xx so that OpenAI clients do not retry them; 429 (a full queue) and 503
mean "retry later": the openai client retries both by default, honouring `Retry-After`, and raises
RateLimitError for a 429 it gives up on (it maps by status; the envelope's type is
"rate_limit_error").
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Mapping, Sequence

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import TandemError
from engine.grpc_server import RETRY_AFTER_S

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_GRPC_CODE = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
              404: grpc.StatusCode.NOT_FOUND, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
              405: grpc.StatusCode.UNIMPLEMENTED, 503: grpc.StatusCode.UNAVAILABLE}


def http_status(code: grpc.StatusCode) -> int:
    """HTTP status for a gRPC status code (see the module docstring)."""
    return _HTTP_STATUS.get(code, 500)


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status (OpenAI uses invalid_request_error for 404s)."""
    if status == 429:
        return "rate_limit_error"
    if status < 500:
        return "invalid_request_error"
    return "timeout_error" if status == 504 else "server_error"


class ApiError(TandemError):
    """A request failed. `code` is OpenAI's machine-readable code (e.g. context_length_exceeded);
    `param` names the offending request field."""

    def __init__(self, grpc_code: grpc.StatusCode, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.grpc_code, self.message, self.param, self.code = grpc_code, message, param, code
        self.status = grpc_code.name  # engine.errors.TandemError's status-code name

    @property
    def http_status(self) -> int:
        return http_status(self.grpc_code)

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI error envelope: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": error_type(self.http_status),
                          "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"ApiError({self.grpc_code.name}, {self.message!r})"


class PayloadTooLarge(ApiError):
    """A request body over the gateway's limit: HTTP 413, code request_too_large (over gRPC a
    message over the limit gets RESOURCE_EXHAUSTED from gRPC itself)."""

    def __init__(self, limit: int) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"the request body exceeds the limit of {limit} bytes",
                         code="request_too_large")

    @property
    def http_status(self) -> int:
        return 413


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 / INVALID_ARGUMENT error."""
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message, param, code)


class ApiKey:
    """The key both public APIs require when the gateway has one (`--api-key`).

    Keeps only the key's SHA-256 digest and compares digests with hmac.compare_digest, so the
    time a check takes shows neither the key's bytes nor its length."""

    def __init__(self, key: str) -> None:
        if not key:
            raise ValueError("the API key is empty")
        self._digest = _sha256(key)

    def check(self, authorization: str | None) -> None:
        """Returns when `authorization` (the HTTP header's or the gRPC metadata's value) is
        `Bearer KEY`, the scheme in any case; else raises ApiError UNAUTHENTICATED (HTTP 401,
        code invalid_api_key)."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(_sha256(token), self._digest):
            raise ApiError(grpc.StatusCode.UNAUTHENTICATED,
                           "missing or invalid API key: send `Authorization: Bearer KEY` (gRPC: "
                           "metadata `authorization: Bearer KEY`)", code="invalid_api_key")


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def from_rpc_error(err: grpc.RpcError) -> ApiError:
    """A failed call to a tier, keeping its status code and details."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    return ApiError(code, details or code.name.lower(), code=code.name.lower())


def error_response(err: ApiError) -> JSONResponse:
    """The envelope with err's HTTP status; a 429 carries `Retry-After: RETRY_AFTER_S`."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if err.http_status == 429 else None
    return JSONResponse(err.to_dict(), status_code=err.http_status, headers=headers)


def validation_error(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """A 400 naming the first offending field, from FastAPI / pydantic error dicts."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return invalid(f"malformed JSON body: {first.get('ctx', {}).get('error', 'invalid')}")
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    message = first.get("msg", "invalid request")
    return invalid(f"{param}: {message}" if param else message, param)


def install_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI envelope: validation (malformed JSON included) -> 400,
    unexpected exceptions -> 500 (and are logged by Starlette)."""

    @app.exception_handler(ApiError)
    async def _tandem(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(ApiError(grpc.StatusCode.INTERNAL, f"internal error: {exc!r}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _GRPC_CODE.get(exc.status_code, grpc.StatusCode.UNKNOWN)
        body = ApiError(code, str(exc.detail)).to_dict()
        body["error"]["type"] = error_type(exc.status_code)
        return JSONResponse(body, status_code=exc.status_code)
