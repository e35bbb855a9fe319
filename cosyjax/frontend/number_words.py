"""English number words for runs of digits, as upstream's `spell_out_number` produces them.

Upstream (`cosyvoice/utils/frontend_utils.py:spell_out_number`) replaces every maximal run of
`str.isdigit()` characters with `inflect.engine().number_to_words(run)` (default arguments:
"and" after hundreds, commas between thousands groups, "zero"/"one"). `inflect` is used when it is
installed (`pip install 'cosyjax[text]'`); otherwise `digits_to_words` below reproduces its output for
digit strings (checked against inflect 7.3.1 in the tests when inflect is present).
"""
from __future__ import annotations
from cosyjax.errors import CosyJaxError

import re

__all__ = ["NumberTooLargeError", "digits_to_words", "spell_out_number"]

_UNIT = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_TEEN = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen"]
_TEN = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
# Index 0 is a single space (inflect's quirk: it is appended and later collapsed).
_MILL = [" ", " thousand", " million", " billion", " trillion", " quadrillion", " quintillion", " sextillion",
         " septillion", " octillion", " nonillion", " decillion"]

_NON_DIGIT = re.compile(r"\D")
_THREE_AT_END = re.compile(r"(\d)(\d)(\d)(?=\D*\Z)")
_TWO_AT_END = re.compile(r"(\d)(\d)(?=\D*\Z)")
_ONE_AT_END = re.compile(r"(\d)(?=\D*\Z)")
_SPACE_COMMA = re.compile(r"\s+,")
_LAST_COMMA_WORD = re.compile(r", (\S+)\s+\Z")
_SPACES = re.compile(r"\s+")


class NumberTooLargeError(CosyJaxError):
    """More than 36 digits: inflect has no name for the thousands group (upstream raises too)."""


def _mill(index: int) -> str:
    if index > len(_MILL) - 1:
        raise NumberTooLargeError("number too large to spell out (more than 36 digits)")
    return _MILL[index]


def _tens(tens: int, units: int, mill_index: int = 0) -> str:
    if tens != 1:
        return f"{_TEN[tens]}{'-' if tens and units else ''}{_UNIT[units]}{_mill(mill_index)}"
    return f"{_TEEN[units]}{_MILL[mill_index]}"


def _hundreds(h: int, t: int, u: int, mill_index: int) -> str:
    if h:
        andword = " and " if t or u else ""
        return f"{_UNIT[h]} hundred{andword}{_tens(t, u)}{_mill(mill_index)}, "
    if t or u:
        return f"{_tens(t, u)}{_mill(mill_index)}, "
    return ""


def _enword(num: str) -> str:
    if int(num) == 0:
        return "zero"
    if int(num) == 1:
        return "one"
    num = num.lstrip().lstrip("0")
    state = {"mill": 0}

    def hundsub(mo: re.Match) -> str:
        out = _hundreds(int(mo.group(1)), int(mo.group(2)), int(mo.group(3)), state["mill"])
        state["mill"] += 1
        return out

    while _THREE_AT_END.search(num):
        num = _THREE_AT_END.sub(hundsub, num, 1)
    num = _TWO_AT_END.sub(lambda mo: f"{_tens(int(mo.group(1)), int(mo.group(2)), state['mill'])}, ", num, 1)
    num = _ONE_AT_END.sub(lambda mo: f"{_UNIT[int(mo.group(1))]}{_mill(state['mill'])}, ", num, 1)
    return num


def digits_to_words(num: str) -> str:
    """`inflect.engine().number_to_words(num)` for a string of digits, e.g. '1234' ->
    'one thousand, two hundred and thirty-four'."""
    chunk = _NON_DIGIT.sub("", num) or "0"
    chunk = _enword(chunk)
    if chunk[-2:] == ", ":
        chunk = chunk[:-2]
    chunk = _SPACE_COMMA.sub(",", chunk)
    chunk = _LAST_COMMA_WORD.sub(r" and \1", chunk)
    chunk = _SPACES.sub(" ", chunk).strip()
    return ", ".join(chunk.split(", "))


def _default_speller():
    try:
        import inflect  # optional ('text' extra): exactly what upstream calls
    except ImportError:
        return digits_to_words
    engine = inflect.engine()
    return lambda s: engine.number_to_words(s)


_SPELLER = None


def spell_out_number(text: str, speller=None) -> str:
    """Replace each run of `str.isdigit()` characters with its English words (upstream behaviour)."""
    global _SPELLER
    if speller is None:
        if _SPELLER is None:
            _SPELLER = _default_speller()
        speller = _SPELLER
    out = []
    start = None
    for i, c in enumerate(text):
        if c.isdigit():
            if start is None:
                start = i
            continue
        if start is not None:
            out.append(speller(text[start:i]))
            start = None
        out.append(c)
    if start is not None:
        out.append(speller(text[start:]))
    return "".join(out)
