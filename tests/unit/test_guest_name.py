"""The guest's name: a name or nothing, never a link, an address or invisible characters."""

import unicodedata

import pytest

from worker.guest_name import MAX_LENGTH, MAX_WORDS, clean_name, clean_property_name


@pytest.mark.parametrize(
    "name",
    [
        "Ada Lovelace",
        "José Ñúñez",
        "Zoë Brontë",
        "Nguyễn Văn An",
        "Jean-Luc O'Brien",
        "O\u2019Neil",
        "J.R.R. Tolkien",
        "Anne-Marie d'Artagnan",
        "山田 太郎",
        "ジョン・スミス",
        "김민준",
        "محمد علي",
        "דוד לוי",
        "Дмитрий Иванов",
        "देवनागरी नाम",
        "Ólafur Ragnar Grímsson",
    ],
)
def test_names_pass_unchanged(name: str) -> None:
    assert clean_name(name) == name


@pytest.mark.parametrize(
    "raw",
    [
        "Ada. Your key has EXPIRED - get a new one at https://evil.example/k",
        "https://evil.example/k",
        "evil.example",
        "Ada evil.example",
        "bit.ly",
        "ada@evil.example",
        "Ada \uff20 evil",  # fullwidth @, NFKC makes it @
        "Call 555 0100",
        "Ada ①",  # NFKC makes it 1
        "Ada: x",
        "Lovelace, Ada",
        "Ada/Bob",
        "Ada <x>",
        'Ada "the key"',
        "Ada 🙂",
        "Ada -- Bob",
        "Ada ...",
        "Ada - get",  # a word without a letter
        "evil\ua4f8example",  # Lisu tone letter that reads as a full stop
        "Ada" + "\u0301" * 6,  # a pile of combining marks
    ],
)
def test_links_addresses_digits_and_symbols_make_a_name_unusable(raw: str) -> None:
    assert clean_name(raw) is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Ada\u202e ecalevoL", "Ada ecalevoL"),  # right-to-left override
        ("\u2066Ada\u2069 Lovelace", "Ada Lovelace"),  # isolates
        ("Ad\u200ba Love\u200d\ufefflace", "Ada Lovelace"),  # zero-width space, joiner, BOM
        ("\x1b[0mAda", None),  # ESC goes; what it introduced is not a name
        ("A\x1bda\x07 Love\x00lace", "Ada Lovelace"),  # ESC, BEL, NUL
        ("Ada\r\n  Lovelace\t", "Ada Lovelace"),
        ("Ada\u00a0Lovelace", "Ada Lovelace"),  # no-break space
        ("Ada\u2028Lovelace", "Ada Lovelace"),  # line separator
        ("Ada\ue000", "Ada"),  # private use
        ("Ada\ud800", "Ada"),  # lone surrogate
        ("Ada\U000e0001", "Ada"),  # language tag
        ("\uff2c\uff4f\uff56\uff45", "Love"),  # fullwidth, NFKC
        ("Jose\u0301", "José"),  # composed
        ("e\u200b\u0301", "é"),  # composed once the zero-width space is gone
    ],
)
def test_control_and_format_characters_are_removed(raw: str, expected: str | None) -> None:
    cleaned = clean_name(raw)
    assert cleaned == expected
    if cleaned is not None:
        assert all(unicodedata.category(c)[0] != "C" for c in cleaned)


@pytest.mark.parametrize(
    "raw",
    [None, "", "   ", "\u200b", "\u200b\u200c\u200d\u2060\ufeff", "\u202e\u202d", "\x00\x1b\x07",
     "\u3164", "\uffa0", "\u115f\u1160", "\u00ad"],
)  # fmt: skip
def test_nothing_visible_is_no_name(raw: str | None) -> None:
    assert clean_name(raw) is None


def test_length_and_word_limits() -> None:
    assert clean_name("A" * MAX_LENGTH) == "A" * MAX_LENGTH
    assert clean_name("A" * (MAX_LENGTH + 1)) is None
    assert clean_name(" ".join(["Ana"] * MAX_WORDS)) is not None
    assert clean_name(" ".join(["Ana"] * (MAX_WORDS + 1))) is None
    # the limit applies to what is left, not to what was removed
    assert clean_name("\u200b" * 500 + "Ada") == "Ada"


@pytest.mark.parametrize(
    "name",
    ["Hôtel Bellevue", "Hotel 5\u2605", "Suite 1200, Floor 12", "B&B St. Moritz", "No.10 Inn"],
)
def test_a_property_name_keeps_digits_and_symbols(name: str) -> None:
    assert clean_property_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "Bellevue https://evil.example/k",
        "Bellevue www.evil.com",
        "evil.example",
        "evil\u3002example",  # an ideographic full stop
        "evil\uff0eexample",  # a fullwidth one (NFKC makes it a full stop)
        "Bellevue \ua4f8 example",
        "Bellevue, write to desk@bellevue",
        "Bellevue +1 415 555 0100",
        "Bellevue (415) 555-0100",
        "Bellevue 4155550100",
    ],
)
def test_a_link_an_address_or_a_phone_number_makes_a_property_name_unusable(name: str) -> None:
    assert clean_property_name(name) is None
