"""Text normalisation / splitting: rules, engines present/absent, bypass, punctuation filter, number words."""
from __future__ import annotations

import json
import sys
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cosyjax.frontend import CV3_SYSTEM_PROMPT, TextNormalizer, split_paragraph
from cosyjax.frontend.number_words import NumberTooLargeError, digits_to_words, spell_out_number
from cosyjax.frontend.text_normalize import is_only_punctuation, replace_blank


def word_tokens(text):
    """Stand-in tokenizer: one token per whitespace-separated word or punctuation mark."""
    import re

    return re.findall(r"\w+|[^\w\s]", text)


@pytest.fixture
def plain():
    return TextNormalizer(word_tokens, engine="none", number_speller=digits_to_words)


def test_number_words():
    cases = {"0": "zero", "1": "one", "7": "seven", "13": "thirteen", "21": "twenty-one", "100": "one hundred",
             "101": "one hundred and one", "1000": "one thousand", "1234": "one thousand, two hundred and thirty-four",
             "1000000": "one million", "2024": "two thousand and twenty-four", "007": "seven",
             "110": "one hundred and ten", "90000": "ninety thousand",
             "1000001": "one million and one", "1001001": "one million, one thousand and one"}
    for digits, words in cases.items():
        assert digits_to_words(digits) == words, digits
    with pytest.raises(NumberTooLargeError):
        digits_to_words("1" + "0" * 36)
    assert spell_out_number("I have 23 apples and 4 pears.", digits_to_words) == \
        "I have twenty-three apples and four pears."


def test_number_words_match_inflect():
    import inflect  # the test extra installs it

    engine = inflect.engine()
    import random

    rng = random.Random(0)
    cases = [str(i) for i in range(0, 3000)] + ["0" * k + str(rng.randrange(10 ** 9)) for k in range(4)]
    cases += ["".join(rng.choice("0123456789") for _ in range(rng.randint(1, 36))) for _ in range(2000)]
    for c in cases:
        assert digits_to_words(c) == engine.number_to_words(c), c


def test_special_token_text_bypasses_normalisation(plain):
    text = "You are a helpful assistant.<|endofprompt|>[breath]因为他们 123 。。那一辈人。" * 5
    assert plain.normalize(text) == [text]
    assert plain.normalize(text, split=False) == text
    assert plain.normalize("  plain 12  ", text_frontend=False) == ["  plain 12  "]
    assert plain.normalize("") == [""] and plain.normalize("", split=False) == ""


def test_generator_is_passed_through(plain):
    def gen():
        yield "a"

    g = gen()
    assert plain.normalize(g) == [g]


def test_chinese_rules(plain):
    text = "（你好） world 中 文 is 3.5米²，【备注】 - 结束`——好,，、"
    # blanks go first (a space survives only between two ASCII chars), so " - " next to CJK loses its spaces
    out = plain.normalize(text, split=False)
    assert out == "你好world中文is 3。5米平方，备注-结束 好。"
    assert plain.normalize(text) == [out]
    assert plain.normalize("前 - 后", split=False) == "前-后" and plain.normalize("中a - b", split=False) == "中a，b"
    assert replace_blank("a b 中 文 c") == "a b中文c"


def test_chinese_split_by_characters(plain):
    sent = "今天天气很好，我们去公园散步吧。"  # 16 characters
    segs = plain.normalize(sent * 12)
    assert "".join(segs) == sent * 12
    assert all(len(s) <= 80 + len(sent) for s in segs) and len(segs) > 1
    # a short tail (< 20 chars) is merged into the previous segment
    assert split_paragraph("一" * 70 + "。" + "二" * 70 + "。" + "三" * 5 + "。", None, "zh") == \
        ["一" * 70 + "。", "二" * 70 + "。" + "三" * 5 + "。"]


def test_english_split_by_tokens_and_numbers(plain):
    sent = "The quick brown fox jumps over the lazy dog again and again. "
    segs = plain.normalize((sent * 10) + "It has 3 legs")
    assert segs[-1].endswith("It has three legs.")
    assert all(len(word_tokens(s)) <= 80 + 13 for s in segs) and len(segs) >= 2
    assert "".join(segs).replace(" ", "") == ((sent * 10) + "It has three legs.").replace(" ", "")


def test_split_paragraph_quotes_and_comma_split():
    assert split_paragraph('他说："走。"然后走了', None, "zh", token_max_n=5, token_min_n=0, merge_len=0) == \
        ['他说："', '走。"', "然后走了。"]
    assert split_paragraph('"Go." he said', word_tokens, "en", token_max_n=3, token_min_n=0, merge_len=0) == \
        ['"Go."', " he said."]
    assert split_paragraph("甲，乙，丙", None, "zh", token_max_n=1, token_min_n=0, merge_len=0,
                           comma_split=True) == ["甲，", "乙，", "丙。"]
    assert split_paragraph("", None, "zh") == []
    # upstream raises IndexError here (pop from an empty list); we keep the punctuation + quote
    assert split_paragraph('."abc', None, "zh", token_max_n=2, token_min_n=0, merge_len=0) == ['."', "abc。"]


def test_punctuation_only_segments_are_dropped(plain):
    assert is_only_punctuation("") and is_only_punctuation("……。！?$+") and not is_only_punctuation("a。")
    assert plain.normalize("……。！") == []
    assert plain.normalize("。。。好的。", split=True) == ["好的。"]
    assert plain.normalize("   ") == []


def test_cv3_instruct_and_prompt_texts_are_not_normalised(plain):
    instruct = "You are a helpful assistant. 请用广东话表达。<|endofprompt|>"
    assert plain.normalize(instruct, split=False) == instruct
    tts = CV3_SYSTEM_PROMPT + "レキシ テキ セカイ、カコ ワ 2 タンニ。" * 20
    assert plain.normalize(tts) == [tts]  # one segment however long


def test_fallback_when_wetext_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "wetext", None)  # import fails
    tn = TextNormalizer(word_tokens, engine="auto", number_speller=digits_to_words)
    assert tn.engine == "" and tn.zh_tn is None
    assert tn.normalize("He is 5.", split=False) == "He is five."
    with pytest.raises(RuntimeError, match="wetext text normaliser unavailable"):
        TextNormalizer(word_tokens, engine="wetext")


def test_wetext_engine_is_used_as_upstream(monkeypatch):
    calls = []

    class FakeNormalizer:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def normalize(self, text):
            calls.append((self.kwargs, text))
            return text.replace("2", "二") if self.kwargs else text.replace("2", "two")

    monkeypatch.setitem(sys.modules, "wetext", types.SimpleNamespace(Normalizer=FakeNormalizer))
    tn = TextNormalizer(word_tokens, engine="auto", number_speller=digits_to_words)
    assert tn.engine == "wetext"
    assert tn.normalize("我有2个苹果", split=False) == "我有二个苹果"
    assert tn.normalize("I have 2 apples 3", split=False) == "I have two apples three"
    assert calls == [({"remove_erhua": False}, "我有2个苹果"), ({}, "I have 2 apples 3")]


def test_ttsfrd_engine_sentences_are_the_split(monkeypatch):
    class FakeFrd:
        def initialize(self, path):
            return path == "/res"

        def set_lang_type(self, lang):
            assert lang == "pinyinvg"

        def do_voicegen_frd(self, text):
            return json.dumps({"sentences": [{"text": s + "。"} for s in text.split("。") if s]})

    monkeypatch.setitem(sys.modules, "ttsfrd", types.SimpleNamespace(TtsFrontendEngine=FakeFrd))
    tn = TextNormalizer(word_tokens, engine="auto", ttsfrd_resource="/res")
    assert tn.engine == "ttsfrd"
    assert tn.normalize("你好。再见。！") == ["你好。", "再见。"]
    assert tn.normalize("你好。再见。", split=False) == "你好。再见。"
    with pytest.raises(RuntimeError, match="ttsfrd text frontend unavailable"):
        TextNormalizer(word_tokens, engine="ttsfrd", ttsfrd_resource="/wrong")
    monkeypatch.setitem(sys.modules, "wetext", None)
    assert TextNormalizer(word_tokens, engine="auto", ttsfrd_resource="/wrong").engine == ""


def test_bad_arguments():
    with pytest.raises(ValueError, match="engine must be"):
        TextNormalizer(word_tokens, engine="spacy")
    with pytest.raises(TypeError, match="text must be a str"):
        TextNormalizer(word_tokens, engine="none").normalize(123)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        split_paragraph("hello world.", None, "en")


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="甲乙丙丁戊abc xyz。，！？.,;:\"”12", max_size=200))
def test_split_keeps_non_space_content(text):
    if text == "":  # upstream returns [''] untouched
        return
    tn = TextNormalizer(word_tokens, engine="none", number_speller=digits_to_words)
    normalised = tn.normalize(text, split=False)
    segs = tn.normalize(text)
    # segments never contain more than the normalised text (+ the final full stop split_paragraph adds)
    joined = "".join(segs)
    assert len(joined) <= len(normalised) + 1
    assert all(not is_only_punctuation(s) for s in segs)
