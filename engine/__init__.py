"""Code both tiers run: model definitions and weight loading, the paged KV cache and its block
pool, the scheduler, the model runner and sampling.

Importing `engine` itself pulls in no torch: the gateway uses the torch-free modules
(`engine.sampling_params`, `engine.tokenizer`, `engine.detokenizer`, `engine.serving`,
`engine.errors`). `engine.cli` is the `tandem` command, above every tier and the gateway: no
other module imports it (tests/unit/test_layering.py).
"""
