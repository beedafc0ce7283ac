"""Compute kernels for the paged KV cache.

`kernels.reference` holds the torch implementations that define each operation's contract;
Triton kernels land beside them and are tested against them.
"""
