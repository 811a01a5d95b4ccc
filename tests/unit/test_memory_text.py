"""Ingestion's plain text utilities: validation, content hashing, chunking."""

from __future__ import annotations

import textwrap

import pytest
from aerie_memory.layout import is_heading, markup_to_text, unmarked
from aerie_memory.text import (
    IncomingDocument,
    InvalidInput,
    check_documents,
    check_namespace,
    chunk_text,
    content_hash,
    join_sentences,
    split_sentences,
)


@pytest.mark.parametrize("name", ["a", "team_1", "Team-One", "x" * 64])
def test_good_namespaces(name):
    assert check_namespace(name) == name


@pytest.mark.parametrize("name", ["", "x" * 65, "a b", "ns/1", "ns.1", "é", "../etc"])
def test_bad_namespaces(name):
    with pytest.raises(InvalidInput) as err:
        check_namespace(name)
    assert err.value.param == "namespace"


def doc(i="d1", text="Some text."):
    return IncomingDocument(i, text, {})


def test_document_limits():
    check_documents([doc()], max_documents=2, max_chars=20)
    with pytest.raises(InvalidInput, match="limit is 2"):
        check_documents([doc("a"), doc("b"), doc("c")], max_documents=2, max_chars=20)
    with pytest.raises(InvalidInput, match="limit is 5") as err:
        check_documents([doc(text="too long text")], max_documents=2, max_chars=5)
    assert err.value.param == "documents[0].text"
    with pytest.raises(InvalidInput, match="at least one"):
        check_documents([], max_documents=2, max_chars=5)
    with pytest.raises(InvalidInput, match="twice"):
        check_documents([doc("a"), doc("a", "Other.")], max_documents=5, max_chars=50)
    check_documents([doc("a"), doc("a", " Some\ntext. ")], max_documents=5, max_chars=50)  # one text twice
    with pytest.raises(InvalidInput, match="empty"):
        check_documents([doc(text="  \n ")], max_documents=5, max_chars=50)
    with pytest.raises(InvalidInput, match="id"):
        check_documents([doc(i="bad id!")], max_documents=5, max_chars=50)


def test_hash_ignores_whitespace_layout_but_not_content():
    assert content_hash("Hello  world.\nBye.") == content_hash(" Hello world. Bye. ")
    assert content_hash("Hello world.") != content_hash("Hello world!")
    assert len(content_hash("x")) == 64


def test_sentences_and_chunks():
    text = "Alpha is here. Beta went home! Gamma? Delta ends."
    assert split_sentences(text) == ["Alpha is here.", "Beta went home!", "Gamma?", "Delta ends."]
    chunks = chunk_text(text, 30)
    assert chunks == ["Alpha is here. Beta went home!", "Gamma? Delta ends."]
    assert all(len(c) <= 30 for c in chunks)
    long = "word " * 40
    pieces = chunk_text(long, 50)
    assert all(len(p) <= 50 for p in pieces) and " ".join(pieces).split() == long.split()


def test_a_heading_is_a_short_line_of_capitalised_words():
    assert is_heading("Brannock Observatory") and is_heading("Early Life and Work") and is_heading("Facts")
    assert (
        not is_heading("Opened: 1958")
        and not is_heading("Cars banned")
        and not is_heading("Tressa is an island.")
    )
    # a marked heading, whatever its case; a hashtag is none
    assert is_heading("# Getting started") and not is_heading("#hashtag rules")
    assert unmarked("# Getting started") == "Getting started" and unmarked("Facts") == "Facts"


def test_markdown_markup_is_not_learned_as_text():
    text = textwrap.dedent(
        """\
        > Kestrel is **fast** and _simple_.

        See the [docs](https://kestrel.example/docs) for more. ![logo](logo.png)

        ```bash
        pip install kestrel
        kestrel sync --to home
        ```

        The `kestrel.db` file holds the ledger.[^1] It reads snake_case_names and 2 * 3 * 4.
        A *wide* range, see [the guide][g].
        <!-- TODO:
        write more -->

        [^1]: The ledger is SQLite.
        [g]: https://kestrel.example/guide
        """
    )
    assert split_sentences(text) == [
        "Kestrel is fast and simple.",
        "See the docs for more.",
        "pip install kestrel",  # a fenced block's lines: each one of its own, as written
        "kestrel sync --to home",
        "The kestrel.db file holds the ledger.",
        "It reads snake_case_names and 2 * 3 * 4.",
        "A wide range, see the guide.",
        "The ledger is SQLite.",
    ]


def test_a_fenced_code_blocks_lines_are_read_as_code_not_as_markdown():
    text = textwrap.dedent(
        """\
        Kestrel syncs photos. Install it with pip.

        ```bash
        #!/usr/bin/env bash
        # install the deps
        pip install kestrel
        }
        ```

        ```yaml
        ---
        ## Getting started
        services:
          - name: web
        | not a table |
        ```
        ```js
        // connect first
        client.connect()
        ```
        It needs Python 3.10.
        """
    )
    sentences = ["Kestrel syncs photos.", "Install it with pip.", "pip install kestrel", "services:"]
    # a comment is no heading but dropped, YAML's "---" no rule, a list item's dash or a bar no markup
    sentences += ["name: web", "not a table", "client.connect()", "It needs Python 3.10."]
    assert split_sentences(text) == sentences
    # a chunk gives them back, a line opening in lower case after a sentence too
    for chunk_chars in (1000, 60, 30):
        chunks = chunk_text(text, chunk_chars)
        assert [s for chunk in chunks for s in split_sentences(chunk)] == sentences, chunks


def test_a_markdown_or_html_heading_keeps_its_mark_and_a_line_of_its_own():
    text = (
        "Kestrel syncs photos.\n\n## Getting started\n\nInstall it with pip.\n"
        "### A heading long enough to be read as a wrapped line, which ends on and\nIt needs Python.\n#\n"
    )
    sentences = ["Kestrel syncs photos.", "# Getting started", "Install it with pip."]
    sentences += [
        "# A heading long enough to be read as a wrapped line, which ends on and",
        "It needs Python.",
    ]
    assert split_sentences(text) == sentences
    # in a chunk, a heading after a sentence starts a line of its own, so it comes back as one
    (chunk,) = chunk_text(text, 1000)
    assert chunk.startswith(
        "Kestrel syncs photos.\n\n# Getting started\n\nInstall it with pip.\n\n# A heading"
    )
    assert split_sentences(chunk) == sentences
    # a setext heading is marked too; a thematic break, or a rule under a sentence, is no text
    setext = "Kestrel\n=======\n\nIt syncs photos.\n---\nGetting started\n---------------\n* * *\n- Opened: 2023\n___"
    assert split_sentences(setext) == [
        "# Kestrel",
        "It syncs photos.",
        "# Getting started",
        "Opened: 2023",
    ]
    page = "<h1>Kestrel</h1><p>Kestrel syncs photos.</p><h2>How it works</h2><h3></h3><p>It copies.</p>"
    assert split_sentences(markup_to_text(page)) == [
        "# Kestrel",
        "Kestrel syncs photos.",
        "# How it works",
        "It copies.",
    ]


def test_abbreviations_and_initials_end_no_sentence_and_a_lead_in_gets_no_full_stop():
    text = "Dr. Eliska Marovic met J. R. Tolkien in St. Petersburg. It rained.\nIngredients:\n- 3 eggs"
    sentences = split_sentences(text)
    assert sentences == [
        "Dr. Eliska Marovic met J. R. Tolkien in St. Petersburg.",
        "It rained.",
        "Ingredients:",
        "3 eggs",
    ]
    assert (
        join_sentences(sentences)
        == "Dr. Eliska Marovic met J. R. Tolkien in St. Petersburg. It rained. Ingredients: 3 eggs."
    )


def test_faq_markers_are_dropped_and_table_rows_are_labelled_statements():
    faq = "Q: When is the library open?\nA: Monday to Saturday.\nQuestion: Fees?\nAnswer: None since 2019."
    assert split_sentences(faq) == [
        "When is the library open?",
        "Monday to Saturday.",
        "Fees?",
        "None since 2019.",
    ]
    table = (
        "Ostrava Line timetable\n\n| Route | Departs | Crossing time | ETA |\n|---|:---:|---|---|\n"
        "| Kell to Dunmarra | 07:15 | 50 minutes | |\n| Dunmarra to Inchlow | 11:40 | 2 hours | 13:40 |\n"
        "Tickets are sold in Kell."
    )
    assert split_sentences(table) == [
        "Ostrava Line timetable",
        "Route: Kell to Dunmarra; departs: 07:15; crossing time: 50 minutes.",  # an empty cell says nothing
        "Route: Dunmarra to Inchlow; departs: 11:40; crossing time: 2 hours; ETA: 13:40.",
        "Tickets are sold in Kell.",
    ]


def test_a_table_of_labels_and_their_values_reads_label_colon_value():
    specs = (
        "| Property | Value |\n|-|:-:|\n| Capacity | 1.7 litres |\n| | |\n| Power | 3000 watts. |\n"
        "| Weight | |\n\n| Feature | Description |\n|---|---|\n| Quiet mode | Runs at 40 dB |\n"
        "\n| Year | Event |\n|---|---|\n| 1384 | Charter granted |"
    )
    assert split_sentences(specs) == [
        "Capacity: 1.7 litres.",  # an empty row says nothing; one hyphen makes a delimiter row
        "Power: 3000 watts.",  # one full stop
        "Weight.",
        "Quiet mode: Runs at 40 dB.",
        "Year: 1384; event: Charter granted.",  # its second column is no value of its first
    ]


def test_a_line_break_ends_a_sentence_and_chunks_keep_it():
    text = "# Tressa\n\nTressa is an island.\n- Population: 900\n- Ferries: twice a day\n1. Cars banned\nLast  line."
    sentences = [
        "# Tressa",  # a heading keeps its mark
        "Tressa is an island.",
        "Population: 900",
        "Ferries: twice a day",
        "Cars banned",
        "Last line.",
    ]
    assert split_sentences(text) == sentences
    chunks = chunk_text(text, 60)
    assert chunks == [
        "# Tressa\n\nTressa is an island. Population: 900",
        "Ferries: twice a day\n\nCars banned\n\nLast line.",
    ]
    assert [s for chunk in chunks for s in split_sentences(chunk)] == sentences
    items = ["Ferries leave from the port of Halmby twice a day", "Cars are not allowed"]  # 50 characters
    assert split_sentences(chunk_text("\n".join(f"- {item}" for item in items), 600)[0]) == items
    # hard-wrapped prose (a long line without end punctuation) goes on over the line break
    wrapped = "The Kestrel Bay lighthouse was built in 1887 by the engineer\nMaren Osk. It stands tall.\n"
    assert split_sentences(wrapped) == [
        "The Kestrel Bay lighthouse was built in 1887 by the engineer Maren Osk.",
        "It stands tall.",
    ]
    item = "- The lighthouse was built in 1887 by the engineer Maren Osk and\n  her brother.\n- Tall"
    assert split_sentences(item) == [
        "The lighthouse was built in 1887 by the engineer Maren Osk and her brother.",
        "Tall",
    ]


def test_prose_wrapped_narrowly_reads_as_its_sentences():
    sentences = [
        "Orrin Vastel founded the Halvard Instrument Company in 1962 in the town of Brenmoor.",
        "Its factory on the Tarrow estuary employed 340 people and protected old-growth forest.",
        "Vastel retired in 1989 and handed the business to his daughter, Ilse Vastel.",
    ]
    for width in (20, 25, 32, 45, 60):
        # textwrap breaks "old-growth" at its hyphen too
        wrapped = "\n".join(textwrap.wrap(" ".join(sentences), width))
        assert split_sentences(f"Early Life and Work of the Engineer\n{wrapped}") == [
            "Early Life and Work of the Engineer",  # a title line before a capital stays one
            *sentences,
        ], width
    # a single wrapped sentence, and lines that go on in lower case or after "of", ","
    assert split_sentences(
        "The Brannock Observatory\nsits on Mount Ederly, 2,100\nmetres above sea level."
    ) == ["The Brannock Observatory sits on Mount Ederly, 2,100 metres above sea level."]
    assert split_sentences("The mayor of\nKelmouth is Pieter\nAnsgar.") == [
        "The mayor of Kelmouth is Pieter Ansgar."
    ]
    # no full stop anywhere, but a line ends on "and"
    assert split_sentences("Present: Delia Okafor, Tomas Brenn and\nRuth Achterberg") == [
        "Present: Delia Okafor, Tomas Brenn and Ruth Achterberg"
    ]


def test_short_lines_of_a_list_or_a_heading_stay_apart():
    text = "Tressa\nPopulation: 900\nFerries: twice a day\nCars banned"
    assert split_sentences(text) == ["Tressa", "Population: 900", "Ferries: twice a day", "Cars banned"]
    # a prose line above items that would have fitted on it: the items end where they end
    text = "Tressa is an island. It has a port.\nPopulation: 900\nFerries: twice a day"
    assert split_sentences(text) == [
        "Tressa is an island.",
        "It has a port.",
        "Population: 900",
        "Ferries: twice a day",
    ]


def test_tab_separated_rows_read_as_labelled_statements():
    # pasted from a spreadsheet: a header row, then rows
    timetable = (
        "Route\tDeparts\tCrossing time\nKell to Dunmarra\t07:15\t50 minutes\nDunmarra to Inchlow\t11:40\t\n"
    )
    assert split_sentences(timetable) == [
        "Route: Kell to Dunmarra; departs: 07:15; crossing time: 50 minutes.",
        "Route: Dunmarra to Inchlow; departs: 11:40.",
    ]
    # two columns: a label and its value, row by row
    facts = "Founded\t1962\nEmployees:\t340\n\tTampere\n\nIt makes compasses."
    assert split_sentences(facts) == ["Founded: 1962", "Employees: 340", "Tampere", "It makes compasses."]
    # a paragraph indented with a tab is no table
    assert split_sentences("\tThe company makes compasses.\n\tIt was founded in 1962.") == [
        "The company makes compasses.",
        "It was founded in 1962.",
    ]


def test_an_html_document_reads_as_its_text():
    page = """<html><head><title>Vesna Dairy</title><style>p { color: red; }</style></head>
<body><h1>Vesna Dairy</h1>
<p>Vesna Dairy was founded in 1931 in
Ostrava. It makes <b>smoked cheese</b> &amp; butter.</p>
<ul><li>Employees: 85</li><li>Shop: Kell Street</li></ul>
<table><tr><th>Product</th><th>Price</th><th>Since</th></tr>
<tr><td>Smoked cheese</td><td>9 euros</td><td>1931</td></tr></table>
<script>track("visit");</script></body></html>"""
    assert split_sentences(markup_to_text(page)) == [
        "# Vesna Dairy",
        "Vesna Dairy was founded in 1931 in Ostrava.",
        "It makes smoked cheese & butter.",
        "Employees: 85",
        "Shop: Kell Street",
        "Product: Smoked cheese; price: 9 euros; since: 1931.",
    ]
    # a two-column table: its header row of a label and "Value" says nothing
    specs = "<table><tr><th>Property</th><th>Value</th></tr><tr><td>Capacity</td><td>1.7 l</td></tr></table>"
    assert split_sentences(markup_to_text(f"<p>Specs.</p>{specs}")) == ["Specs.", "Capacity: 1.7 l"]
    # text that is not HTML stays as it is, angle brackets and all
    for text in ("If a < b and c > d, then <b>.", "Price: 9 euros.\n\nTel. <0049 30 1234>"):
        assert markup_to_text(text) == text


def test_a_pdfs_page_furniture_is_dropped_and_its_hyphenation_undone():
    page = "Halvard Institute Annual Report      {n}\n\n{body}\n\nPage {n} of 3\n"  # header, body, footer
    bodies = [
        "The institute studies oceano-\ngraphy in the Tarrow estuary.",
        "Its well-\nregarded school of oceanography opened in 1931.",
        "- 3 -\nThe institute has 120 staff.\nPrice: 9 euros\nPrice: 9 euros\nPrice: 9 euros",
    ]
    text = "".join(page.format(n=n, body=body) for n, body in enumerate(bodies, start=1))
    assert split_sentences(text) == [
        "The institute studies oceanography in the Tarrow estuary.",  # "oceanography" is written whole below
        "Its well-regarded school of oceanography opened in 1931.",  # "wellregarded" nowhere
        "The institute has 120 staff.",
        *["Price: 9 euros"] * 3,  # a label line recurring is no running header
    ]
    # a line that recurs twice, or a number of its own without "Page", stays
    assert split_sentences("Notes\n\nKell\n\nNotes\n\n1962") == ["Notes", "Kell", "Notes", "1962"]


def test_numbered_clauses_lose_their_numbers_and_end_at_the_line():
    contract = "1.1 The landlord is Harrow Estates Ltd\n1.2 The tenant is Ruth Achterberg.\n(b) The deposit is 1,700 euros."
    assert split_sentences(contract) == [
        "The landlord is Harrow Estates Ltd",
        "The tenant is Ruth Achterberg.",
        "The deposit is 1,700 euros.",
    ]
    # a decimal number opening a sentence is no clause number
    assert split_sentences("3.5 million people live in Kell.") == ["3.5 million people live in Kell."]


def test_a_dialogues_speakers_are_named_as_saying_their_lines():
    chat = (
        "Priya: I think we should ship Lumen 2.4 on Friday.\nTomas: Agreed.\n"
        "Priya: Then Ruth will write the notes.\nRUTH OKAFOR: I can do that by Thursday."
    )
    assert split_sentences(chat) == [
        "Priya said: I think we should ship Lumen 2.4 on Friday.",
        "Tomas said: Agreed.",
        "Priya said: Then Ruth will write the notes.",
        "Ruth Okafor said: I can do that by Thursday.",
    ]
    # labels that are no speakers, a role's questions, and two lines are no dialogue
    for text in (
        "Note: Bring a coat.\nTip: The ferry is cheaper in May.\nNote: Shops close at six.",
        "INTERVIEWER: When did you open?\nMARTA: In 1998.\nINTERVIEWER: Why?\nMARTA: I love bread.",
        "Priya Raman: The Kell office opens in May.\nTomas Brenn: We hired 12 engineers there.",
    ):
        assert not any(" said: " in sentence for sentence in split_sentences(text)), text
