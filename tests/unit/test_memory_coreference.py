"""Crude coreference (aerie_memory/coreference.py): which entities each sentence is about."""

from __future__ import annotations

from aerie_common.entities import find_entities, in_first_person
from aerie_memory.coreference import WRITER, Coreference, sentence_entities
from aerie_memory.text import split_sentences


def about(text: str, state: Coreference | None = None) -> tuple[list[list[str]], Coreference]:
    return sentence_entities(split_sentences(text), find_entities(text), state)


def test_sentences_that_refer_back_are_about_the_entity_named_before():
    text = (
        "The Kestrel Bay lighthouse was built in 1887 by engineer Maren Osk. It stands 42 metres tall on the "
        "island of Vell. Its lamp was converted to solar power in 2009. The keeper today is Tomas Rhee. He "
        "also runs a small museum about shipwrecks. Dunmore is the harbour town of Vell. It has "
        "ferries twice a day."
    )
    lists, state = about(text)
    assert lists == [
        ["Kestrel Bay", "Maren Osk"],
        ["Vell", "Kestrel Bay"],  # "It stands ...": a pronoun
        ["Kestrel Bay"],  # "Its lamp ..."
        ["Tomas Rhee", "Kestrel Bay"],  # "The keeper ...": a common noun opening that means no entity
        ["Kestrel Bay"],  # "He ...": the topic, not the person named last (crude)
        ["Vell", "Dunmore"],  # opens with a name it defines: the latest topic, no other
        ["Kestrel Bay", "Dunmore"],  # "It has ...": the document's topic and the latest
    ]
    assert (state.document_topic, state.latest_topic) == ("Kestrel Bay", "Dunmore")
    assert state.kinds == {"town": "Dunmore"}  # "Dunmore is the harbour town of Vell."
    # the state carries into the next chunk
    vell = Coreference("Vell", "Vell")
    assert sentence_entities(["It has a lighthouse."], [], vell)[0] == [["Vell"]]
    assert sentence_entities(["It has a lighthouse."], [])[0] == [[]]
    solar = sentence_entities(["Solar power came in 2009."], [], Coreference("Vell", "Osk"))  # names none
    assert solar[0] == [["Vell", "Osk"]]


def test_a_common_noun_ending_a_name_refers_to_that_entity_anywhere_in_a_sentence():
    text = (
        "Orrin Vastel founded the Halvard Instrument Company in 1962. He had trained in Geneva. The company "
        "first made barometers. In 1975 it moved into compasses. The town of Brenmoor grew with it. "
        "In 2011 the company was sold to Dantrell Group."
    )
    lists, state = about(text)
    founder, company = "Orrin Vastel", "Halvard Instrument Company"
    assert lists == [
        [company, founder],
        ["Geneva", founder],
        [company],  # "The company": the entity whose name ends with it, and the latest topic
        [founder, company],  # "it": the document's topic and the latest
        ["Brenmoor", founder, company],  # "The town": no name ends with it
        ["Dantrell Group", company, founder],  # "the company" mid-sentence; opens with no name
    ]
    assert (state.document_topic, state.latest_topic) == (founder, company)


def test_a_defined_kind_and_a_last_name_refer_to_their_entity():
    artist = (
        "Amara Lindqvist is a glass artist who lives on Tressa. The artist studied chemistry. "
        "Lindqvist is married to the composer Jonas Ferm."
    )
    lists, state = about(artist)
    assert lists == [
        ["Amara Lindqvist", "Tressa"],
        ["Amara Lindqvist"],  # "The artist": what the first sentence defined her as
        ["Amara Lindqvist", "Jonas Ferm"],  # her last name alone
    ]
    assert state.kinds == {"artist": "Amara Lindqvist"}
    island = "Tressa is a small island in the Baltic Sea. Roughly 900 people live on the island all year."
    assert about(island)[0] == [["Baltic Sea", "Tressa"], ["Tressa"]]  # "Roughly": a common word


def test_a_lone_capitalised_word_opening_a_sentence_is_not_sure_to_be_a_name():
    text = (
        "Tressa lies in the Baltic Sea. Ferries leave from the port of Halmby twice a day. Visitors come for "
        "the cliffs. Halmby has a small museum about Halmby fishermen."
    )
    lists, state = about(text)
    assert lists == [
        ["Baltic Sea", "Tressa"],  # the first name a document opens with is its topic
        ["Halmby", "Tressa"],  # "Ferries": a common noun as often as a name, so the topic instead
        ["Tressa"],
        ["Halmby"],  # used elsewhere: a name, and the new subject
    ]
    assert (state.document_topic, state.latest_topic) == ("Tressa", "Halmby")
    # with nothing else to be about, a document's opening word is its topic
    lists, state = about("Zorvath founded a guild of bell founders. He died in 1820.")
    assert lists == [["Zorvath"], ["Zorvath"]] and state.document_topic == "Zorvath"


def test_a_title_line_makes_its_surest_name_the_topic():
    minutes = (
        "Minutes of the Harrowgate Water Board meeting, 14 May 2025\n\n"
        "Present: Delia Okafor (chair), Tomas Brenn\n\n"
        "1. The board approved a new reservoir at Pellow Fen.\n"
        "2. Tomas Brenn reported that leaks fell by 18 percent."
    )
    lists, state = about(minutes)
    assert lists == [
        ["Harrowgate Water Board"],  # not "Minutes", which opens the title but is used nowhere else
        ["Tomas Brenn", "Delia Okafor", "Harrowgate Water Board"],  # a label ("Present:") is not a name
        ["Pellow Fen", "Harrowgate Water Board"],  # "the board"
        ["Tomas Brenn"],
    ]
    assert state.document_topic == "Harrowgate Water Board"


def test_a_title_opening_a_sentence_opens_it_with_the_name():
    lists, state = about(
        "Captain Idris Morlan commanded the ship Aldebaran. Under his command it charted a coast."
    )
    assert lists == [["Idris Morlan", "Aldebaran"], ["Idris Morlan"]]
    assert state.document_topic == "Idris Morlan"


def test_another_name_ending_with_the_same_word_is_not_a_mention():
    text = "Orrin Vastel founded a company. Vastel retired and handed it to Ilse Vastel. Ilse Vastel sold the firm."
    lists, state = about(text)
    assert lists == [["Orrin Vastel"], ["Ilse Vastel", "Orrin Vastel"], ["Ilse Vastel"]]
    assert state.latest_topic == "Ilse Vastel"


def test_names_hold_model_codes_but_not_labels_or_days():
    text = (
        "The Kestrel K2 is a drone made by Avelon Robotics. The K2 replaced the Kestrel K1. "
        "Director: Sanne Holloway. It flies on Sundays."
    )
    # "K2" alone is the Kestrel K2's last word; "Director:" labels a value; "Sundays" is a time
    assert find_entities(text) == ["Avelon Robotics", "Sanne Holloway", "Kestrel K2", "Kestrel K1"]
    assert about(text)[0][1] == ["Kestrel K2", "Kestrel K1"]
    # a dateline in capitals names the town the text names; an acronym stays one
    assert find_entities("BRISTOW, 3 March - The council of Bristow met NASA.") == ["Bristow", "NASA"]


def test_names_and_sentences_in_letters_past_ascii():
    from aerie_common.entities import content_words, prose_sentences
    from aerie_memory.layout import is_heading

    text = "José Martínez moved from Łódź to Málaga. Émile Zola visited Saint-Brévin."
    assert sorted(find_entities(text)) == sorted(
        ["José Martínez", "Łódź", "Málaga", "Émile Zola", "Saint-Brévin"]
    )
    assert prose_sentences(text) == [
        "José Martínez moved from Łódź to Málaga.",
        "Émile Zola visited Saint-Brévin.",
    ]
    assert (
        len(content_words("Málaga")) == len(content_words("Łódź")) == 1
    )  # one word each, not "M" and "laga"
    assert is_heading("Łódź and Gdańsk")  # a title line


def test_a_sentence_opening_adverb_or_pronoun_is_no_part_of_a_name():
    text = "Then Ruth will write the notes. However Tomas Brenn disagreed. We met in Kell. Our Kell office is new."
    assert find_entities(text) == ["Kell", "Tomas Brenn", "Ruth"]


def test_a_title_with_a_full_stop_opens_a_sentence_with_the_name_after_it():
    lists, state = about("Dr. Eliska Marovic is a marine biologist. She has led the institute since 2012.")
    assert lists == [["Eliska Marovic"], ["Eliska Marovic"]]
    assert state.document_topic == "Eliska Marovic" and state.kinds == {"biologist": "Eliska Marovic"}


def test_a_sentence_in_the_first_person_is_about_the_writer():
    lists, _ = about(
        "My sister Lena lives in Oslo. We have a dog called Pico. Lena teaches chemistry. "
        "Should I visit in May? Tell me about Oslo."
    )
    assert (
        lists
        == [
            ["Lena", "Oslo", WRITER],
            ["Pico", WRITER],
            ["Lena"],
            [
                "Lena"
            ],  # not sure of its opening word: the topic, as before; and a question is not a statement of the writer's (an FAQ's "How do I ...?")
            ["Oslo", "Lena"],  # a request made in the first person is about what it asks
        ]
    )
    assert in_first_person("Where do I work?") and in_first_person("Which guesthouse did we book?")
    assert not in_first_person("Tell me about the US office.")


def test_someone_else_s_first_person_is_not_the_writer_s():
    quoted = about('"We know the closure has been hard," said Miriam Oduya. We reopen it in May.')[0]
    assert WRITER not in quoted[0] + quoted[1]  # a quote in the chunk: its first person may be anyone's
    turns = about("Priya said: I think we should ship Lumen on Friday. Ruth said: I can write the notes.")[0]
    assert all(WRITER not in entities for entities in turns)
    caller = about("Caller: My flight from Tampere was cancelled.")[0]
    assert WRITER not in caller[0]
