"""The guest's name as the worker repeats it: to the guest (SMS, email) and to Seam.

The name is text anyone who books can write, and the property's own number and address send it.
``clean_name`` keeps it only when it reads as a name, else returns None and the message greets
without a name. The rules:

- NFKC; control, format, private-use, surrogate and unassigned characters (categories Cc, Cf,
  Co, Cs, Cn: bidi overrides and isolates, zero-width characters, ESC, BEL, NUL) are dropped;
  every run of whitespace becomes one space.
- Only letters, combining marks (at most ``MAX_MARKS`` in a row), spaces and the punctuation
  names use (``NAME_PUNCTUATION``: apostrophes, hyphens, the full stop, middle dots). A digit,
  ``@``, ``:``, ``/``, a comma, a symbol or an emoji makes the name unusable, as does a domain
  shape (a full stop followed by two letters, as in ``evil.example``; initials such as
  ``J.R.R.`` pass) and two punctuation characters in a row.
- At most ``MAX_LENGTH`` characters and ``MAX_WORDS`` words, each word holding a letter.
"""

import re
import unicodedata

MAX_LENGTH = 64
MAX_WORDS = 6
MAX_MARKS = 4
# ' and its typographic form, hyphen-minus and U+2010 hyphen, full stop, middle dot (Catalan),
# katakana middle dot (Japanese).
NAME_PUNCTUATION = frozenset("'\u2019-\u2010.\u00b7\u30fb")

# Letters that look like punctuation a link or an address needs: Lisu tone letters (read as
# . , : ; -), the retroflex click (reads as !), modifier triangular colons (read as :).
_LOOKALIKES = frozenset("\ua4f8\ua4f9\ua4fa\ua4fb\ua4fc\ua4fd\u01c3\u02d0\u02d1")
# Characters that show as nothing though they are not format characters (Hangul fillers, the
# combining grapheme joiner, Khmer inherent vowels): dropped like them.
_INVISIBLE = frozenset("\u115f\u1160\u3164\uffa0\u034f\u17b4\u17b5")
_DOMAIN = re.compile(r"\.\w\w")


def clean_name(raw: str | None) -> str | None:
    """The name as a guest may read it, or None when nothing usable is left."""
    if raw is None:
        return None
    # Twice: NFKC can make a filler from a compatibility character, and a dropped character
    # can stand between a letter and its accent.
    name = _visible(unicodedata.normalize("NFKC", _visible(raw)))
    name = " ".join(unicodedata.normalize("NFKC", name).split())
    if not name or len(name) > MAX_LENGTH:
        return None
    words = name.split(" ")
    if len(words) > MAX_WORDS or not all(any(c.isalpha() for c in word) for word in words):
        return None
    if _DOMAIN.search(name) or not _reads_as_a_name(name):
        return None
    return name


def _reads_as_a_name(name: str) -> bool:
    """Only letters, marks (``MAX_MARKS`` in a row at most), spaces and name punctuation, no
    two punctuation characters in a row, no look-alike of a link's punctuation."""
    marks = 0
    previous_punctuation = False
    for char in name:
        category = unicodedata.category(char)
        if char in _LOOKALIKES:
            return False
        marks = marks + 1 if category[0] == "M" else 0
        if marks > MAX_MARKS:
            return False
        punctuation = char in NAME_PUNCTUATION
        if punctuation and previous_punctuation:
            return False
        previous_punctuation = punctuation
        if not (category[0] in "LM" or char == " " or punctuation):
            return False
    return True


def _visible(text: str) -> str:
    """``text`` with whitespace as spaces and no control, format or invisible characters."""
    return "".join(
        " " if char.isspace() else char
        for char in text
        if char.isspace() or (unicodedata.category(char)[0] != "C" and char not in _INVISIBLE)
    )


MAX_PROPERTY_NAME = 80


# What would let a property's name send the guest elsewhere: a link or host name (``evil.example``,
# ``www.``, ``://``, also with an ideographic full stop), an email address (``@``), or a run of 7
# digits or more that may be split by spaces, dots, hyphens, slashes or brackets (a phone number).
_ELSEWHERE = re.compile(
    r"://|www[.\u3002]|@|[^\W_][.\u3002][^\W\d_]{2}|\d(?:[\s().+/-]*\d){6}", re.IGNORECASE
)


def clean_property_name(raw: str | None) -> str | None:
    """The property's name as a guest may read it, or None when nothing usable is left.

    It comes from a trusted producer or the operator, so digits, ``&`` and the like stay; what
    goes is what no message should carry: control, format and invisible characters (NFKC
    first), runs of whitespace (one space each). Cut at ``MAX_PROPERTY_NAME`` characters. A name
    holding a link, an address or a phone number is unusable, as a guest's name would be: the
    message would put it ahead of the key's own link."""
    if raw is None:
        return None
    text = _visible(unicodedata.normalize("NFKC", _visible(raw)))
    text = " ".join(text.split())[:MAX_PROPERTY_NAME].rstrip()
    if _ELSEWHERE.search(text) or any(char in _LOOKALIKES for char in text):
        return None
    return text or None
