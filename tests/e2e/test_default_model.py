"""The README's run command: `tandem serve` with no --model serves the built-in trained model
(tandem-stdlib-7m, shipped in the package: nothing is built or downloaded), answers a Python
prompt with Python, exactly as transformers does on the same weights, and stops every process
on SIGTERM."""

from __future__ import annotations

import socket

import httpx
from transformers import AutoTokenizer

from engine.model.checkpoint import BUILTIN_MODEL_NAME, builtin_model_dir
from tests.e2e.conftest import start_serve, stop_serve
from tests.reference import hf_greedy

PROMPT = "def fibonacci(n):"
MAX_TOKENS = 40


def looks_like_python_body(text: str) -> bool:
    """The continuation of a `def ...:` line: a new line, an indented body of 4-space
    multiples, and Python in it (a docstring or a keyword)."""
    lines = [line for line in text.split("\n")[1:] if line.strip()]
    return (text.startswith("\n") and len(lines) >= 2
            and all((len(line) - len(line.lstrip(" "))) % 4 == 0 for line in lines)
            and lines[0].startswith("    ")
            and any(word in text for word in ('"""', "return", "self", "def ", "import ")))


def test_looks_like_python_body_tells_python_from_prose():
    assert looks_like_python_body('\n    """Return the nth number."""\n    return n\n')
    assert not looks_like_python_body(" is a sequence where each number is the sum of the two")
    assert not looks_like_python_body("\nFibonacci numbers\nare a sequence\n")


def test_serve_builtin_model_answers_python_and_shuts_down(tmp_path):
    served = start_serve(None, env={"TANDEM_CACHE": str(tmp_path)})
    try:
        response = httpx.post(f"{served.base_url}/completions", timeout=60,
                              json={"prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                    "temperature": 0})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == BUILTIN_MODEL_NAME
        text = body["choices"][0]["text"]
        assert looks_like_python_body(text), text
        # exactly what transformers generates from the shipped weights (served in float32)
        model_dir = builtin_model_dir()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids = hf_greedy(model_dir, tokenizer(PROMPT).input_ids, MAX_TOKENS)
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
        assert body["usage"]["completion_tokens"] == len(ids)
        served.assert_all_blocks_free()
    finally:
        assert stop_serve(served) == 0
    assert not any(tmp_path.iterdir())  # nothing built into the cache
    for address in served.prefill + served.decode:
        host, port = address.rsplit(":", 1)
        with socket.socket() as s:
            assert s.connect_ex((host, int(port))) != 0, f"{address} still listening"
