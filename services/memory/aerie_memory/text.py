"""Plain text utilities of ingestion: validation, content hashing, chunking."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from aerie_common.entities import prose_sentences

from aerie_memory.layout import TERMINAL, is_heading, normalize, paragraph_lines

NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DOCUMENT_ID_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}$")


def shown(value: str, limit: int = 64) -> str:
    """``value`` quoted for a message, cut short when long: error details travel in gRPC
    metadata, which clients refuse past 16 KiB, losing the status and its reason."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


class InvalidInput(ValueError):
    """Input a client must fix; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def check_namespace(namespace: str) -> str:
    if not NAMESPACE_RE.fullmatch(namespace or ""):  # match's $ would allow a final newline
        raise InvalidInput(
            f"namespace {shown(namespace)} is invalid: use 1-64 characters from A-Z a-z 0-9 _ -", "namespace"
        )
    return namespace


@dataclass(frozen=True)
class IncomingDocument:
    id: str
    text: str
    metadata: dict[str, Any]  # scalars: str, int, float, bool

    @cached_property
    def hash(self) -> str:
        """The text's ``content_hash``, worked out once."""
        return content_hash(self.text)


def parse_metadata(raw: str, param: str) -> dict[str, Any]:
    """A document's metadata from its JSON ("" is none): an object of scalars, kept as sent."""
    if not raw:
        return {}
    try:
        metadata = json.loads(raw)
    except ValueError as exc:
        raise InvalidInput(f"{param} is not JSON: {exc}", param) from exc
    if not isinstance(metadata, dict):
        raise InvalidInput(f"{param} must be a JSON object", param)
    for key, value in metadata.items():
        if not isinstance(value, str | int | float) or (
            isinstance(value, float) and not math.isfinite(value)
        ):
            raise InvalidInput(
                f"{param}.{key} must be a string, a finite number or a boolean", f"{param}.{key}"
            )
    return metadata


def check_documents(documents: list[IncomingDocument], max_documents: int, max_chars: int) -> None:
    if not documents:
        raise InvalidInput("documents must hold at least one document", "documents")
    if len(documents) > max_documents:
        raise InvalidInput(
            f"{len(documents)} documents in one request; the limit is {max_documents}", "documents"
        )
    # A text sent twice under one id (as two documents without ids are) is a duplicate, as
    # when sent again later; one id for two texts cannot be.
    seen: dict[str, str] = {}
    for i, doc in enumerate(documents):
        if not DOCUMENT_ID_RE.fullmatch(doc.id or ""):
            raise InvalidInput(
                f"documents[{i}].id {shown(doc.id)} is invalid: 1-128 characters from A-Z a-z 0-9 _ . : / -",
                f"documents[{i}].id",
            )
        if seen.setdefault(doc.id, doc.hash) != doc.hash:
            raise InvalidInput(
                f"documents[{i}].id {shown(doc.id)} appears twice in the request", f"documents[{i}].id"
            )
        if not normalize(doc.text):
            raise InvalidInput(f"documents[{i}].text is empty", f"documents[{i}].text")
        if len(doc.text) > max_chars:
            raise InvalidInput(
                f"documents[{i}].text has {len(doc.text)} characters; the limit is {max_chars}",
                f"documents[{i}].text",
            )


def content_hash(text: str) -> str:
    return hashlib.sha256(normalize(text).encode()).hexdigest()


def default_document_id(text: str) -> str:
    """The id of a document sent without one: the same text gets the same id, so sending it
    again is a duplicate rather than a second copy."""
    return f"doc-{content_hash(text)[:16]}"


def split_sentences(text: str) -> list[str]:
    """Sentences, whitespace collapsed. A line that is not wrapped prose ends one too (a
    heading, a list item: "- Population: 900" is a fact of its own, not the start of a
    run-on sentence), and a list or heading marker opening a line is dropped. "Dr." and
    other abbreviations end none."""
    return [s for line in paragraph_lines(text) for s in prose_sentences(line)]


def join_sentences(sentences: list[str]) -> str:
    """Sentences as prose: one without end punctuation (a heading, a list item) gets a
    full stop, so that a passage made of a list reads as its facts, not as one run-on line;
    one that leads into the next ("Ingredients:", "Hi team,") does not."""
    return " ".join(s if s.endswith((*TERMINAL, ":", ",")) else f"{s}." for s in sentences)


def _parts_after(sentence: str, next_sentence: str) -> bool:
    """Whether the sentence splitter parts ``sentence`` and ``next_sentence`` on one line."""
    return (
        sentence.endswith(TERMINAL)
        and not is_heading(next_sentence)
        and len(prose_sentences(f"{sentence} {next_sentence}")) == 2
    )


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Whole sentences packed greedily into chunks of at most ``max_chars`` (a single
    longer sentence is cut at word boundaries). Sentences are joined by a space where the
    sentence splitter would part them there again, else by a blank line (after a line
    without end punctuation, before a heading or a line opening in lower case), so that
    ``split_sentences`` gives a chunk's sentences back."""
    chunks: list[str] = []
    current = last = ""
    for sentence in split_sentences(text):
        pieces = [sentence]
        if len(sentence) > max_chars:
            pieces, piece = [], ""
            for word in sentence.split(" "):
                if piece and len(piece) + 1 + len(word) > max_chars:
                    pieces.append(piece)
                    piece = word
                else:
                    piece = f"{piece} {word}" if piece else word
            if piece:
                pieces.append(piece)
        for piece in pieces:
            if current and len(current) + 1 + len(piece) > max_chars:
                chunks.append(current)
                current = piece
            elif current:
                current += (" " if _parts_after(last, piece) else "\n\n") + piece
            else:
                current = piece
            last = piece
    if current:
        chunks.append(current)
    return chunks
