"""Qwen2 text tokenizer with CosyVoice's added special tokens, built with the `tokenizers` library.

Upstream (`cosyvoice/tokenizer/tokenizer.py:CosyVoice2Tokenizer / CosyVoice3Tokenizer`) loads
`AutoTokenizer.from_pretrained(<model>/CosyVoice-BlankEN)` (a fast Qwen2 tokenizer converted from
`vocab.json` + `merges.txt`) and calls `add_special_tokens` with eos = pad = `<|endoftext|>` and a fixed
list of additional special tokens. New tokens get consecutive ids after the base vocabulary, so with the
real Qwen2 vocabulary `<|endofprompt|>` is 151646 (hard-coded in the CV3 LLM). `encode` adds no BOS/EOS.

This module rebuilds the same backend without transformers:
NFC normaliser -> Qwen2 split regex (isolated) -> byte-level (no prefix space) -> BPE (no unk, no dropout),
added tokens from `tokenizer_config.json` (`added_tokens_decoder`, in id order), then CosyVoice's specials.
A `tokenizer.json`, when present, is used as the backend instead (as transformers does).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

from cosyjax.frontend.errors import TokenizerFilesError

__all__ = [
    "CV2_SPECIAL_TOKENS",
    "CV3_SPECIAL_TOKENS",
    "ENDOFPROMPT",
    "QWEN2_BASE_VOCAB_SIZE",
    "REAL_QWEN2_IDS",
    "TextTokenizer",
    "special_tokens_for",
]

ENDOFPROMPT = "<|endofprompt|>"
ENDOFTEXT = "<|endoftext|>"

# Qwen2 split pattern used by transformers' Qwen2Converter (`Split(..., behavior="isolated")`).
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_CONTROL_TOKENS = (
    "<|im_start|>", "<|im_end|>", ENDOFPROMPT,
    "[breath]", "<strong>", "</strong>", "[noise]", "[laughter]", "[cough]", "[clucking]", "[accent]",
    "[quick_breath]", "<laughter>", "</laughter>", "[hissing]", "[sigh]", "[vocalized-noise]",
    "[lipsmack]", "[mn]",
)

# CosyVoice3 pronunciation ("hotfix") tokens: ARPAbet phones (vowels with stress 0/1/2), then pinyin
# initials / finals with tone marks, each wrapped in brackets; the order fixes the ids 151664..151923.
_ARPABET = (
    "AA AA0 AA1 AA2 AE AE0 AE1 AE2 AH AH0 AH1 AH2 AO AO0 AO1 AO2 AW AW0 AW1 AW2 AY AY0 AY1 AY2 "
    "B CH D DH EH EH0 EH1 EH2 ER ER0 ER1 ER2 EY EY0 EY1 EY2 F G HH IH IH0 IH1 IH2 IY IY0 IY1 IY2 "
    "JH K L M N NG OW OW0 OW1 OW2 OY OY0 OY1 OY2 P R S SH T TH UH UH0 UH1 UH2 UW UW0 UW1 UW2 "
    "V W Y Z ZH"
).split()
_PINYIN = (
    "a ai an ang ao b c ch d e ei en eng f g h i ian in ing iu ià iàn iàng iào iá ián iáng iáo iè ié "
    "iòng ióng iù iú iā iān iāng iāo iē iě iōng iū iǎ iǎn iǎng iǎo iǒng iǔ j k l m n o ong ou p q r s "
    "sh t u uang ue un uo uà uài uàn uàng uá uái uán uáng uè ué uì uí uò uó uā uāi uān uāng uē uě uī "
    "uō uǎ uǎi uǎn uǎng uǐ uǒ vè w x y z zh à ài àn àng ào á ái án áng áo è èi èn èng èr é éi én éng "
    "ér ì ìn ìng í ín íng ò òng òu ó óng óu ù ùn ú ún ā āi ān āng āo ē ēi ēn ēng ě ěi ěn ěng ěr ī īn "
    "īng ō ōng ōu ū ūn ǎ ǎi ǎn ǎng ǎo ǐ ǐn ǐng ǒ ǒng ǒu ǔ ǔn ǘ ǚ ǜ"
).split()

#: `additional_special_tokens` of upstream's CosyVoice2Tokenizer, in order.
CV2_SPECIAL_TOKENS: tuple[str, ...] = _CONTROL_TOKENS
#: `additional_special_tokens` of upstream's CosyVoice3Tokenizer, in order.
CV3_SPECIAL_TOKENS: tuple[str, ...] = (
    _CONTROL_TOKENS + ("<|endofsystem|>",) + tuple(f"[{p}]" for p in _ARPABET) + tuple(f"[{p}]" for p in _PINYIN)
)
assert len(CV2_SPECIAL_TOKENS) == 19 and len(CV3_SPECIAL_TOKENS) == 280

#: Size of the real Qwen2 BPE vocabulary (`vocab.json`), i.e. the first added-token id.
QWEN2_BASE_VOCAB_SIZE = 151643
#: Ids the models depend on when the base vocabulary is the real Qwen2 one.
REAL_QWEN2_IDS = {
    ENDOFTEXT: 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    ENDOFPROMPT: 151646, "[breath]": 151647, "[mn]": 151662,
    "<|endofsystem|>": 151663, "[AA]": 151664, "[ǜ]": 151923,
}
_QWEN2_EMBEDDING_ROWS = 151936


def special_tokens_for(version: str) -> tuple[str, ...]:
    """The additional special tokens upstream adds for 'cosyvoice2' | 'cosyvoice3'."""
    if version == "cosyvoice2":
        return CV2_SPECIAL_TOKENS
    if version == "cosyvoice3":
        return CV3_SPECIAL_TOKENS
    raise ValueError(f"unknown tokenizer version {version!r} (expected 'cosyvoice2' or 'cosyvoice3')")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise TokenizerFilesError(f"cannot read {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise TokenizerFilesError(f"{path} is not valid JSON: {e}") from e


def _read_merges(path: str) -> list[tuple[str, str]]:
    """merges.txt as transformers' Qwen2Tokenizer reads it (skip a '#version' header and blank lines)."""
    merges = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                line = line.strip()
                if (i == 0 and line.startswith("#version:")) or not line:
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise TokenizerFilesError(f"{path}:{i + 1}: a merge must be two symbols, got {line!r}")
                merges.append((parts[0], parts[1]))
    except OSError as e:
        raise TokenizerFilesError(f"cannot read {path}: {e}") from e
    return merges


def _token_content(tok) -> tuple[str, bool, bool, bool, bool]:
    """(content, special, normalized, lstrip, rstrip) of a tokenizer_config token entry (str or dict)."""
    if isinstance(tok, str):
        return tok, True, False, False, False
    if isinstance(tok, dict) and "content" in tok:
        return (tok["content"], bool(tok.get("special", True)), bool(tok.get("normalized", False)),
                bool(tok.get("lstrip", False)), bool(tok.get("rstrip", False)))
    raise TokenizerFilesError(f"unrecognised token entry in tokenizer_config.json: {tok!r}")


def _build_backend(blank_en_dir: str, config: dict):
    """The fast Qwen2 backend exactly as transformers' Qwen2Converter builds it (or tokenizer.json)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok_json = os.path.join(blank_en_dir, "tokenizer.json")
    if os.path.isfile(tok_json):
        try:
            return Tokenizer.from_file(tok_json)
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise TokenizerFilesError(f"cannot load {tok_json}: {e}") from e
    vocab = _read_json(os.path.join(blank_en_dir, "vocab.json"))
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise TokenizerFilesError(f"{blank_en_dir}/vocab.json must map token strings to integer ids")
    merges = _read_merges(os.path.join(blank_en_dir, "merges.txt"))
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                         end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    except Exception as e:
        raise TokenizerFilesError(f"{blank_en_dir}: vocab.json / merges.txt do not form a BPE model: {e}") from e
    backend = Tokenizer(bpe)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False) or False),
                                 use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _config_added_tokens(config: dict) -> list:
    """Tokens transformers adds at load time: `added_tokens_decoder` (id order), then special-token fields."""
    from tokenizers import AddedToken

    out: list = []
    seen: set[str] = set()
    decoder = config.get("added_tokens_decoder") or {}
    try:
        items = sorted(((int(k), v) for k, v in decoder.items()), key=lambda kv: kv[0])
    except (TypeError, ValueError) as e:
        raise TokenizerFilesError(f"tokenizer_config.json added_tokens_decoder has a non-integer id: {e}") from e
    for idx, entry in items:
        content, special, normalized, lstrip, rstrip = _token_content(entry)
        out.append((idx, AddedToken(content, special=special, normalized=normalized, lstrip=lstrip, rstrip=rstrip)))
        seen.add(content)
    # Qwen2TokenizerFast defaults: unk = eos = pad = <|endoftext|>, bos None (a key set to null removes it).
    defaults = {"bos_token": None, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT, "sep_token": None,
                "pad_token": ENDOFTEXT, "cls_token": None, "mask_token": None}
    fields = [config.get(k, d) for k, d in defaults.items()]
    fields += list(config.get("additional_special_tokens") or [])
    for tok in fields:
        if tok is None:
            continue
        content = _token_content(tok)[0]
        if content not in seen:
            seen.add(content)
            out.append((None, AddedToken(content, special=True, normalized=False)))
    return out


class TextTokenizer:
    """Qwen2 BPE + CosyVoice special tokens; `encode(text) -> list[int]` like upstream's `encode`.

    Build it with `TextTokenizer.from_dir(<model>/CosyVoice-BlankEN, version)` or `from_model_dir`.
    """

    def __init__(self, backend, version: str, special_tokens: Sequence[str], source: str = "",
                 clean_up_tokenization_spaces: bool = False):
        self._tok = backend
        self.version = version
        self.special_tokens = tuple(special_tokens)
        self.source = source
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

    # ----------------------------------------------------------------------------------------- loading
    @staticmethod
    def required_files(blank_en_dir: str) -> list[str]:
        """Names of the tokenizer files missing from `blank_en_dir` (empty when it can be loaded)."""
        if os.path.isfile(os.path.join(blank_en_dir, "tokenizer.json")):
            return []
        return [n for n in ("vocab.json", "merges.txt") if not os.path.isfile(os.path.join(blank_en_dir, n))]

    @classmethod
    def from_dir(cls, blank_en_dir: str | os.PathLike, version: str = "cosyvoice2",
                 check_real_ids: bool = True) -> "TextTokenizer":
        """Load `CosyVoice-BlankEN/` (vocab.json + merges.txt [+ tokenizer_config.json]) for a model version.

        When the base vocabulary is the real Qwen2 one (151643 entries) the ids the models rely on
        (`<|endofprompt|>` = 151646, ...) are asserted.
        """
        from tokenizers import AddedToken

        blank_en_dir = os.fspath(blank_en_dir)
        specials = special_tokens_for(version)
        if not os.path.isdir(blank_en_dir):
            raise TokenizerFilesError(
                f"tokenizer folder not found: {blank_en_dir} (a CosyVoice model folder has CosyVoice-BlankEN/ "
                "with vocab.json, merges.txt and tokenizer_config.json)")
        missing = cls.required_files(blank_en_dir)
        if missing:
            present = sorted(os.listdir(blank_en_dir))
            raise TokenizerFilesError(
                f"{blank_en_dir} has no text tokenizer: missing {', '.join(missing)} "
                f"(found: {', '.join(present) or 'nothing'}). Copy vocab.json, merges.txt and "
                "tokenizer_config.json from the released CosyVoice-BlankEN folder.")
        cfg_path = os.path.join(blank_en_dir, "tokenizer_config.json")
        config = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
        backend = _build_backend(blank_en_dir, config)
        base_size = backend.get_vocab_size(with_added_tokens=False)
        for want_id, tok in _config_added_tokens(config):
            if backend.token_to_id(tok.content) is not None:
                continue
            backend.add_tokens([tok])  # AddedToken carries its own `special` flag
            got = backend.token_to_id(tok.content)
            if want_id is not None and got != want_id:
                raise TokenizerFilesError(
                    f"{cfg_path}: added token {tok.content!r} is declared with id {want_id} but gets id {got} "
                    f"after a base vocabulary of {base_size} entries (vocab.json and tokenizer_config.json disagree)")
        # CosyVoice's add_special_tokens(eos, pad, additional_special_tokens): tokens already known keep their
        # id (and become special), new ones get consecutive ids in list order.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (ENDOFTEXT, *specials)])
        tok = cls(backend, version, specials, source=blank_en_dir,
                  clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)))
        if check_real_ids and base_size == QWEN2_BASE_VOCAB_SIZE:
            tok.check_real_qwen_ids()
        return tok

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike, version: str | None = None) -> "TextTokenizer":
        """Load from a model folder (`<model_dir>/CosyVoice-BlankEN`); version detected from the yaml if None."""
        model_dir = os.fspath(model_dir)
        if version is None:
            from cosyjax.config import detect_version

            version = detect_version(model_dir)
        return cls.from_dir(os.path.join(model_dir, "CosyVoice-BlankEN"), version)

    def check_real_qwen_ids(self) -> None:
        """Assert the special-token ids the released models were trained with (real Qwen2 vocabulary)."""
        bad = []
        for token, want in REAL_QWEN2_IDS.items():
            if self.version == "cosyvoice2" and token in ("<|endofsystem|>", "[AA]", "[ǜ]"):
                continue
            got = self.token_to_id(token)
            if got != want:
                bad.append(f"{token} -> {got} (expected {want})")
        if self.vocab_size > _QWEN2_EMBEDDING_ROWS:
            bad.append(f"vocabulary size {self.vocab_size} exceeds the {_QWEN2_EMBEDDING_ROWS} embedding rows")
        if bad:
            raise TokenizerFilesError(
                f"{self.source}: tokenizer ids differ from the Qwen2 ids the CosyVoice models use: " + "; ".join(bad))

    # ----------------------------------------------------------------------------------------- use
    @property
    def vocab_size(self) -> int:
        """Base vocabulary + added tokens."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_of(self, token: str) -> int:
        """Id of a token that must exist (e.g. `<|endofprompt|>`)."""
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise KeyError(f"token {token!r} is not in the tokenizer")
        return idx

    @property
    def endofprompt_id(self) -> int:
        return self.id_of(ENDOFPROMPT)

    def encode(self, text: str, **unused) -> list[int]:
        """Token ids of `text` (no BOS/EOS; special tokens matched atomically). Extra kwargs are ignored
        (upstream passes `allowed_special`)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=True)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (upstream decodes with skip_special_tokens=True)."""
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)

    def __repr__(self) -> str:
        return f"TextTokenizer(version={self.version!r}, vocab_size={self.vocab_size}, source={self.source!r})"
