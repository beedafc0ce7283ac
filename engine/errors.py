"""Domain errors, each tied to the gRPC status code it maps to (torch-free, grpc-free)."""

from __future__ import annotations


class TandemError(Exception):
    """Base class; `status` is a grpc.StatusCode name."""

    status = "INTERNAL"


class InvalidRequestError(TandemError, ValueError):
    """The caller must fix the request (HTTP 400)."""

    status = "INVALID_ARGUMENT"


class NotFoundError(TandemError):
    status = "NOT_FOUND"


class PreconditionError(TandemError):
    """The two sides disagree (KV layout, contract version, token counts)."""

    status = "FAILED_PRECONDITION"


class CapacityError(TandemError):
    """Out of a named resource (KV blocks, queue slots); the message says which."""

    status = "RESOURCE_EXHAUSTED"


class PeerUnavailableError(TandemError):
    """A peer instance is unreachable or went away; retryable."""

    status = "UNAVAILABLE"


class DeadlineError(TandemError):
    status = "DEADLINE_EXCEEDED"


class CancelledError(TandemError):
    status = "CANCELLED"


def error_for_status(status: str, message: str) -> TandemError:
    """The domain error for a gRPC status code name (TandemError for codes without a class)."""
    for cls in (InvalidRequestError, NotFoundError, PreconditionError, CapacityError,
                PeerUnavailableError, DeadlineError, CancelledError):
        if cls.status == status:
            return cls(message)
    error = TandemError(message)
    error.status = status
    return error
