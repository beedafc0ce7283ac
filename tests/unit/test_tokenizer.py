"""engine.tokenizer against transformers.AutoTokenizer on tokenizers built offline in the test."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from engine.tokenizer import Tokenizer, TokenizerError

transformers = pytest.importorskip("transformers")

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] "
          "+ '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["Hello world! héllo wörld, naïve café.", "你好，世界。中文分词测试，你好世界。",
          "emoji 😀🎉👍🏽 rocket 🚀 party 🎉", "The quick brown fox jumps over the lazy dog.",
          "def f(x):\n    return x * 2  # code\n"] * 30
TEXTS = ["Hello world", " leading space", "你好，世界", "rocket 🚀🚀 and 👍🏽!", "unseen: 🦀 ℵ ß",
         "tabs\tand\nnewlines\n\n", "<|im_start|>inline special<|im_end|>", ""]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀 你好"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again"}]


def build_byte_level(path: Path, template: object = CHATML) -> Path:
    """Byte-level BPE (vocab 400, emoji/CJK split over tokens), BOS added by the post-processor,
    ChatML template and a generation_config with a second EOS id."""
    path.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
        special_tokens=[("<|endoftext|>", 0)])
    tok.save(str(path / "tokenizer.json"))
    eos = {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False,
           "rstrip": False, "single_word": False, "special": True}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
              "eos_token": eos, "chat_template": template}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return path


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_byte_level(tmp_path_factory.mktemp("byte_level"))


@pytest.fixture(scope="module", params=["byte_level", "shared_tiny"])
def pair(request, byte_level_dir: Path, tiny_tokenizer_dir: Path):
    """(ours, transformers') for each tokenizer directory."""
    path = byte_level_dir if request.param == "byte_level" else tiny_tokenizer_dir
    return Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)


def test_emoji_and_cjk_span_several_tokens(byte_level_dir: Path) -> None:
    tok = Tokenizer.from_dir(byte_level_dir)
    assert len(tok.encode("🦀", add_special_tokens=False)) > 1
    assert tok.encode("x")[0] == tok.bos_token_id == 0


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(pair, text: str) -> None:
    ours, ref = pair
    assert ours.encode(text) == ref(text).input_ids
    plain = ref(text, add_special_tokens=False).input_ids
    assert ours.encode(text, add_special_tokens=False) == plain


def test_decode_matches_transformers_on_random_ids(pair) -> None:
    ours, ref = pair
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(0, 12))]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), ids
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids), ids


@pytest.mark.parametrize("text", TEXTS)
def test_decode_roundtrip(pair, text: str) -> None:
    ours, ref = pair
    ids = ours.encode(text)
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(pair, add_generation_prompt: bool) -> None:
    ours, ref = pair
    text = ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    assert text == ref.apply_chat_template(MESSAGES, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
    expected = ref.apply_chat_template(MESSAGES, tokenize=True, return_dict=True,
                                       add_generation_prompt=add_generation_prompt)["input_ids"]
    assert ours.encode_chat(MESSAGES, add_generation_prompt) == expected


def test_special_ids_and_sizes(pair) -> None:
    ours, ref = pair
    assert ours.vocab_size == len(ref)
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_id == ref.eos_token_id
    assert set(ref.all_special_ids) <= set(ours.all_special_ids)


def test_generation_config_eos_ids(byte_level_dir: Path) -> None:
    assert Tokenizer.from_dir(byte_level_dir).eos_token_ids == [2, 0]


def test_named_template_list_uses_default(tmp_path: Path) -> None:
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": CHATML}]
    tok = Tokenizer.from_dir(build_byte_level(tmp_path, templates))
    assert tok.apply_chat_template(MESSAGES[:1], add_generation_prompt=False) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n"


def test_template_features_like_transformers(tmp_path: Path) -> None:
    template = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'bad' %}"
                "{{ raise_exception('bad role') }}{% endif %}{{ m | tojson }}\n"
                "{% endfor %}{{ eos_token }}")
    path = build_byte_level(tmp_path, template)
    ours, ref = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    msgs = [{"role": "user", "content": "é <b>"}]
    assert ours.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False,
                                                                     add_generation_prompt=True)
    with pytest.raises(TokenizerError, match="bad role"):
        ours.apply_chat_template([{"role": "bad", "content": "x"}])


def test_sandbox_blocks_unsafe_templates(tmp_path: Path) -> None:
    path = build_byte_level(tmp_path, "{{ messages.__class__.__mro__ }}")
    with pytest.raises(TokenizerError, match="unsafe"):
        Tokenizer.from_dir(path).apply_chat_template(MESSAGES)


def test_missing_files_and_template_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    path = build_byte_level(tmp_path / "t", None)
    tok = Tokenizer.from_dir(path)
    assert not tok.has_chat_template
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template(MESSAGES)


@pytest.mark.parametrize("tokenizer_class", ["PreTrainedTokenizerFast", "LlamaTokenizerFast"])
def test_add_bos_flags(tmp_path: Path, tokenizer_class: str) -> None:
    """The generic class keeps tokenizer.json's post-processor (as transformers 5 does); model
    classes rebuild it from the flags."""
    path = build_byte_level(tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(tokenizer_class=tokenizer_class, add_bos_token=False, add_eos_token=True)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_dir(path)
    if tokenizer_class == "PreTrainedTokenizerFast":
        ref = transformers.AutoTokenizer.from_pretrained(path)
        assert ours.encode("Hello") == ref("Hello").input_ids
    else:
        assert ours.encode("Hello") == ours.encode("Hello", add_special_tokens=False) + [2]


@pytest.mark.parametrize("text", [
    "Hello world! " * 12_000, "你好，世界。" * 20_000, "rocket 🚀🚀 and 👍🏽! " * 8_000,
    "x" * 150_000, "def f(x):\n    return x * 2\n" * 6_000])
@pytest.mark.parametrize("limit", [64, 2_000])
def test_surely_longer_than_is_a_true_lower_bound(pair, text: str, limit: int) -> None:
    """Whenever it answers, the text really has more than `limit` tokens, and at least the
    count it gives; where the whole text is far beyond, it answers without encoding it."""
    ours, _ = pair
    encoded: list[int] = []
    real_encode = ours._backend.encode
    ours._backend.encode = lambda t, **kw: encoded.append(len(t)) or real_encode(t, **kw)
    try:
        bound = ours.surely_longer_than(text, limit)
    finally:
        del ours._backend.encode
    total = len(ours.encode(text))
    if bound is not None:
        assert limit < bound <= total
    if total > 40 * limit:  # far over: it answers, and never encodes all of the text
        assert bound is not None and sum(encoded) < len(text)


def test_surely_longer_than_leaves_short_texts_to_the_encoder(pair) -> None:
    ours, _ = pair
    assert ours.surely_longer_than("Hello world", 4) is None  # 2 chars/token: not sure
    assert ours.surely_longer_than("Hello world " * 100, 2000) is None


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}}}}]
TOOL_MESSAGES = [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]


@pytest.mark.parametrize("tools", [TOOLS, None])
def test_the_model_template_renders_tools_and_tool_calls_like_transformers(tiny_tokenizer_dir,
                                                                           tools) -> None:
    """The test and default models' ChatML template (engine/model/checkpoint.py) lists `tools`
    in a Hermes-style system block and renders an assistant's tool_calls as <tool_call>
    blocks, as transformers renders the same template."""
    ours = Tokenizer.from_dir(tiny_tokenizer_dir)
    ref = transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    text = ours.apply_chat_template(TOOL_MESSAGES, tools=tools)
    assert text == ref.apply_chat_template(TOOL_MESSAGES, tools=tools, tokenize=False,
                                           add_generation_prompt=True)
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
            in text)
    assert ("<tools>\n" + json.dumps(TOOLS[0]) in text) == (tools is not None)


def test_grammar_vocab_kinds(byte_level_dir: Path, metaspace_tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_dir(byte_level_dir)
    strings, kind = tok.grammar_vocab()
    assert kind == "byte_level" and len(strings) == tok.vocab_size and "Ġworld" in strings
    assert strings[tok.token_to_id("Ġworld")] == "Ġworld"
    strings, kind = Tokenizer.from_dir(metaspace_tokenizer_dir).grammar_vocab()
    assert kind == "byte_fallback" and "<0xE4>" in strings
