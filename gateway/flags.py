"""`tandem gateway`'s flags, apart from the server so that building the CLI's parser imports
neither uvicorn nor FastAPI (the GPU image, for one, has neither, and `tandem bench` runs there)."""

from __future__ import annotations

import argparse
from typing import Mapping

from engine.serving import add_shutdown_grace_arg

# Where the API key is read from when --api-key is not given (at start-up, by `api_key`).
API_KEY_ENV = "TANDEM_API_KEY"
# The largest HTTP request body (bytes) by default: as large as a gRPC message may be
# (engine.grpc_server.MAX_MESSAGE_BYTES), so both public APIs take the same prompts.
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `main` reads (for `tandem gateway`)."""
    parser.add_argument("--prefill", nargs="+", required=True, metavar="HOST:PORT")
    parser.add_argument("--decode", nargs="+", required=True, metavar="HOST:PORT")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000,
                        help="HTTP (OpenAI API) port (0: any free port, written to --ready-file)")
    parser.add_argument("--grpc-port", type=int, default=50051,
                        help="tandem.v1.Generation port (0: any free port, as --port)")
    parser.add_argument("--served-model-name", default=None)
    add_request_timeout_arg(parser)
    parser.add_argument("--startup-timeout", type=float, default=None)
    add_shutdown_grace_arg(parser)
    add_access_arguments(parser)


def add_request_timeout_arg(parser: argparse.ArgumentParser) -> None:
    """--request-timeout (`tandem gateway` and `tandem serve`)."""
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="deadline of every call to the decode tier, seconds")


def add_access_arguments(parser: argparse.ArgumentParser) -> None:
    """Who may call the public APIs and how much they may send: --api-key, --allowed-origins
    and --max-request-bytes (`tandem gateway` and `tandem serve`)."""
    parser.add_argument("--api-key", default=None,
                        help="require `Authorization: Bearer KEY` on /v1/* and metadata "
                             "`authorization: Bearer KEY` on tandem.v1.Generation (health, "
                             "metrics, /ping, /version, /tokenize stay open); default: "
                             f"${API_KEY_ENV}, unset: no key")
    parser.add_argument("--allowed-origins", type=origins, default="*",
                        help="CORS: comma-separated origins browsers may call the HTTP API "
                             "from (default *, as vLLM; empty: none)")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        metavar="N", help="largest HTTP request body; a larger one gets 413 "
                                          "before it is read in full (default 16 MiB, the gRPC "
                                          "API's message limit)")


def origins(value: str) -> list[str]:
    """--allowed-origins' value: "*" or "https://a,https://b" as a list."""
    return [origin.strip() for origin in value.split(",") if origin.strip()]


def api_key(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """The API key: --api-key, else $TANDEM_API_KEY; None (no key) when neither is set or
    both are empty."""
    return args.api_key or environ.get(API_KEY_ENV) or None
