"""The README's run command: `tandem serve` with no --model builds the default model offline,
serves it, and stops every process on SIGTERM."""

from __future__ import annotations

import httpx
from transformers import AutoTokenizer

from tests.e2e.conftest import start_serve, stop_serve
from tests.reference import hf_greedy


def test_serve_default_model_and_shutdown(tmp_path):
    served = start_serve(None, env={"TANDEM_CACHE": str(tmp_path)})
    try:
        response = httpx.post(f"{served.base_url}/completions", timeout=60,
                              json={"model": "tandem-tiny-llama", "prompt": "Hello",
                                    "max_tokens": 5, "temperature": 0})
        assert response.status_code == 200, response.text
        # the model it built and served is the one it left in the cache: transformers agrees
        model_dir = tmp_path / "tandem-tiny-llama"
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids = hf_greedy(model_dir, tokenizer("Hello").input_ids, 5)
        body = response.json()
        assert body["choices"][0]["text"] == tokenizer.decode(ids, skip_special_tokens=True)
        assert body["usage"]["completion_tokens"] == len(ids)
        served.assert_all_blocks_free()
    finally:
        assert stop_serve(served) == 0
    assert (tmp_path / "tandem-tiny-llama" / "config.json").exists()
    for address in served.prefill + served.decode:
        import socket

        host, port = address.rsplit(":", 1)
        with socket.socket() as s:
            assert s.connect_ex((host, int(port))) != 0, f"{address} still listening"
