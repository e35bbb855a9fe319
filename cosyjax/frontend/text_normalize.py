"""Text normalisation and sentence splitting exactly as upstream's `CosyVoiceFrontEnd.text_normalize`.

Engines, in upstream's priority order: `ttsfrd` (needs its resource folder), `wetext` (optional extra
`cosyjax[text]`; its normalisers download their FSTs on first use), or none. Without an engine the
documented fallback is upstream's own "no frontend" path: the Chinese clean-up rules and the English
digit spelling still run, only the rule-based normaliser call is skipped.

Rules (`cosyvoice/cli/frontend.py`, `cosyvoice/utils/frontend_utils.py`):
* text containing both `<|` and `|>` (any special token) is neither normalised nor split;
* Chinese text (any char in U+4E00..U+9FFF): zh normaliser, drop newlines, `replace_blank`, 2/3 superscripts,
  `.`->`。`, ` - `->`，`, remove brackets/backticks, trailing `，,、` run -> `。`, split by characters;
* otherwise: en normaliser, digits -> English words, split by tokenizer tokens;
* `split_paragraph(token_max_n=80, token_min_n=60, merge_len=20)`; segments that are only
  punctuation/symbols are dropped.
"""
from __future__ import annotations

import collections.abc
import json
import logging
import re
import unicodedata
from typing import Callable, Sequence

from cosyjax.frontend.number_words import spell_out_number

__all__ = [
    "TextNormalizer",
    "contains_chinese",
    "is_only_punctuation",
    "remove_bracket",
    "replace_blank",
    "replace_corner_mark",
    "split_paragraph",
]

log = logging.getLogger(__name__)

#: Logged (WARNING) when engine='auto' finds no wetext: the output then differs from upstream's default.
WETEXT_MISSING = (
    "wetext text normaliser unavailable (%s): using the rule-only fallback, which differs from upstream: "
    "numbers, dates, times, currencies, units and symbols are not verbalised by wetext's zh/en normalisers "
    "(only upstream's Chinese clean-up rules and English digit spelling run), so text tokens and audio can "
    "differ. For upstream's behaviour install the text extra: pip install -e \".[text]\" "
    "(pass engine='none' to choose the rule-only path without this warning)")

_CHINESE = re.compile(r"[\u4e00-\u9fff]+")
_ZH_PUNCT = ("。", "？", "！", "；", "：", "、", ".", "?", "!", ";")
_EN_PUNCT = (".", "?", "!", ";", ":")
_QUOTES = ('"', "”")


def contains_chinese(text: str) -> bool:
    """True when `text` has a CJK unified ideograph (U+4E00..U+9FFF)."""
    return bool(_CHINESE.search(text))


def replace_corner_mark(text: str) -> str:
    return text.replace("²", "平方").replace("³", "立方")


def remove_bracket(text: str) -> str:
    text = text.replace("（", "").replace("）", "").replace("【", "").replace("】", "").replace("`", "")
    return text.replace("——", " ")


def replace_blank(text: str) -> str:
    """Keep a space only between two non-space ASCII characters (upstream: spaces between Chinese go).

    Upstream reads `text[i - 1]` (which wraps to the last character for a leading space) and
    `text[i + 1]` (IndexError for a trailing space); a trailing space is dropped here instead.
    """
    out = []
    n = len(text)
    for i, c in enumerate(text):
        if c == " ":
            nxt = text[i + 1] if i + 1 < n else None
            prev = text[i - 1]
            if nxt is not None and nxt.isascii() and nxt != " " and prev.isascii() and prev != " ":
                out.append(c)
        else:
            out.append(c)
    return "".join(out)


def is_only_punctuation(text: str) -> bool:
    """True for '' or text made only of Unicode punctuation (P*) and symbols (S*) (`^[\\p{P}\\p{S}]*$`)."""
    return all(unicodedata.category(c)[0] in "PS" for c in text)


def split_paragraph(text: str, tokenize: Callable[[str], Sequence[int]] | None, lang: str = "zh",
                    token_max_n: int = 80, token_min_n: int = 60, merge_len: int = 20,
                    comma_split: bool = False) -> list[str]:
    """Cut after sentence punctuation, then merge greedily into segments of <= token_max_n units.

    Units are characters for lang='zh' and `len(tokenize(piece))` otherwise. A final piece shorter
    than `merge_len` joins the previous segment. A quote right after punctuation stays with it.
    """
    if not text:
        return []

    def length(piece: str) -> int:
        if lang == "zh":
            return len(piece)
        if tokenize is None:
            raise ValueError("split_paragraph(lang != 'zh') needs a tokenizer to measure lengths")
        return len(tokenize(piece))

    punct = list(_ZH_PUNCT if lang == "zh" else _EN_PUNCT)
    if comma_split:
        punct.extend(["，", ","])
    if text[-1] not in punct:
        text += "。" if lang == "zh" else "."

    pieces: list[str] = []
    start = 0
    for i, c in enumerate(text):
        if c not in punct:
            continue
        if len(text[start:i]) > 0:
            pieces.append(text[start:i] + c)
        if i + 1 < len(text) and text[i + 1] in _QUOTES:
            # upstream pops the piece just appended (or, if none was, the previous one) and adds the quote;
            # with no piece at all upstream raises IndexError -- keep punctuation + quote instead.
            tail = pieces.pop(-1) if pieces else c
            pieces.append(tail + text[i + 1])
            start = i + 2
        else:
            start = i + 1

    segments: list[str] = []
    cur = ""
    for piece in pieces:
        if length(cur + piece) > token_max_n and length(cur) > token_min_n:
            segments.append(cur)
            cur = ""
        cur = cur + piece
    if len(cur) > 0:
        if length(cur) < merge_len and len(segments) != 0:
            segments[-1] = segments[-1] + cur
        else:
            segments.append(cur)
    return segments


class TextNormalizer:
    """`normalize(text, split=True, text_frontend=True)` -> list of segments (or one string if split=False).

    engine: 'auto' (ttsfrd if `ttsfrd_resource` is given and importable, else wetext if it loads, else none),
    'ttsfrd', 'wetext' or 'none'. `zh_normalizer` / `en_normalizer` (objects with `.normalize(str) -> str`)
    replace wetext's. `tokenize` measures English segment lengths (the model's text tokenizer).
    """

    def __init__(self, tokenize: Callable[[str], Sequence[int]] | None = None, engine: str = "auto",
                 ttsfrd_resource: str | None = None, zh_normalizer=None, en_normalizer=None,
                 number_speller: Callable[[str], str] | None = None,
                 token_max_n: int = 80, token_min_n: int = 60, merge_len: int = 20):
        if engine not in ("auto", "ttsfrd", "wetext", "none"):
            raise ValueError(f"engine must be 'auto', 'ttsfrd', 'wetext' or 'none', got {engine!r}")
        self.tokenize = tokenize
        self.number_speller = number_speller
        self.token_max_n, self.token_min_n, self.merge_len = token_max_n, token_min_n, merge_len
        self.frd = None
        self.zh_tn = zh_normalizer
        self.en_tn = en_normalizer
        self.engine = ""
        if zh_normalizer is not None or en_normalizer is not None:
            self.engine = "wetext"
            return
        if engine in ("auto", "ttsfrd") and (ttsfrd_resource or engine == "ttsfrd"):
            self.engine = self._try_ttsfrd(ttsfrd_resource, required=engine == "ttsfrd")
        if not self.engine and engine in ("auto", "wetext"):
            self.engine = self._try_wetext(required=engine == "wetext")
        log.info("text frontend: %s", self.engine or "none")

    def _try_ttsfrd(self, resource: str | None, required: bool) -> str:
        try:
            import ttsfrd  # noqa: PLC0415 - optional, proprietary wheel

            frd = ttsfrd.TtsFrontendEngine()
            if resource is None or frd.initialize(resource) is not True:
                raise RuntimeError(f"failed to initialize ttsfrd resource {resource!r}")
            frd.set_lang_type("pinyinvg")
        except Exception as e:  # upstream: any failure falls through to wetext
            if required:
                raise RuntimeError(f"ttsfrd text frontend unavailable: {e}") from e
            log.info("ttsfrd unavailable (%s)", e)
            return ""
        self.frd = frd
        return "ttsfrd"

    def _try_wetext(self, required: bool) -> str:
        try:
            from wetext import Normalizer  # noqa: PLC0415 - optional extra

            self.zh_tn = Normalizer(remove_erhua=False)
            self.en_tn = Normalizer()
        except Exception as e:  # upstream: import or model-download failure -> no normaliser
            self.zh_tn = self.en_tn = None
            if required:
                raise RuntimeError(f"wetext text normaliser unavailable: {e}") from e
            log.warning(WETEXT_MISSING, e)
            return ""
        return "wetext"

    def _split(self, text: str, lang: str) -> list[str]:
        return split_paragraph(text, self.tokenize, lang, token_max_n=self.token_max_n,
                               token_min_n=self.token_min_n, merge_len=self.merge_len, comma_split=False)

    def normalize(self, text, split: bool = True, text_frontend: bool = True):
        """Upstream `text_normalize`: segments (split=True) or the normalised string (split=False).

        A generator (bistream text) is returned untouched as `[text]`.
        """
        if isinstance(text, collections.abc.Generator):
            return [text]
        if not isinstance(text, str):
            raise TypeError(f"text must be a str or a generator of str, got {type(text).__name__}")
        if "<|" in text and "|>" in text:
            text_frontend = False
        if text_frontend is False or text == "":
            return [text] if split is True else text
        text = text.strip()
        if self.engine == "ttsfrd":
            texts = [s["text"] for s in json.loads(self.frd.do_voicegen_frd(text))["sentences"]]
            text = "".join(texts)
        elif contains_chinese(text):
            if self.zh_tn is not None:
                text = self.zh_tn.normalize(text)
            text = text.replace("\n", "")
            text = replace_blank(text)
            text = replace_corner_mark(text)
            text = text.replace(".", "。")
            text = text.replace(" - ", "，")
            text = remove_bracket(text)
            text = re.sub(r"[，,、]+$", "。", text)
            texts = self._split(text, "zh") if split else []
        else:
            if self.en_tn is not None:
                text = self.en_tn.normalize(text)
            text = spell_out_number(text, self.number_speller)
            texts = self._split(text, "en") if split else []
        texts = [t for t in texts if not is_only_punctuation(t)]
        return texts if split is True else text

    __call__ = normalize
