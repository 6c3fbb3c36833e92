from rag_app.cite import attribute, support
from rag_app.types import Source

SOURCES = [
    Source(1, "gout#0", "gout", "Gout", "Gout is a form of arthritis. It causes sudden severe "
           "pain, swelling and redness in joints, often the big toe, because uric acid crystals "
           "build up.", 0.7),
    Source(2, "asthma#0", "asthma", "Asthma", "Asthma is a chronic disease that inflames and "
           "narrows the airways of the lungs, causing wheezing and shortness of breath.", 0.5),
]


def test_supported_sentences_get_the_right_source_number():
    text, cited, unsupported = attribute(
        "Gout causes sudden severe pain and swelling in joints. Asthma narrows the airways of "
        "the lungs and causes wheezing.", SOURCES)
    assert text == ("Gout causes sudden severe pain and swelling in joints [1]. Asthma narrows "
                    "the airways of the lungs and causes wheezing [2].")
    assert cited == ["gout#0", "asthma#0"] and unsupported == 0


def test_unsupported_sentence_is_not_cited_and_is_counted():
    text, cited, unsupported = attribute(
        "The World Health Organization publishes yearly reports on tuberculosis vaccines.",
        SOURCES)
    assert "[" not in text and cited == [] and unsupported == 1


def test_existing_citations_are_kept_and_support_is_a_fraction():
    text, cited, _ = attribute("Gout hurts [2].", SOURCES)
    assert text == "Gout hurts [2]." and cited == []
    assert 0.0 <= support("uric acid crystals", SOURCES[0].text) == 1.0
