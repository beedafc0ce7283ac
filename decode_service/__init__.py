"""The decode tier: takes KV blocks, has a prefill instance fill them, then generates for every
running request in one continuous batch and streams tokens back."""
