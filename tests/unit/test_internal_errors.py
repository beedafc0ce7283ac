"""internal_error_from_rpc: a failed call on an internal path (decode -> prefill -> KV receiver)
never reaches the user as the user's fault. Codes that blame the caller become INTERNAL (HTTP
500, which alerts) with the original code and details kept; the codes that say retrying may help
pass unchanged."""

from __future__ import annotations

import grpc
import pytest

from engine.errors import TandemError
from engine.grpc_server import internal_error_from_rpc

PEER = "prefill instance 10.0.0.7:8100"

# listed here, not imported from the module, so that dropping one from the mapping fails a test
CALLER_FAULT_CODES = [
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNKNOWN]
RETRYABLE_CODES = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                   grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED]


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


@pytest.mark.parametrize("code", CALLER_FAULT_CODES, ids=lambda c: c.name)
def test_a_code_that_blames_the_caller_becomes_internal_and_keeps_its_cause(code):
    error = internal_error_from_rpc(rpc_error(code, "layout block_size 8 != 16"), PEER)
    assert isinstance(error, TandemError)
    assert error.status == "INTERNAL"
    message = str(error)
    assert code.name in message and "layout block_size 8 != 16" in message and PEER in message


@pytest.mark.parametrize("code", RETRYABLE_CODES, ids=lambda c: c.name)
def test_a_code_where_retrying_may_help_passes_unchanged(code):
    error = internal_error_from_rpc(rpc_error(code, "peer went away"), PEER)
    assert error.status == code.name
    assert "peer went away" in str(error) and PEER in str(error)
