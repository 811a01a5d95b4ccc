from aerie_verifier.detokenize import IncrementalDetokenizer


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
