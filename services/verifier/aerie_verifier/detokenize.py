"""Streaming detokenisation with stop strings.

Tokens arrive one (or, with speculation, several) at a time. Text is released only once
it is final: a multi-byte character split across tokens is held back until complete
(the "prefix/read offset" method of TGI and vLLM), and so is any tail that could still
become a stop string, because a stop string must never reach the client.

With ``min_tokens``, as in vLLM, a stop string counts only where it ends in the text of a
token after the first ``min_tokens``: one that the earlier tokens wrote is output text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from transformers.convert_slow_tokenizer import bytes_to_unicode


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: Sequence[str] = (), min_tokens: int = 0):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.min_tokens = min_tokens
        self._armed_at: int | None = 0 if min_tokens == 0 else None  # chars before stop strings count
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # all decoded text so far
        self._emitted = 0  # characters of self.text already released
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Add one token; return newly releasable text. Sets ``stopped`` when a stop string appears."""
        if self.stopped:
            raise RuntimeError("detokenizer already hit a stop string")
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.token_ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
        release = self._release()
        if self._armed_at is None and len(self.token_ids) == self.min_tokens:
            self._armed_at = len(self.text)  # text held back for a multi-byte character counts after
        return release

    def _release(self) -> str:
        if self.stop:
            hit = self._first_stop()
            if hit is not None:
                self.stopped = True
                self.text = self.text[:hit]
                return self._take(len(self.text))
            return self._take(len(self.text) - self._stop_prefix_len())
        return self._take(len(self.text))

    def _first_stop(self) -> int | None:
        """Where the first stop string that counts starts, if any: it can only start within
        the last max_len-1 released chars or later, and must end past the text of the first
        min_tokens tokens."""
        if self._armed_at is None:
            return None
        longest = max(map(len, self.stop))
        hits = [
            i
            for s in self.stop
            if (i := self.text.find(s, max(0, self._emitted - longest + 1, self._armed_at - len(s) + 1)))
            != -1
        ]
        return min(hits, default=None)

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _take(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        out = self.text[self._emitted : upto]
        self._emitted = upto
        return out

    def flush(self) -> str:
        """Release whatever was held back (the generation ended without a stop string)."""
        return self._take(len(self.text))


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes_table(tokenizer) -> list[bytes]:
    """Each token id's own bytes, as OpenAI's logprobs report them: a byte-level BPE token
    (GPT-2, Llama 3, SmolLM2) may hold part of a character, which decoding it alone would
    turn into U+FFFD; a SentencePiece token spells its leading space as "▁" and a lone
    byte as "<0xHH>". Special tokens are their text."""
    vocab = tokenizer.get_vocab()
    pieces = [""] * (max(vocab.values()) + 1)
    for piece, token_id in vocab.items():
        pieces[token_id] = piece
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and "ByteLevel" in repr(backend.decoder)
    byte_of_char = {char: byte for byte, char in bytes_to_unicode().items()}
    special = {token_id: token.content for token_id, token in tokenizer.added_tokens_decoder.items()}
    table = []
    for token_id, piece in enumerate(pieces):
        if token_id in special:
            table.append(special[token_id].encode())
        elif byte_level and all(char in byte_of_char for char in piece):
            table.append(bytes(byte_of_char[char] for char in piece))
        elif match := _BYTE_FALLBACK.fullmatch(piece):
            table.append(bytes([int(match.group(1), 16)]))
        else:
            table.append(piece.replace("\u2581", " ").encode())
    return table
