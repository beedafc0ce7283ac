"""engine.detokenizer: streamed text == full decode (truncated at stop strings), for a byte-level
BPE (the shared tiny tokenizer) and a SentencePiece-style one (Metaspace + byte fallback); primed
with a prompt, streamed text == the text the generated ids add after the prompt."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import pytest

from engine.detokenizer import (PROMPT_CONTEXT, SPLIT_SEARCH, IncrementalDetokenizer,
                                prompt_window)
from engine.tokenizer import Tokenizer

TEXT = "Hello world! 你好，世界 — rocket 🚀 and crab 🦀 plus 👍🏽; ok.\nThe end."


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tokenizer(request, tiny_tokenizer_dir: Path, metaspace_tokenizer_dir: Path) -> Tokenizer:
    if request.param == "byte_level":
        return Tokenizer.from_dir(tiny_tokenizer_dir)
    return Tokenizer.from_dir(metaspace_tokenizer_dir)


@pytest.fixture(scope="module")
def sp_tokenizer(metaspace_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(metaspace_tokenizer_dir)


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """The reference: cut at the occurrence that ends first (ties: starts first)."""
    found = [(i + len(s), i) for s in stop if s and (i := text.find(s)) >= 0]
    return text[:min(found)[1]] if found else text


def stream(tok: Tokenizer, ids: list[int], stop: Sequence[str] = (),
           rng: random.Random | None = None, skip_special_tokens: bool = True,
           prompt: Sequence[int] = ()) -> tuple[list[str], bool]:
    """Feeds ids one at a time (or in random groups with rng) to a detokenizer primed with
    prompt; returns the texts and stopped."""
    detok = IncrementalDetokenizer(tok, stop, skip_special_tokens, prompt_token_ids=prompt)
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


def added_text(tok: Tokenizer, prompt: list[int], gen: list[int],
               skip_special_tokens: bool = True) -> str:
    """The reference for a primed stream (the module contract), all at once: decode(tail + gen)
    past decode(tail); past decode(tail[:k]) (the prompt up to its last complete character) when
    gen completes a character the prompt left incomplete."""
    tail, k = prompt_window(tok, prompt, skip_special_tokens)
    full, tail_text = (tok.decode(tail + gen, skip_special_tokens),
                       tok.decode(tail, skip_special_tokens))
    if full.startswith(tail_text):
        return full[len(tail_text):]
    head = tok.decode(tail[:k], skip_special_tokens)
    assert k < len(tail) and full.startswith(head)
    return full[len(head):]


def test_sentencepiece_like_decode_matches_transformers(metaspace_tokenizer_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_dir(metaspace_tokenizer_dir)
    ref = transformers.AutoTokenizer.from_pretrained(metaspace_tokenizer_dir)
    ids = ours.encode(TEXT)
    assert ids == ref(TEXT).input_ids and ids[0] == ours.token_to_id("<s>")
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


# --- primed with the prompt: only the text the generated ids add after the prompt ------------

def continuation(tok: Tokenizer, before: str, after: str) -> tuple[list[int], list[int]]:
    """(prompt ids of `before`, generated ids of `after`) as the tokenizer splits before+after."""
    ids, prompt = tok.encode(before + after), tok.encode(before)
    assert ids[:len(prompt)] == prompt, "the split must fall on a token boundary"
    return prompt, ids[len(prompt):]


@pytest.fixture(scope="module")
def hf_sp_tokenizer(metaspace_tokenizer_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(metaspace_tokenizer_dir)


def hf_added_text(hf_tokenizer, prompt: list[int], gen: list[int],
                  skip_special_tokens: bool = True) -> str:
    """transformers' decode(prompt + gen) past decode(prompt)."""
    full = hf_tokenizer.decode(prompt + gen, skip_special_tokens=skip_special_tokens)
    prompt_text = hf_tokenizer.decode(prompt, skip_special_tokens=skip_special_tokens)
    assert full.startswith(prompt_text)
    return full[len(prompt_text):]


@pytest.mark.parametrize("grouped", [False, True])
def test_first_generated_word_keeps_its_leading_space(sp_tokenizer: Tokenizer, hf_sp_tokenizer,
                                                      grouped: bool) -> None:
    """Issue 9: prompt "the cat" + generated "▁sat ▁on ▁the ▁mat" streamed "sat on the mat"."""
    prompt, gen = continuation(sp_tokenizer, "the cat", " sat on the mat")
    assert sp_tokenizer.decode(gen) == "sat on the mat", "the decoder strips the first space"
    texts, _ = stream(sp_tokenizer, gen, rng=random.Random(4) if grouped else None,
                      prompt=prompt)
    assert "".join(texts) == hf_added_text(hf_sp_tokenizer, prompt, gen) == " sat on the mat"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("prompt_text", ["the cat", "", "Hello world!", "你好", "a 🦀"])
def test_primed_stream_matches_transformers(sp_tokenizer: Tokenizer, hf_sp_tokenizer,
                                            prompt_text: str, skip_special_tokens: bool) -> None:
    """The prompts start with <s>; "" is <s> alone (its text is empty, so the first space goes,
    as in transformers); each prompt also with "</s><s>" (skipped or not) after it."""
    gen = sp_tokenizer.encode(" sat on the mat 🦀 ok!</s>", add_special_tokens=False)
    eos, bos = sp_tokenizer.token_to_id("</s>"), sp_tokenizer.token_to_id("<s>")
    assert gen[-1] == eos
    for prompt in (sp_tokenizer.encode(prompt_text), sp_tokenizer.encode(prompt_text) + [eos, bos]):
        texts, _ = stream(sp_tokenizer, gen, skip_special_tokens=skip_special_tokens,
                          prompt=prompt)
        assert "".join(texts) == hf_added_text(hf_sp_tokenizer, prompt, gen,
                                                skip_special_tokens), prompt


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_prompt_and_ids_stream_to_added_text(tokenizer: Tokenizer, grouped: bool,
                                                    skip_special_tokens: bool) -> None:
    rng = random.Random(5)
    for _ in range(300):
        prompt, gen = random_ids(tokenizer, rng), random_ids(tokenizer, rng)
        texts, _ = stream(tokenizer, gen, rng=rng if grouped else None,
                          skip_special_tokens=skip_special_tokens, prompt=prompt)
        assert "".join(texts) == added_text(tokenizer, prompt, gen, skip_special_tokens), \
            (prompt, gen)


@pytest.mark.parametrize("grouped", [False, True])
def test_text_split_anywhere_streams_the_rest(tokenizer: Tokenizer, grouped: bool) -> None:
    """Prompt = TEXT's first j tokens, generated = the rest, for every j (inside characters
    too), with stop strings: the prompt's text up to its last complete character followed by
    the stream is TEXT, truncated at the first stop string after the prompt."""
    rng = random.Random(6)
    ids = tokenizer.encode(TEXT)
    for j in range(1, len(ids)):
        prompt_text = max((t for i in range(j + 1)
                           if TEXT.startswith(t := tokenizer.decode(ids[:i]))), key=len)
        rest = TEXT[len(prompt_text):]
        stop = [rest[(start := rng.randrange(len(rest))):start + rng.randint(1, 4)], "never"]
        texts, _ = stream(tokenizer, ids[j:], stop, rng=rng if grouped else None,
                          prompt=ids[:j])
        assert "".join(texts) == truncate_at_stop(rest, stop), (j, stop)
        assert not any("\ufffd" in t for t in texts)


def test_prompt_ending_inside_a_character(tokenizer: Tokenizer) -> None:
    """The prompt ends with part of 🦀: completed by the generated ids, it is emitted whole;
    otherwise its U+FFFD stays the prompt's and is not emitted."""
    crab = tokenizer.encode("a🦀", add_special_tokens=False)
    prompt, last = crab[:-1], crab[-1:]
    assert tokenizer.decode(prompt).endswith("\ufffd"), "🦀 must span several tokens"
    _, ok = continuation(tokenizer, "x", " ok")
    eos = tokenizer.token_to_id("</s>")
    for gen, expected in ((last + ok, "🦀 ok"), ([eos], ""), (ok, " ok"), ([], "")):
        texts, _ = stream(tokenizer, gen, prompt=prompt)
        assert "".join(texts) == expected == added_text(tokenizer, prompt, gen), gen


def test_invalid_prompt_bytes_are_never_emitted(tokenizer: Tokenizer) -> None:
    """Lone continuation bytes (invalid UTF-8) in the prompt's tail, and the prompt ending
    inside 🦀 or with such a byte: the prompt's text is never emitted, even when a generated
    byte first leaves the text invalid."""
    byte_a7 = tokenizer.token_to_id("<0xA7>")
    lone = byte_a7 if byte_a7 is not None else tokenizer.token_to_id("§")  # byte-level: 0xA7
    crab = tokenizer.encode("🦀", add_special_tokens=False)
    _, word = continuation(tokenizer, "x", " word")
    _, the = continuation(tokenizer, "x", " the")
    head = tokenizer.encode("a") + [lone] + the  # clean text between bad bytes: "a\ufffd the"
    assert tokenizer.decode([lone]) == "\ufffd" and len(the) == 1
    cases = [(head + crab[:-1], crab[-1:] + word, "🦀 word"), (head + crab[:-1], word, " word"),
             (head + crab[:-1], crab[-1:], "🦀"), (head + [lone], [lone] + word, "\ufffd word"),
             (head + [lone], word, " word"), (head + [lone], [tokenizer.token_to_id("</s>")], "")]
    for prompt, gen, expected in cases:
        for rng in (None, random.Random(7)):
            texts, _ = stream(tokenizer, gen, rng=rng, prompt=prompt)
            assert "".join(texts) == expected == added_text(tokenizer, prompt, gen), gen


def test_primed_window_stays_small(tokenizer: Tokenizer) -> None:
    """A long prompt: only its last few tokens are ever decoded (PROMPT_CONTEXT, up to
    SPLIT_SEARCH - 1 more), and each step decodes a short window."""
    sizes: list[int] = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            sizes.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens)

    prompt, gen = continuation(tokenizer, TEXT * 20, TEXT * 5)
    detok = IncrementalDetokenizer(Counting(), prompt_token_ids=prompt)
    text = "".join(detok.append([i]).text for i in gen) + detok.flush()
    assert text == TEXT * 5 and len(prompt) > 100
    assert max(sizes) <= PROMPT_CONTEXT + SPLIT_SEARCH - 1


def test_stop_strings_are_not_matched_while_matching_is_off(tokenizer: Tokenizer) -> None:
    """min_tokens: the text of the first tokens is released whole, a stop string in it is not
    matched; afterwards stops match again, in the text that follows only."""
    ids = tokenizer.encode("the cat sat. the cat sat. the end")
    detok = IncrementalDetokenizer(tokenizer, ["cat"])
    first = tokenizer.decode(ids[:4])
    assert "cat" in first
    texts = [detok.append([i], match_stops=False).text for i in ids[:4]]
    steps = [detok.append([i]) for i in ids[4:]]
    stopped_at = next(n for n, step in enumerate(steps) if step.stopped)
    text = "".join(texts) + "".join(step.text for step in steps[:stopped_at + 1])
    full = tokenizer.decode(ids)
    second_cat = full.index("cat", len(first))
    assert text == full[:second_cat]


def include_stop_reference(text: str, stop: Sequence[str]) -> str:
    """include_stop_str_in_output: the text up to the end of the occurrence that ends first."""
    found = [(i + len(s), i) for s in stop if s and (i := text.find(s)) >= 0]
    return text[:min(found)[0]] if found else text


@pytest.mark.parametrize("grouped", [False, True])
def test_included_stop_strings_against_reference(tokenizer: Tokenizer, grouped: bool) -> None:
    """include_stop_str_in_output: streamed in any grouping, the text ends with the stop string
    (split across tokens too), nothing after it."""
    rng = random.Random(5)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    for _ in range(100):
        start, size = rng.randrange(len(TEXT)), rng.randint(2, 6)
        stop = [TEXT[start:start + size], "never seen"]
        detok = IncrementalDetokenizer(tokenizer, stop, include_stop_str_in_output=True)
        texts, i = [], 0
        while i < len(ids) and not detok.stopped:
            n = rng.randint(1, 5) if grouped else 1
            texts.append(detok.append(ids[i:i + n]).text)
            i += n
        texts.append(detok.flush())
        assert "".join(texts) == include_stop_reference(TEXT, stop), stop
        assert "".join(texts).endswith(stop[0]) and detok.stopped


def test_included_stop_split_over_steps_is_released_whole_at_the_stop(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("say hello world twice", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, ["o wor"], include_stop_str_in_output=True)
    steps = [detok.append([i]) for i in ids]
    stopped_at = next(n for n, step in enumerate(steps) if step.stopped)
    assert "o wor" not in tokenizer.decode(ids[stopped_at:stopped_at + 1]), "split it"
    before = "".join(step.text for step in steps[:stopped_at])
    assert before == "say hell", "the 'o' that may start the stop string is held"
    assert steps[stopped_at].text.endswith("o wor") and detok.flush() == ""
    assert all(step == ("", True) for step in steps[stopped_at + 1:])


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_token_mid_text_is_kept_only_without_skipping(tiny_tokenizer_dir: Path,
                                                               skip_special_tokens: bool) -> None:
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    im_end = tok.encode("<|im_end|>", add_special_tokens=False)
    assert len(im_end) == 1
    ids = (tok.encode("Hello", add_special_tokens=False) + im_end
           + tok.encode(" world", add_special_tokens=False))
    texts, _ = stream(tok, ids, skip_special_tokens=skip_special_tokens,
                      prompt=tok.encode("<|im_start|>assistant\n", add_special_tokens=False))
    expected = "Hello world" if skip_special_tokens else "Hello<|im_end|> world"
    assert "".join(texts) == expected
    # a stop string may match the special token's text only when it is kept
    texts, stopped = stream(tok, ids, ["<|im_end|>"], skip_special_tokens=skip_special_tokens)
    assert stopped != skip_special_tokens
    assert "".join(texts) == ("Hello world" if skip_special_tokens else "Hello")
