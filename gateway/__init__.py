"""The gateway: Tandem's public APIs (OpenAI-compatible HTTP and tandem.v1.Generation gRPC) in
one process and event loop, routing each request to a prefill and a decode instance.

Torch-free: it tokenizes with `engine.tokenizer` and talks to the tiers over gRPC only.
Start it with `gateway.server.serve_gateway(...)` (or `main(args)`).
"""
