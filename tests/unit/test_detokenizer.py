"""engine.detokenizer: streamed text == full decode (truncated at stop strings), for a byte-level
BPE (the shared tiny tokenizer) and a SentencePiece-style one (Metaspace + byte fallback)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer

SP_CORPUS = ["Hello world, this is a test.", "the cat sat on the mat", "héllo naïve café",
             "你好世界 中文", "numbers 123 456"] * 30
TEXT = "Hello world! 你好，世界 — rocket 🚀 and crab 🦀 plus 👍🏽; ok.\nThe end."


def build_sentencepiece_like(path: Path) -> Path:
    """Llama-2 style: Metaspace pre-tokenizer, BPE with <0xXX> byte fallback, decoder
    Replace + ByteFallback + Fuse + Strip (drops the first leading space)."""
    path.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(SP_CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"].update(byte_fallback=True, fuse_unk=True)
    spec["decoder"] = json.loads(decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0)]).__getstate__())
    (path / "tokenizer.json").write_text(json.dumps(spec))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tokenizer(request, tiny_tokenizer_dir: Path, tmp_path_factory) -> Tokenizer:
    if request.param == "byte_level":
        return Tokenizer.from_dir(tiny_tokenizer_dir)
    return Tokenizer.from_dir(build_sentencepiece_like(tmp_path_factory.mktemp("sp")))


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """The reference: cut at the occurrence that ends first (ties: starts first)."""
    found = [(i + len(s), i) for s in stop if s and (i := text.find(s)) >= 0]
    return text[:min(found)[1]] if found else text


def stream(tok: Tokenizer, ids: list[int], stop: Sequence[str] = (),
           rng: random.Random | None = None,
           skip_special_tokens: bool = True) -> tuple[list[str], bool]:
    """Feeds ids one at a time (or in random groups with rng); returns the texts and stopped."""
    detok = IncrementalDetokenizer(tok, stop, skip_special_tokens)
    texts, i, stopped = [], 0, False
    while i < len(ids):
        n = rng.randint(1, 5) if rng else 1
        step = detok.append(ids[i:i + n])
        texts.append(step.text)
        i += n
        if step.stopped:
            assert detok.append(ids[i:i + 1]) == ("", True) and detok.flush() == ""
            return texts, True
    texts.append(detok.flush())
    return texts, stopped


def test_sentencepiece_like_decode_matches_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    path = build_sentencepiece_like(tmp_path)
    ours, ref = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    ids = ours.encode(TEXT)
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True) == TEXT


def random_ids(tok: Tokenizer, rng: random.Random) -> list[int]:
    """Any ids for byte-level BPE. With byte fallback, a run of <0xXX> tokens that is not valid
    UTF-8 decodes to one U+FFFD per token, valid bytes included, so the full decode of such a run
    depends on where the run ends: there, random ids are whole tokens or valid characters."""
    if tok.token_to_id("<0x41>") is None:
        return [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30))]
    byte_ids = {tok.token_to_id(f"<0x{b:02X}>") for b in range(256)}
    ids: list[int] = []
    target = rng.randint(1, 30)
    while len(ids) < target:
        if rng.random() < 0.3:
            ids += tok.encode(chr(rng.choice([0x4E2D, 0x1F980, 0xE9, 0x2014])), False)
        elif (i := rng.randrange(tok.vocab_size)) not in byte_ids:
            ids.append(i)
    return ids


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_stream_to_full_decode(tokenizer: Tokenizer, grouped: bool,
                                          skip_special_tokens: bool) -> None:
    rng = random.Random(1)
    for _ in range(300):
        ids = random_ids(tokenizer, rng)
        texts, _ = stream(tokenizer, ids, rng=rng if grouped else None,
                          skip_special_tokens=skip_special_tokens)
        assert "".join(texts) == tokenizer.decode(ids, skip_special_tokens), ids


@pytest.mark.parametrize("grouped", [False, True])
def test_real_text_streams_without_replacement_chars(tokenizer: Tokenizer, grouped: bool) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    texts, _ = stream(tokenizer, ids, rng=random.Random(2) if grouped else None)
    assert "".join(texts) == TEXT
    assert not any("\ufffd" in t for t in texts)


def test_split_emoji_is_held_back_then_emitted_whole(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🦀", add_special_tokens=False)
    assert len(ids) > 1, "the emoji must span several tokens for this test"
    texts, _ = stream(tokenizer, ids)
    assert texts[:-2] == [""] * (len(ids) - 1) and "".join(texts) == "🦀"


def test_incomplete_character_at_the_end_is_flushed(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a🦀", add_special_tokens=False)[:-1]
    texts, _ = stream(tokenizer, ids)
    assert "".join(texts) == tokenizer.decode(ids) and texts[-1].endswith("\ufffd")


@pytest.mark.parametrize("grouped", [False, True])
def test_stop_strings_against_reference(tokenizer: Tokenizer, grouped: bool) -> None:
    rng = random.Random(3)
    for _ in range(200):
        start, size = rng.randrange(len(TEXT)), rng.randint(1, 6)
        stop = [TEXT[start:start + size], "never seen", TEXT[rng.randrange(len(TEXT)):][:3]]
        ids = tokenizer.encode(TEXT, add_special_tokens=False)
        texts, stopped = stream(tokenizer, ids, stop, rng=rng if grouped else None)
        assert "".join(texts) == truncate_at_stop(TEXT, stop), stop
        assert stopped


def test_stop_at_start_and_across_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    texts, stopped = stream(tokenizer, ids, ["Hel"])
    assert texts == [""] * len(texts) and stopped
    texts, stopped = stream(tokenizer, ids, ["o wor", "🦀"])
    assert "".join(texts) == "Hell" and stopped


def test_partial_stop_is_held_then_released(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("abc abd", add_special_tokens=False)
    texts, stopped = stream(tokenizer, ids, ["abx", "d!"])
    assert "".join(texts) == "abc abd" and not stopped
    assert texts[-1] == "d", "the possible start of 'd!' waits for flush"


def test_window_stays_small(tokenizer: Tokenizer) -> None:
    """Each step decodes a short window, not the whole sequence."""
    sizes: list[int] = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            sizes.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens)

    ids = tokenizer.encode(TEXT * 20, add_special_tokens=False)
    detok = IncrementalDetokenizer(Counting())
    text = "".join(detok.append([i]).text for i in ids) + detok.flush()
    assert text == TEXT * 20 and max(sizes) <= 8
