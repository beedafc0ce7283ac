"""`tandem gateway`'s flags, apart from the server so that building the CLI's parser imports
neither uvicorn nor FastAPI (the GPU image, for one, has neither, and `tandem bench` runs there)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `main` reads (for `tandem gateway`)."""
    parser.add_argument("--prefill", nargs="+", required=True, metavar="HOST:PORT")
    parser.add_argument("--decode", nargs="+", required=True, metavar="HOST:PORT")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000, help="HTTP (OpenAI API) port")
    parser.add_argument("--grpc-port", type=int, default=50051, help="tandem.v1.Generation port")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="deadline of every call to the decode tier, seconds")
    parser.add_argument("--startup-timeout", type=float, default=None)
