"""A document's layout, read as lines of prose: what the sentence splitter
(``aerie_memory.text.split_sentences``) is given.

A document arrives as plain text, markdown, text taken out of a PDF or HTML. Each becomes
lines that each hold whole sentences: HTML as its text, a PDF's page furniture dropped,
hard-wrapped lines joined to the line they wrap onto, list and FAQ markers dropped, a
heading (markdown's or HTML's) marked "# " whatever its case, markdown's other markup
(emphasis, links, code, quotes) dropped, and a table's rows (markdown or tab-separated)
made statements labelled by its header.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from html.parser import HTMLParser

from aerie_common.entities import CAPITAL, SPEAKER

_WS = re.compile(r"\s+")
# A list item's, heading's or FAQ's marker at the start of a line: "- ", "* ", "1. ", "## ",
# "Q: ", "A: ", and a clause's number before a capital: "2.1 The rent ...", "(b) The
# tenant ..." (not "3.5 million people ...").
_LINE_MARKER = re.compile(
    r"^(?:(?:[-*\u2022]|\d{1,3}[.)]|#{1,6})\s+|(?:Q|A|Question|Answer):\s*"
    rf"|(?:\d{{1,3}}(?:\.\d{{1,3}})+\.?|\((?:\d{{1,3}}|[a-z]{{1,4}})\))\s+(?=[{CAPITAL}]))"
)
_TABLE_SEPARATOR = re.compile(r"^:?-+:?$")  # GFM's delimiter row: one hyphen is enough
# The header of a two-column table's second column when the first holds labels and the
# second their values ("| Property | Value |"; or no header): its rows read "Capacity: 1.7
# litres.", not "Property: Capacity; value: 1.7 litres.", which says no more in twice the
# tokens.
_VALUE_HEADERS = frozenset({"value", "values", "detail", "details", "description", "information", "info"})
TERMINAL = (".", "!", "?", '."', '!"', '?"', ".)")
# A line that ends without punctuation goes on over the line break (``_wraps_onto``) when it
# is this long, when it ends on a word or comma no sentence or heading ends on, when the next
# line opens in lower case, or, in a block that reads as wrapped prose, when the next word
# would not have fitted on it. Otherwise (a heading, "Population: 900") it ends there.
_WRAPPED_LINE_CHARS = 50
_OPEN_ENDING = re.compile(
    r"(?:,|\b(?:a|an|the|of|and|or|but|to|in|on|at|by|for|with|from|as|that|which|who|whose|"
    r"is|are|was|were|has|have|had|its|his|her|their|our|my|your))$"
)
_PROSE_LINE_WORDS = 4
# A sentence ending inside a line and another beginning: a block of such lines is prose
# (a list's lines end where their items end).
_SENTENCE_INSIDE = re.compile(rf"[\w)][.!?][\"”')]?\s+[\"“'(]?[{CAPITAL}0-9]")
# A word broken at its hyphen ("well-" then "regarded"): joined without a space, and
# without the hyphen where the document writes the whole word elsewhere ("oceano-" then
# "graphy")
_HYPHENATED = re.compile(r"([^\W\d_]+)-$")
_LEADING_LETTERS = re.compile(r"^[^\W\d_]+")
# A page's furniture in text taken out of a PDF: a page number on a line of its own ("Page
# 3", "3 of 12", "- 3 -"), or after a wide gap at the end of a running header ("Annual
# Report 2024      3"), and a running header or footer, a short line without end
# punctuation that recurs word for word
_PAGE_NUMBER = (
    r"(?:[Pp]age\s+\d{1,4}(?:\s*(?:of|/)\s*\d{1,4})?|\d{1,4}\s*(?:of|/)\s*\d{1,4}|[-–—]\s*\d{1,4}\s*[-–—])"
)
_PAGE_NUMBER_LINE = re.compile(rf"^\s*{_PAGE_NUMBER}\s*$")
_TRAILING_PAGE_NUMBER = re.compile(rf"(?<=\S)[ \t]{{3,}}(?:{_PAGE_NUMBER}|\d{{1,4}})\s*$")
_RUNNING_LINE_REPEATS = 3
_RUNNING_LINE_CHARS = 80
# Tags that make a document HTML (two of them): block and common inline elements
_HTML_TAG = re.compile(
    r"</?(?:html|head|body|title|p|div|span|h[1-6]|ul|ol|li|dl|dt|dd|br|hr|table|thead|tbody|tr|td|th|"
    r"a|b|i|em|strong|section|article|header|footer|nav|main|blockquote|pre|code)\b[^>]*>",
    re.IGNORECASE,
)
_HEADING_TAGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
_BLOCK_TAGS = {
    "p", "div", "section", "article", "header", "footer", "nav", "main", "blockquote", "pre", "ul", "ol",
    "dl", "table", "thead", "tbody", "hr", *_HEADING_TAGS,
}  # fmt: skip
# not the page's text: a head's title is the site's name as often as the page's
_SKIPPED_TAGS = {"head", "script", "style", "noscript", "template"}
# A turn of a dialogue or transcript: a speaker's name and what they said, a sentence.
# Labels that are no speakers are left as they are.
_TURN = re.compile(rf"^(?P<speaker>{SPEAKER}):\s+(?P<said>\S.*[.!?][\"”')]?)$")
_NOT_SPEAKERS = {
    "Note", "Notes", "Tip", "Warning", "Caution", "Important", "Example", "Summary", "Step", "Source",
    "Update", "Status", "Subject", "Date", "Time", "Location", "From", "To", "Re", "Cc", "Result",
    "Decision", "Action", "Agenda", "Answer", "Question", "Reason", "Conclusion", "Comment",
    # roles, whose lines ask what the other's answer says: they stay with the document's topic
    "Interviewer", "INTERVIEWER", "Host", "HOST", "Moderator", "Reporter", "Speaker", "User",
    "Assistant", "Customer", "Agent", "Caller",
}  # fmt: skip
_HEADING_WORD = re.compile(rf"^(?:[{CAPITAL}0-9][\w'-]*|of|the|and|in|on|at|for|to|a|an|&)$")
# A markdown heading's marker. The layout keeps one "#" before a heading, as chunks carry it:
# "Getting started" is no title by its case, yet states no fact.
_MARKED_HEADING = re.compile(r"^#{1,6}\s+(?=\S)")
HEADING_MARK = "# "
# A markdown rule: under a line of prose (one not ending a sentence), "===" or "---" makes
# that line a heading (a setext heading); elsewhere "---", "***" or "___" is a thematic
# break. Neither is text.
_RULE = re.compile(r"^([-=*_])(?:\s*\1){2,}$")
# Markdown's markup, which is not text: a block quote's ">", a code fence, an image, a link's
# target ("[the docs](https://...)" reads "the docs"), a footnote's mark, inline code's
# backticks, and emphasis ("**fast**", "_simple_"; not the underscores of snake_case or the
# stars of "2 * 3"). A fenced block's lines are each a line of its own, read as code
# (``_code_line``), not as markdown.
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_CODE_FENCE = re.compile(r"^\s*(?:```|~~~)")
_BLOCK_QUOTE = re.compile(r"^\s*(?:>\s?)+")
_LINK_DEFINITION = re.compile(r"^\s*\[[^\]^]+\]:\s+\S+\s*$")
# A code line that is a comment ("# install the deps", "// then build") or a shebang
_CODE_COMMENT = re.compile(r"^(?:#+|//+)(?:\s|$)|^#!")
_INLINE_MARKUP = (
    (re.compile(r"!\[[^\]]*\]\([^)]*\)"), ""),
    (re.compile(r"\[([^\]]+)\](?:\([^)]*\)|\[[^\]]*\])"), r"\1"),
    (re.compile(r"^\s*\[\^[^\]]+\]:\s*|\[\^[^\]]+\]"), ""),
    (re.compile(r"`([^`]+)`"), r"\1"),
    (re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1"), r"\2"),
    (re.compile(r"(?<![\w*])([*_])(?=[^\s*_])(.+?)(?<=[^\s*_])\1(?![\w*])"), r"\2"),
)


class _HtmlText(HTMLParser):
    """HTML as the plain text ``paragraph_lines`` reads: blocks and headings as
    paragraphs, list items as "- " lines, table rows as tab-separated lines, inline markup
    and the source's own line breaks gone, the head, scripts and styles dropped."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIPPED_TAGS:
            self.skipping += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n" + (HEADING_MARK if tag in _HEADING_TAGS else ""))
        elif tag in ("li", "dt", "dd"):
            self.parts.append("\n- ")
        elif tag in ("br", "tr"):
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append("\t")

    def handle_endtag(self, tag):
        if tag in _SKIPPED_TAGS:
            self.skipping = max(0, self.skipping - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(re.sub(r"[ \n\r\f\v]+", " ", data))  # tabs are cell breaks


def markup_to_text(text: str) -> str:
    """A document written in HTML as plain text; any other text as it is."""
    if len(_HTML_TAG.findall(text, 0, 100_000)) < 2:
        return text
    parser = _HtmlText()
    parser.feed(text)
    parser.close()
    lines = [line.strip(" ") for line in "".join(parser.parts).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def normalize(text: str) -> str:
    """NFC, whitespace collapsed, trimmed: a line as the layout reads it, and the text the
    content hash is taken over (``aerie_memory.text``), so that re-sending a document with
    different line wrapping is still a duplicate."""
    return _WS.sub(" ", unicodedata.normalize("NFC", text)).strip()


def _table_cells(line: str) -> list[str] | None:
    """The cells of a markdown table row ("| Kell | 07:15 |"), or None for another line."""
    if len(line) < 2 or not (line.startswith("|") and line.endswith("|")):
        return None
    return [cell.strip() for cell in line[1:-1].split("|")]


def _tab_cells(raw: str) -> list[str] | None:
    """The cells of a tab-separated row (pasted from a spreadsheet), or None for a line
    with fewer than two."""
    cells = [normalize(cell) for cell in raw.strip().split("\t")]
    return cells if len(cells) >= 2 and any(cells) else None


def _table_row(header: list[str], cells: list[str]) -> str:
    """A table row as one labelled statement, so that each row's values stay together and
    say what they are: "Route: Kell to Dunmarra; departs: 07:15; crossing time: 50 minutes.";
    a row of a label and its value (``_VALUE_HEADERS``): "Capacity: 1.7 litres."."""
    if len(header) == 2 and (not header[1] or header[1].casefold() in _VALUE_HEADERS):
        pairs = [": ".join(cell for cell in cells[:2] if cell)]
    else:
        labels = [header[0], *(_lower_first(label) for label in header[1:])]  # capitals would read as names
        pairs = [
            f"{label}: {cell}" if label else cell for label, cell in zip(labels, cells, strict=False) if cell
        ]
    statement = "; ".join(pairs)
    return statement if statement.endswith(TERMINAL) else statement + "."


def _lower_first(label: str) -> str:
    """A header label in lower case, as it reads inside a row ("crossing time"); an
    acronym ("ETA") stays."""
    return label[0].lower() + label[1:] if label[1:2].islower() else label


def paragraph_lines(text: str) -> list[str]:
    """The text's lines, whitespace collapsed, list and FAQ markers dropped, a markdown
    heading's marker made one "#" (``HEADING_MARK``, a setext heading's too), markdown's
    thematic breaks dropped, each hard-wrapped line joined to the
    line it wraps onto, the rows of a markdown or tab-separated table made statements
    labelled by its header (a two-column tab-separated row: a label and its value)."""
    lines: list[str] = []
    previous = ""  # the last line of prose read, as written; "" after a break
    title = False  # previous is a title line
    marked = None  # previous opened with a list item's, FAQ's or speaker's marker
    header: list[str] | None = None  # of the table the last line belonged to
    kept = _without_page_furniture(_without_markdown_markup(text))
    normalized = [line for _, line, _ in kept]
    speakers = _speakers(normalized)
    for (raw, line, code), width in zip(kept, _wrap_widths(normalized), strict=True):
        if code:
            if line := _code_line(line):
                lines.append(line)
            header, previous = None, ""
            continue
        cells = _table_cells(line) or _tab_cells(raw)
        if cells is not None:
            if header is None and "\t" in raw and len(cells) == 2:
                label = cells[0].rstrip(":")
                if cells[1].casefold() not in _VALUE_HEADERS:  # else the header row "Property Value"
                    lines.append(f"{label}: {cells[1]}" if label else cells[1])
                previous = ""
            elif header is None:
                header, previous = cells, ""
            elif any(cells) and not all(_TABLE_SEPARATOR.match(cell) for cell in cells):
                lines.append(_table_row(header, cells))
            continue
        header = None
        if not line.strip("#"):  # a blank line, or an empty heading
            previous = ""
            continue
        if _MARKED_HEADING.match(line):  # a line of its own, never wrapped onto
            lines.append(_MARKED_HEADING.sub(HEADING_MARK, line))
            previous, title = "", False
            continue
        if rule := _RULE.match(line):
            # the line above is a heading, unless it ends a sentence: then the rule was meant
            if previous and not marked and rule[1] in "=-" and not previous.endswith(TERMINAL):
                lines[-1] = HEADING_MARK + lines[-1]
            previous, title = "", False
            continue
        marked = _LINE_MARKER.match(line)
        line = _LINE_MARKER.sub("", line)
        if (turn := _TURN.match(line)) and turn["speaker"] in speakers:
            # "Priya: I think ..." -> "Priya said: I think ...": the speaker is a name, not a label
            marked, line = turn, f"{speakers[turn['speaker']]} said: {turn['said']}"
        if previous and not marked and _wraps_onto(previous, line, width, title):
            lines[-1] = _joined(lines[-1], line, text)
        else:
            lines.append(line)
        title = not previous and is_heading(line)  # a block's first line, reading as a title
        previous = line
    return lines


def _without_markdown_markup(text: str) -> list[tuple[str, bool]]:
    """The text's lines less markdown's markup (``_INLINE_MARKUP``) and HTML comments, each
    with whether it is a line of a fenced code block, which is left as written; a code
    fence is a break."""
    lines: list[tuple[str, bool]] = []
    fenced = False
    for line in _HTML_COMMENT.sub("", text).splitlines():
        if _CODE_FENCE.match(line):
            fenced = not fenced
            lines.append(("", False))
        elif fenced:
            lines.append((line, True))
        elif not _LINK_DEFINITION.match(line):
            line = _BLOCK_QUOTE.sub("", line)
            for markup, text_of_it in _INLINE_MARKUP:
                line = markup.sub(text_of_it, line)
            lines.append((line, False))
    return lines


def _code_line(line: str) -> str:
    """A line of a fenced code block as a line of prose, or "" for none: a comment ("# install
    the deps", never a heading: it tells what the code does, and would crowd the facts out of
    a passage), a shebang, or a line without a letter or digit ("---", "}") is none; a code
    line keeps no list or heading marker, nor a table row's outer bars, for the layout to
    read when a chunk is read again."""
    if _CODE_COMMENT.match(line) or not re.search(r"[^\W_]", line):
        return ""
    return _LINE_MARKER.sub("", line).strip("| ")


def _speakers(lines: list[str]) -> dict[str, str]:
    """The speakers of a dialogue or transcript, each as the name it says (capitals in title
    case): the labels of sentence lines ("Priya: I think ..."), where two or more speak in
    three turns or more. Else none: a "Note: ..." line is no turn."""
    counts = Counter(turn["speaker"] for line in lines if (turn := _TURN.match(line)))
    names = [label for label in counts if label not in _NOT_SPEAKERS]
    if len(names) < 2 or sum(counts[label] for label in names) < 3:
        return {}
    return {label: label.title() if label.isupper() and len(label) > 3 else label for label in names}


def _without_page_furniture(raw_lines: list[tuple[str, bool]]) -> list[tuple[str, str, bool]]:
    """The lines, each as written and normalised, with whether it is code, less a PDF's
    page furniture (``_PAGE_NUMBER``): page numbers, and running headers and footers, lines
    that recur three times or more word for word, short and without end punctuation,
    labels, list items and table rows aside."""
    lines = []
    for raw, code in raw_lines:
        if not code:
            if _PAGE_NUMBER_LINE.match(raw):
                continue
            raw = _TRAILING_PAGE_NUMBER.sub("", raw)
        lines.append((raw, normalize(raw), code))

    def running(line: str) -> bool:
        return (
            0 < len(line) <= _RUNNING_LINE_CHARS
            and not line.endswith(TERMINAL)
            and ":" not in line
            and "\t" not in line
            and not line.startswith("|")
            and not _LINE_MARKER.match(line)
        )

    repeats = Counter(line for _, line, code in lines if running(line) and not code)
    return [(raw, line, code) for raw, line, code in lines if code or repeats[line] < _RUNNING_LINE_REPEATS]


def _joined(text: str, line: str, document: str) -> str:
    """``text`` with ``line``, the rest of its sentence, after it: a space between them,
    or none after a hyphen, which goes too where ``document`` writes the word whole."""
    broken = _HYPHENATED.search(text)
    if broken is None:
        return f"{text} {line}"
    rest = _LEADING_LETTERS.match(line)
    if rest and re.search(rf"\b{broken[1]}{rest[0]}\b", document, re.IGNORECASE):
        return text[:-1] + line
    return text + line


def _wrap_widths(lines: list[str]) -> list[int | None]:
    """Per line, the width its block (the lines between blank ones, less a title line
    opening it) was hard-wrapped at: its longest line's length; None where the block does
    not read as wrapped prose: two lines or more, and a sentence ending inside one of them
    or the block one sentence (only its last line ends one)."""
    widths: list[int | None] = [None] * len(lines)
    start = 0
    for end in range(len(lines) + 1):
        if end < len(lines) and lines[end]:
            continue
        body = lines[start + 1 if start < end and is_heading(lines[start]) else start : end]
        one_sentence = [line.endswith(TERMINAL) for line in body] == [False] * (len(body) - 1) + [True]
        if len(body) >= 2 and (one_sentence or any(_SENTENCE_INSIDE.search(line) for line in body)):
            widths[start:end] = [max(map(len, body))] * (end - start)
        start = end + 1
    return widths


def _wraps_onto(previous: str, line: str, width: int | None, title: bool) -> bool:
    """Whether ``line`` goes on with the sentence the line before it (``previous``) began;
    ``width``: what the lines were wrapped at, if they were (``_wrap_widths``). A line
    broken before a word that would have fitted ended there (a heading, a short item), and
    so does a ``title`` line (a block's first, reading as one) before a capital."""
    if previous.endswith(TERMINAL):
        return False
    if len(previous) >= _WRAPPED_LINE_CHARS or _OPEN_ENDING.search(previous) or _HYPHENATED.search(previous):
        return True
    if line[:1].islower():
        return len(previous.split()) >= _PROSE_LINE_WORDS or width is not None
    return width is not None and len(previous) + 1 + len(line.split()[0]) > width and not title


def is_heading(sentence: str) -> bool:
    """A heading: one marked as such ("# Getting started", ``HEADING_MARK``), or a title
    line ("Brannock Observatory", "Early Life and Work"): a few words, each capitalised (or
    a small joining word), and no punctuation at its end. It says what the lines below are
    about, which the coreference uses; it states no fact itself."""
    if _MARKED_HEADING.match(sentence):
        return True
    words = sentence.split()
    return 0 < len(words) <= 8 and all(_HEADING_WORD.match(w) for w in words)


def unmarked(sentence: str) -> str:
    """``sentence`` without a heading's mark: a heading as it reads in prose."""
    return _MARKED_HEADING.sub("", sentence)
