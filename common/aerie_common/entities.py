"""Names and words in plain text, shared by the memory service and the gateway.

Names are found by their capitals: the memory service writes questions about each entity
a document names, and the gateway follows a memory answer to the entity it introduces
(the bridge of a two-hop question). Content words (crudely stemmed, stopwords dropped)
measure how much a sentence is about a question. Also the question the two share about an
entity: the memory learns each entity's facts under it, and the chat protocol asks it."""

from __future__ import annotations

import re
import threading

import snowballstemmer

STOPWORDS = set(
    """a an the and or but if of to in on at by for with from as is are was were be been being
    it its this that these those he she they them his her their him there here what which who whom
    whose when where why how do does did has have had not no yes so than then also into about over
    under after before up down out one two three i you we our your my me us can could would should
    will shall may might must very more most some any each all both few many much such only own same
    just""".split()
)
# Capitalised words that start sentences rather than name things.
_NOT_ENTITY_HEADS = {
    "The", "A", "An", "He", "She", "It", "They", "In", "On", "At", "This", "That", "There", "Its",
    "His", "Her", "Their", "After", "Before", "When", "While", "Each", "Every", "Both", "Most",
    "Some", "Many", "Q", "A:", "Yes", "No", "What", "Who", "Which", "Where", "How", "Why",
    "Then", "But", "And", "So", "Also", "However", "Now", "Today", "Yesterday", "Tomorrow",
    "Later", "Meanwhile", "Still", "Yet", "Thus", "Since", "Because", "Although", "If", "Once",
    "During", "For", "From", "With", "By", "We", "You", "Our", "My", "Your", "These", "Those",
    # what opens a user's question or request rather than the name after it ("Is Tressa
    # big?", "Did Orrin Vastel found it?", "Describe Kelmouth.", "What's the export of ...")
    "Is", "Are", "Was", "Were", "Do", "Does", "Did", "Has", "Have", "Had", "Can", "Could",
    "Would", "Should", "Shall", "Must", "Might", "Tell", "Describe", "Explain", "List", "Name",
    "Give", "Show", "Summarize", "Summarise", "Compare", "Please", "Let", "Hi", "Hello", "Hey",
    "Thanks", "What's", "Who's", "Where's", "When's", "How's", "Why's", "It's", "That's",
    "There's", "Here's", "Let's", "I'm", "I'd", "I've",
    # prepositions opening a question ("Below what temperature ...?", "Under which ...?")
    "Above", "Below", "Under", "Over", "Into", "Within", "Without", "Between", "Among",
    "Across", "Through", "Against", "Until", "Upon", "About", "Around", "Near", "Beyond",
    "Towards", "Toward", "Per", "Via", "To", "Of", "As",
    # indefinite pronouns ("Anything else?", "Everyone agreed.")
    "Anything", "Something", "Nothing", "Everything", "Anyone", "Someone", "Everyone", "Nobody",
    "Anybody", "Somebody", "Everybody",
}  # fmt: skip
# Instructions' verbs, which open a manual's or a handbook's sentences ("Install Kestrel
# with pip.", "Contact Dalia Ferreira ..."): dropped where they open a sentence, not
# inside a name ("the Open University").
_IMPERATIVE_HEADS = {
    "Install", "Uninstall", "Run", "Use", "Open", "Close", "Click", "Select", "Choose", "Enter",
    "Type", "Press", "Add", "Remove", "Delete", "Set", "Check", "Contact", "Visit", "See", "Call",
    "Email", "Send", "Submit", "Download", "Upload", "Save", "Restart", "Start", "Stop", "Follow",
    "Keep", "Make", "Read", "Note", "Ensure", "Avoid", "Book", "Ask", "Report", "Update", "Create",
    "Copy", "Move", "Find", "Try", "Turn", "Take", "Put", "Get", "Review", "Configure", "Enable",
    "Disable", "Connect", "Insert", "Register", "Apply", "Join", "Bring", "Pay", "Wear",
}  # fmt: skip
# What comes before a word that opens a sentence: nothing, end punctuation, a line break, a
# heading's or a list item's marker. Besides whitespace it holds at most this many
# characters ("12. "), so a window of text before the word holding more shows it.
_SENTENCE_OPENS = re.compile(r"(?:^|[.!?:;]\s+|\n\s*|#\s+|(?:^|\n)\s*(?:[-*\u2022]|\d{1,3}[.)])\s+)$")
_OPENER_MARK_CHARS = 4
_OPENER_WINDOW = 64
# Capitalised words that name a time, not a thing a question is about ("held every
# August"): alone they are no entity.
_CALENDAR = set(
    """January February March April May June July August September October November December
    Monday Tuesday Wednesday Thursday Friday Saturday Sunday""".split()
)
# Capital letters past ASCII too ("José Martínez", "Málaga", "Łódź", "Zürich"): the
# standard library's re has no class for them, so the Latin, Greek and Cyrillic ones are
# listed once here.
CAPITAL = "A-Z" + "".join(c for c in map(chr, range(0xC0, 0x530)) if c.isupper())
_LETTER = r"[^\W\d_]"
# A capitalised word, or a model code ("K2", "A320", "X-200"): "the Kestrel K2" and "the
# Kestrel K1" are two things, and "The K2 went on sale" names the first.
_NAME_WORD = rf"(?:[A-Z][A-Za-z-]*[0-9][A-Za-z0-9-]*|[{CAPITAL}](?:{_LETTER}|['-])+)\b"
# Within a line: a heading ("# Brannock Observatory") names nothing with the line below it.
_ENTITY = re.compile(rf"\b{_NAME_WORD}(?:[ \t]+(?:of[ \t]+|the[ \t]+|de[ \t]+|van[ \t]+)?{_NAME_WORD})*")
# Titles before a person's name, not part of it: "Captain Idris Morlan" is asked about as
# "Idris Morlan".
TITLES = set(
    """Mr Mrs Ms Dr Prof Professor Sir Dame Lord Lady Captain Capt Colonel General Admiral
    Lieutenant Sergeant Judge Senator President Governor Mayor King Queen Prince Princess
    Saint Reverend Rev""".split()
)
_POSSESSIVE = re.compile(r"['\u2019]s$")
# The first person: a user's own notes speak of their writer so ("My sister Lena lives in
# Oslo."), and the user asks of them so ("Where does my sister live?").
_FIRST_PERSON = re.compile(r"\b(?:I|[Mm]e|[Mm]y|[Mm]ine|[Mm]yself|[Ww]e|[Uu]s|[Oo]urs?|[Oo]urselves)\b")
# "Tell me about ...", "Remind us when ...": the first person a request is made in, not
# what it asks about
_REQUEST = re.compile(r"\b(?:[Tt]ell|[Gg]ive|[Ss]how|[Rr]emind|[Ll]et|[Hh]elp)\s+(?:me|us)\b")
_QUOTED_FIRST_PERSON = re.compile(rf'["\u201c][^"\u201d]*{_FIRST_PERSON.pattern}[^"\u201d]*["\u201d]')
# A speaker's name before a turn of a chat or transcript: one or two capitalised words
SPEAKER = rf"[{CAPITAL}][\w'-]*(?: [{CAPITAL}][\w'-]*)?"
_CHAT_TURN = re.compile(rf"^{SPEAKER}(?: said)?:\s")  # "Priya said: ...", "Caller: ..."
WORD = re.compile(r"[^\W_](?:[^\W_]|['-])*")  # letters and digits of any script
FACTS_QUESTION = "What do you know about {}?"
_FACTS_PREFIX, _FACTS_SUFFIX = FACTS_QUESTION.split("{}")
# A Snowball stemmer keeps its word between calls: one per thread (shared, two threads
# stemming at once read each other's words; bench.memory_qa.replay composes from 4).
_STEMMERS = threading.local()
# Irregular past forms, which no suffix stemmer joins to their verb: "Where was it built?"
# must find "Avelon builds it in Tampere".
_IRREGULAR = dict(
    pair.split(":")
    for pair in """built:build made:make sold:sell bought:buy led:lead won:win wrote:write written:write
    began:begin begun:begin held:hold grew:grow grown:grow taught:teach found:find met:meet ran:run
    took:take taken:take gave:give given:give left:leave kept:keep told:tell brought:bring paid:pay
    spent:spend sent:send lost:lose fought:fight chose:choose chosen:choose drew:draw drawn:draw
    flew:fly flown:fly sank:sink sunk:sink stood:stand thought:think
    became:become came:come went:go gone:go saw:see seen:see knew:know known:know fell:fall
    fallen:fall broke:break broken:break spoke:speak spoken:speak stole:steal stolen:steal
    sang:sing sung:sing drove:drive driven:drive rode:ride ridden:ride shot:shoot
    hid:hide hidden:hide bore:bear born:bear borne:bear wore:wear worn:wear struck:strike
    sought:seek caught:catch dug:dig fed:feed fled:flee hung:hang lent:lend meant:mean
    sat:sit slept:sleep swam:swim threw:throw thrown:throw understood:understand woke:wake""".split()
)


def _opens_sentence(text: str, start: int) -> bool:
    """Whether the word at ``start`` opens a sentence, a line or a list item
    (``_SENTENCE_OPENS``), looking back over a short window rather than the whole text
    before it (a search from the text's start made a long document's entities quadratic):
    a window holding more than an opener's characters besides whitespace holds all of it."""
    window = max(0, start - _OPENER_WINDOW)
    if sum(not c.isspace() for c in text[window:start]) <= _OPENER_MARK_CHARS:
        window = 0  # whitespace and a marker at most: the opener may reach further back
    return _SENTENCE_OPENS.search(text, window, start) is not None


def name_spans(text: str) -> list[str]:
    """Every capitalised span of ``text`` that may name something, in order, repeats
    included: sentence-initial function words stripped ("In Tarnow" -> "Tarnow")."""
    spans = []
    for match in _ENTITY.finditer(text):
        words = match.group(0).split()
        if len(words) == 1 and text.startswith(":", match.end()):
            continue  # a label ("Director: Sanne Holloway", "Route: Kell to Dunmarra")
        if words[0] in _IMPERATIVE_HEADS and _opens_sentence(text, match.start()):
            words = words[1:]
        while words and (
            words[0] in _NOT_ENTITY_HEADS
            or (words[0] in TITLES and len(words) > 1)
            or (words[0] in ("the", "of") and len(words) < len(match.group(0).split()))  # "Explain the ..."
        ):
            words = words[1:]
        name = " ".join(words)
        long_enough = len(name) >= 3 or any(c.isdigit() for c in name)  # "K2", not "Mr"
        calendar = name.removesuffix("s") in _CALENDAR  # "closed on Sundays"
        if words and name.lower() not in STOPWORDS and long_enough and not calendar:
            spans.append(name)
    return spans


def find_entities(text: str) -> list[str]:
    """Capitalised spans that are not sentence-initial function words, most frequent first."""
    counts: dict[str, int] = {}
    spans = name_spans(text)
    titled = {s.title(): s for s in spans if not s.isupper()}
    for name in spans:
        # "BRISTOW, 3 March - The council of Bristow ...": a dateline's capitals are the name
        name = titled.get(name.title(), name) if name.isupper() and len(name) > 3 else name
        counts[name] = counts.get(name, 0) + 1
    # Drop spans contained in a longer entity seen as often ("Quell" inside "Zorvath Quell").
    names = sorted(counts, key=lambda n: (-counts[n], -len(n)))
    return [n for n in names if not any(n != m and n in m and counts[m] >= counts[n] for m in names)]


_SENTENCE_END = re.compile(rf"(?<=[.!?])\s+(?=[\"'(\[]?[{CAPITAL}0-9])")
# A full stop that ends an abbreviation or an initial, not a sentence: "Dr. Eliska Marovic",
# "J. R. Tolkien", "St. Petersburg".
_ABBREVIATION = re.compile(
    rf"(?:\b(?:Dr|Mr|Mrs|Ms|Prof|St|Mt|Jr|Sr|Capt|Col|Gen|Lt|Rev|Fr|vs|approx|ca)|\b[{CAPITAL}])\.$"
)


def prose_sentences(text: str) -> list[str]:
    """The sentences of one line of prose: split after end punctuation and before a
    capital, a digit or an opening quote, except after an abbreviation or an initial."""
    sentences: list[str] = []
    for part in _SENTENCE_END.split(text.strip()):
        if sentences and _ABBREVIATION.search(sentences[-1]):
            sentences[-1] += f" {part}"
        elif part.strip():
            sentences.append(part.strip())
    return sentences


def facts_question_entity(question: str) -> str | None:
    """The X of "What do you know about X?" (stripped), or None for any other question."""
    if question.startswith(_FACTS_PREFIX) and question.endswith(_FACTS_SUFFIX):
        return question[len(_FACTS_PREFIX) : len(question) - len(_FACTS_SUFFIX)].strip()
    return None


def bare_name(entity: str) -> str:
    """``entity`` without a possessive ending: "Mira Kev's" -> "Mira Kev"."""
    return _POSSESSIVE.sub("", entity)


def names_in(text: str) -> list[str]:
    """``find_entities`` without possessive endings."""
    return [bare_name(n) for n in find_entities(text)]


def new_entities(text: str, known: str) -> list[str]:
    """The entities ``text`` names that ``known`` does not (case-insensitive)."""
    seen = known.lower()
    return [e for e in names_in(text) if e.lower() not in seen]


def in_first_person(text: str) -> bool:
    """Whether ``text`` speaks of its writer, or its asker: "Where do I work?", "our
    neighbour Marta"; not "Tell me about Pico."."""
    return _FIRST_PERSON.search(_REQUEST.sub("", text)) is not None


def in_others_words(sentence: str) -> bool:
    """Whether the first person in ``sentence`` is someone else's than its writer's: in a
    quote ('"We will reopen it," said the mayor.') or a chat turn ("Priya said: I think
    ...")."""
    return bool(
        _QUOTED_FIRST_PERSON.search(sentence) or (_CHAT_TURN.match(sentence) and in_first_person(sentence))
    )


def content_words(text: str) -> set[str]:
    """Lower-cased words that are not stopwords, stemmed (Snowball, English) and cut to
    five letters, so "collects" and "collect", "governor" and "governed", and "open" and
    "opened" match (five letters alone made "opened" "opene"), and an irregular past form
    is its verb ("built": "build")."""
    stemmer = getattr(_STEMMERS, "english", None)
    if stemmer is None:
        stemmer = _STEMMERS.english = snowballstemmer.stemmer("english")
    words = (w.lower() for w in WORD.findall(text))
    return {stemmer.stemWord(_IRREGULAR.get(w, w))[:5] for w in words if w not in STOPWORDS}
