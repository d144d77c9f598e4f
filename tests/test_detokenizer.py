"""Windowed incremental detokenization (engines/hf/detokenizer.TextStream) against decoding the
whole output at once, on the two tokenizer families served: byte-level BPE (GPT-2, Llama 3,
SmolLM, Qwen2) and SentencePiece-style with byte fallback (Llama 2, Mistral). No torch."""

import random

import pytest
from tiny_models import make_tokenizer

from engines.detokenizer import TextStream

TEXTS = [
    "Hello world, this is a test of streaming.",
    "héllo wörld € 😀 naïve café — ünïcödé   spaces\tand\nnewlines",
    "日本語のテキストと English mixed 123 !!",
]


def sentencepiece_tokenizer():
    """A Llama-2-style tokenizer built in code: Metaspace pieces ('▁' for a space, prepended to
    the first word only), <0xNN> byte-fallback tokens for characters outside the vocabulary, and
    a decoder that strips the leading space of the text: so a token's text depends on whether it
    comes first, which is what windowed decoding must get right."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    words = ["▁", "▁Hello", "▁world", ",", "▁this", "▁is", "▁a", "▁test", "▁of", "▁stream",
             "ing", ".", "h", "llo", "▁w", "rld", "▁na", "ve", "▁caf", "▁sp", "aces", "▁and"]
    words += list("abcdefghijklmnopqrstuvwxyzEHT0123456789!")
    vocab = [(p, 0.0) for p in pieces] + [(w, -float(i + 1)) for i, w in enumerate(words)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0)])
    return tokenizer


def byte_level_tokenizer():
    return make_tokenizer()._tokenizer


@pytest.fixture(params=["byte_level", "sentencepiece"])
def tokenizer(request):
    return {"byte_level": byte_level_tokenizer, "sentencepiece": sentencepiece_tokenizer}[
        request.param]()


def stream_all(decode, ids, stops=()):
    """Feed ids one at a time; return the pieces, whether a stop ended it, and the stream."""
    stream = TextStream(decode, stops)
    pieces = []
    for n in range(1, len(ids) + 1):
        piece, stopped = stream.push(ids[:n], final=n == len(ids))
        pieces.append(piece)
        if stopped:
            return pieces, True, stream
    return pieces, False, stream


def test_stream_equals_whole_decode_for_real_text(tokenizer):
    decode = tokenizer.decode
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        pieces, stopped, stream = stream_all(decode, ids)
        assert not stopped
        assert "".join(pieces) == stream.text == decode(ids)
        # Half characters are never sent: every piece but the last is clean.
        assert not any("\ufffd" in piece for piece in pieces)
        assert stream._windowed  # both tokenizers allow windowing for these texts


def test_windowed_stream_equals_whole_decode_stream_for_random_ids(tokenizer):
    """Random ids make broken UTF-8, lone bytes and odd merges. Windowed decoding sends exactly
    what decoding every id at every step sends. (For byte-level BPE that is the whole decode.
    A byte-fallback decoder's whole decode is not monotonic on such garbage: a valid character
    turns into U+FFFDs when a stray continuation byte follows it, and sent text cannot be
    taken back, with or without windows.)"""
    decode = tokenizer.decode
    vocab = tokenizer.get_vocab_size()
    rng = random.Random(0)
    for _ in range(80):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 80))]
        windowed, whole = TextStream(decode), TextStream(decode, windowed=False)
        for n in range(1, len(ids) + 1):
            final = n == len(ids)
            assert windowed.push(ids[:n], final=final) == whole.push(ids[:n], final=final)
        if tokenizer.decoder.__class__.__name__ == "ByteLevel":
            assert windowed.text == decode(ids)


def test_stop_sequences_found_across_windows(tokenizer):
    decode = tokenizer.decode
    ids = tokenizer.encode(TEXTS[0], add_special_tokens=False).ids
    whole = decode(ids)
    for stop in ["world", "test of", "ing.", "s a t"]:
        pieces, stopped, stream = stream_all(decode, ids, (stop,))
        assert stopped, stop
        assert stream.text == whole[: whole.find(stop)]


def test_non_local_decoder_falls_back_to_whole_decode():
    """A decoder whose text for early tokens changes with later ones (here: the whole text is
    upper-cased once it contains '!') cannot be windowed; the stream notices and decodes whole."""
    vocab = ["ab", "cd", "!", "ef"]

    def decode(ids):
        text = "".join(vocab[i] for i in ids)
        return text.upper() if "!" in text else text

    ids = [0, 1, 2, 3]
    # Sent before '!' arrived, "abcd" cannot be taken back; what follows is whole-decode text
    # (windowing on would have sent "ef").
    pieces, _, stream = stream_all(decode, ids)
    assert not stream._windowed
    assert pieces == ["ab", "cd", "!", "EF"]


def test_window_cost_does_not_grow_with_output_length():
    """Each step decodes a few tokens, not the whole output: count the ids decoded."""
    tokenizer = byte_level_tokenizer()
    decoded_ids = []

    def decode(ids):
        decoded_ids.append(len(ids))
        return tokenizer.decode(ids)

    ids = tokenizer.encode(" ".join(TEXTS * 40), add_special_tokens=False).ids
    assert len(ids) > 1000
    stream_all(decode, ids)
    assert max(decoded_ids) < 16
    assert sum(decoded_ids) < 8 * len(ids)
