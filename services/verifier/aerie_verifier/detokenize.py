"""Streaming detokenisation with stop strings.

Tokens arrive one (or, with speculation, several) at a time. Text is released only once
it is final: a multi-byte character split across tokens is held back until complete
(the "prefix/read offset" method of TGI and vLLM), and so is any tail that could still
become a stop string, because a stop string must never reach the client.
"""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
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
        return self._release()

    def _release(self) -> str:
        if self.stop:
            # A stop string can only start within the last max_len-1 released chars or later.
            longest = max(map(len, self.stop))
            search_from = max(0, self._emitted - longest + 1)
            hits = [i for s in self.stop if (i := self.text.find(s, search_from)) != -1]
            if hits:
                self.stopped = True
                self.text = self.text[: min(hits)]
                return self._take(len(self.text))
            return self._take(len(self.text) - self._stop_prefix_len())
        return self._take(len(self.text))

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
