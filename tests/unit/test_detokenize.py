from aerie_verifier.detokenize import IncrementalDetokenizer, token_bytes_table
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast


def stream(tokenizer, text, stop=()):
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        pieces.append(detok.add(token))
        if detok.stopped:
            break
    else:
        pieces.append(detok.flush())
    return pieces, detok


def test_streamed_text_equals_full_decode(tiny_tokenizer):
    text = "Héllo wörld — ça va? 日本語 🙂 done"
    pieces, _ = stream(tiny_tokenizer, text)
    assert "".join(pieces) == text
    # multi-byte characters are never released half-decoded
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_is_cut_and_never_streamed(tiny_tokenizer):
    pieces, detok = stream(tiny_tokenizer, "one two STOP three", stop=("STOP",))
    assert detok.stopped
    assert "".join(pieces) == "one two "
    assert not any("S" in p for p in pieces)


def test_partial_stop_prefix_is_released_when_it_does_not_complete(tiny_tokenizer):
    pieces, detok = stream(tiny_tokenizer, "a ST b STO c", stop=("STOP",))
    assert not detok.stopped
    assert "".join(pieces) == "a ST b STO c"


def test_earliest_of_several_stop_strings_wins(tiny_tokenizer):
    pieces, _ = stream(tiny_tokenizer, "alpha beta gamma", stop=("gamma", "beta"))
    assert "".join(pieces) == "alpha "


def test_token_bytes_of_a_byte_level_tokenizer_spell_the_text_exactly(tiny_tokenizer):
    table = token_bytes_table(tiny_tokenizer)
    text = "héllo wörld — 日本"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert b"".join(table[i] for i in ids) == text.encode()
    # a token holding part of a character is that part, not U+FFFD
    assert table[ids[1]] == "é".encode()[:1]
    assert table[tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")] == b"<|im_end|>"


def test_token_bytes_of_a_sentencepiece_tokenizer():
    vocab = {"<unk>": 0, "\u2581the": 1, "<0x0A>": 2, "cat": 3, "<0xE6>": 4}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert token_bytes_table(tokenizer)[1:] == [b" the", b"\n", b"cat", b"\xe6"]


def stream_from(tokenizer, text, stop, min_tokens):
    detok = IncrementalDetokenizer(tokenizer, stop, min_tokens)
    pieces = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        pieces.append(detok.add(token))
        if detok.stopped:
            return "".join(pieces), True
    return "".join(pieces) + detok.flush(), False


def test_stop_strings_count_only_past_min_tokens_as_in_vllm(tiny_tokenizer):
    # one token a character here: the first 5 ("Lee a") may hold "e" as output text
    assert stream_from(tiny_tokenizer, "Lee and the end", ("e",), 0) == ("L", True)
    assert stream_from(tiny_tokenizer, "Lee and the end", ("e",), 5) == ("Lee and th", True)
    assert stream_from(tiny_tokenizer, "Lee and the end", ("e",), 15) == ("Lee and the end", False)
    # a stop string ending past them counts, even if it starts inside them (held back till then)
    assert stream_from(tiny_tokenizer, "xxab yy", ("ab",), 3) == ("xx", True)
    assert stream_from(tiny_tokenizer, "xxab yy", ("ab",), 4) == ("xxab yy", False)
