"""`--tokenizer DIR` (vLLM's flag): a config-only checkpoint (what `--load-format dummy` needs,
e.g. the benchmark configs in engine/bench/models) is served with the tokenizer of another
directory; without the flag it fails at start-up saying so."""

from __future__ import annotations

import shutil

import httpx
import pytest

from tests.e2e.conftest import start_serve, stop_serve


@pytest.fixture
def config_only(tiny_models, tmp_path):
    model = tmp_path / "config-only-llama"
    model.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(tiny_models["llama"] / name, model / name)
    return model


def test_a_config_only_model_is_served_with_another_directorys_tokenizer(tiny_models,
                                                                         config_only):
    served = start_serve(config_only, "--load-format", "dummy", "--tokenizer",
                         str(tiny_models["llama"]), "--num-kv-blocks", "128")
    try:
        for path, body in (("completions", {"prompt": "Hello there", "max_tokens": 4}),
                           ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                 "max_tokens": 4})):
            response = httpx.post(f"{served.base_url}/{path}", timeout=60,
                                  json={"temperature": 0, **body})
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] == 4
        # the gateway's tokenizer came from the tiers, which serve the --tokenizer files
        tokens = httpx.post(f"http://127.0.0.1:{served.http_port}/tokenize", timeout=60,
                            json={"prompt": "Hello there"}).json()
        assert tokens["count"] >= 2
        served.assert_all_blocks_free()
    finally:
        assert stop_serve(served) == 0


def test_without_a_tokenizer_start_up_fails_naming_the_flag(config_only):
    with pytest.raises(RuntimeError, match="--tokenizer DIR"):
        start_serve(config_only, "--load-format", "dummy", "--num-kv-blocks", "128")
