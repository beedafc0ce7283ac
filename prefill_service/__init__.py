"""The prefill tier: computes prompts in chunks into its paged KV cache (prefix cache first),
samples the first token and pushes each completed block to the decode instance that asked."""
