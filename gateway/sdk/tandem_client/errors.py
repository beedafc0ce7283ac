"""Typed errors: every failed call raises a TandemError subclass carrying the gRPC status.

    TandemError                 code (grpc.StatusCode), details (str), request_id, partial
    ├── InvalidRequest          INVALID_ARGUMENT, OUT_OF_RANGE, FAILED_PRECONDITION,
    │                           ALREADY_EXISTS (a request id already in flight)
    ├── Unauthenticated         UNAUTHENTICATED, PERMISSION_DENIED (missing or wrong API key)
    ├── NotFound                NOT_FOUND (unknown model)
    ├── ResourceExhausted       RESOURCE_EXHAUSTED (queue or KV cache full, message too large)
    ├── Unavailable             UNAVAILABLE (no ready tier, server unreachable or draining)
    ├── DeadlineExceeded        DEADLINE_EXCEEDED (the call's deadline passed)
    ├── Cancelled               CANCELLED (aborted, by Abort or server-side)
    └── ServerError             anything else (INTERNAL, UNKNOWN, UNIMPLEMENTED, ...)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from tandem_client.types import Completion

RETRY_AFTER_KEYS = ("retry-after", "grpc-retry-pushback-ms")


class TandemError(Exception):
    """A call failed with gRPC status `code` and the server's `details`.

    `partial`: for a Generate stream that failed after its first message, what it received,
    joined as a Completion (its choices so far; with Abort or a deadline the server's last
    message per open branch, finish reason ABORT, gives each its usage, and `partial.usage` the
    request's); None when nothing had arrived (and for the other RPCs)."""

    partial: Completion | None

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str | None = None,
                 trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details, self.request_id = code, details, request_id
        self.trailing_metadata = trailing_metadata
        self.partial = None


class InvalidRequest(TandemError):
    """The request is malformed or out of range (prompt too long, bad sampling value, ...)."""


class Unauthenticated(TandemError):
    """The gateway requires an API key and the call's was missing or wrong."""


class NotFound(TandemError):
    """The model (or another named thing) does not exist."""


class ResourceExhausted(TandemError):
    """The server is full. `retry_after_s` is the server's hint (trailing metadata `retry-after`
    in seconds or `grpc-retry-pushback-ms`), None when it sent none."""

    @property
    def retry_after_s(self) -> float | None:
        metadata = dict(self.trailing_metadata)
        for key, scale in zip(RETRY_AFTER_KEYS, (1.0, 0.001)):
            try:
                return float(metadata[key]) * scale
            except (KeyError, TypeError, ValueError):
                continue
        return None


class Unavailable(TandemError):
    """The server could not be reached or has no ready tier; retrying later may succeed."""


class DeadlineExceeded(TandemError):
    """The call's deadline passed before it finished."""


class Cancelled(TandemError):
    """The call was cancelled: an Abort for its request id, or the server ended it."""


class ServerError(TandemError):
    """The server failed (INTERNAL, UNKNOWN, UNIMPLEMENTED, DATA_LOSS, ...)."""


_ERRORS: dict[grpc.StatusCode, type[TandemError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequest,
    grpc.StatusCode.ALREADY_EXISTS: InvalidRequest,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def error_from_rpc(err: grpc.RpcError, request_id: str | None = None) -> TandemError:
    """The typed error for a failed call (sync or asyncio), keeping code, details and trailers."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else None
    trailers = err.trailing_metadata() if callable(getattr(err, "trailing_metadata", None)) else ()
    return _ERRORS.get(code, ServerError)(code, details or code.name.lower(), request_id,
                                          tuple(trailers or ()))
