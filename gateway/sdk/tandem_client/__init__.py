"""Python client for Tandem's public gRPC API (tandem.v1.Generation): sync (Client) and asyncio
(AsyncClient) clients yielding typed results, with deadlines, retries on UNAVAILABLE before the
first response, cancellation that aborts the request server-side, and typed errors."""

from tandem_client.aio import AsyncClient, AsyncGenerateStream
from tandem_client.client import Client, GenerateStream
from tandem_client.errors import (Cancelled, DeadlineExceeded, InvalidRequest, NotFound,
                                  ResourceExhausted, ServerError, TandemError, Unauthenticated,
                                  Unavailable)
from tandem_client.retry import RetryPolicy
from tandem_client.types import (Choice, Completion, FinishReason, GenerateChunk, ModelInfo,
                                 PhaseTimings, TokenLogprob, TopLogprob, Usage)

__version__ = "0.2.0"

__all__ = [
    "AsyncClient", "AsyncGenerateStream", "Cancelled", "Choice", "Client", "Completion",
    "DeadlineExceeded", "FinishReason", "GenerateChunk", "GenerateStream", "InvalidRequest", "ModelInfo", "NotFound",
    "PhaseTimings", "ResourceExhausted", "RetryPolicy", "ServerError", "TandemError",
    "TokenLogprob", "TopLogprob", "Unauthenticated", "Unavailable", "Usage",
]
