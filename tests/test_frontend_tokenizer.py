"""Text tokenizer: special-token ids/order, real-Qwen id assertion, round trips, missing-file errors."""
from __future__ import annotations

import os
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cosyjax.frontend import TextTokenizer, TokenizerFilesError
from cosyjax.frontend.tokenizer import (
    CV2_SPECIAL_TOKENS,
    CV3_SPECIAL_TOKENS,
    ENDOFPROMPT,
    QWEN2_BASE_VOCAB_SIZE,
    REAL_QWEN2_IDS,
)
from tests.conftest import GOLDEN
from tests.test_frontend_support import blank_en, write_blank_en  # noqa: F401 - fixture

MIXED = [
    "Hello world, I'm fine; you're great!",
    "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。",
    "レキシ テキ セカイ ニ オイ テ ワ、カコ ワ タンニ スギサッ タ モノ デ ワ ナイ、プラトン ノ イウ ゴトク。",
    "mixed中文English日本語カタカナ 123 tabs\tand\nnewlines\r\n  spaces  ",
    "emoji 😀🎉, ñandú, русский, Ελληνικά, 한국어",
]


@pytest.fixture(scope="module")
def padded_blank_en(tmp_path_factory):
    """Base vocabulary padded to the real Qwen2 size (151643) -> the real special-token ids."""
    return write_blank_en(str(tmp_path_factory.mktemp("blank_en_padded")), pad_to=QWEN2_BASE_VOCAB_SIZE)


@pytest.mark.parametrize("version,specials", [("cosyvoice2", CV2_SPECIAL_TOKENS), ("cosyvoice3", CV3_SPECIAL_TOKENS)])
def test_special_tokens_get_consecutive_ids_in_upstream_order(blank_en, version, specials):  # noqa: F811
    tok = TextTokenizer.from_dir(blank_en, version)
    base = tok._tok.get_vocab_size(with_added_tokens=False)
    # <|endoftext|>, <|im_start|>, <|im_end|> come from tokenizer_config.json; the rest are new, in order.
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [base, base + 1, base + 2]
    new = [t for t in specials if t not in ("<|im_start|>", "<|im_end|>")]
    assert [tok.token_to_id(t) for t in new] == list(range(base + 3, base + 3 + len(new)))
    assert tok.endofprompt_id == base + 3
    assert tok.vocab_size == base + 3 + len(new)


@pytest.mark.parametrize("version,size", [("cosyvoice2", 151663), ("cosyvoice3", 151924)])
def test_real_qwen_vocab_gives_the_ids_the_models_use(padded_blank_en, version, size):
    tok = TextTokenizer.from_dir(padded_blank_en, version)
    assert tok.endofprompt_id == 151646 and tok.vocab_size == size
    for token, want in REAL_QWEN2_IDS.items():
        if version == "cosyvoice2" and token in ("<|endofsystem|>", "[AA]", "[ǜ]"):
            assert tok.token_to_id(token) is None
        else:
            assert tok.token_to_id(token) == want, token
    assert tok.encode("You are a helpful assistant.<|endofprompt|>你好").count(151646) == 1


def test_real_size_vocab_with_wrong_added_tokens_is_rejected(tmp_path):
    # A Qwen2.5-style config with more added tokens shifts <|endofprompt|> away from 151646.
    path = write_blank_en(str(tmp_path / "b"), pad_to=QWEN2_BASE_VOCAB_SIZE,
                          extra_added=("<|object_ref_start|>", "<|object_ref_end|>"))
    with pytest.raises(TokenizerFilesError, match=r"<\|endofprompt\|> -> 151648 \(expected 151646\)"):
        TextTokenizer.from_dir(path, "cosyvoice3")
    assert TextTokenizer.from_dir(path, "cosyvoice3", check_real_ids=False).endofprompt_id == 151648


def test_declared_added_token_id_mismatch_is_rejected(tmp_path):
    path = write_blank_en(str(tmp_path / "b"), declared_ids=[5, 6, 7])
    with pytest.raises(TokenizerFilesError, match="declared with id 5"):
        TextTokenizer.from_dir(path, "cosyvoice2")


@pytest.mark.parametrize("version", ["cosyvoice2", "cosyvoice3"])
def test_round_trip_mixed_languages(blank_en, version):  # noqa: F811
    tok = TextTokenizer.from_dir(blank_en, version)
    for text in MIXED:
        ids = tok.encode(text)
        assert ids and all(isinstance(i, int) for i in ids)
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    assert tok.encode_batch(MIXED) == [tok.encode(t) for t in MIXED]


def test_special_tokens_are_atomic_and_skipped_when_decoding(blank_en):  # noqa: F811
    cv2 = TextTokenizer.from_dir(blank_en, "cosyvoice2")
    cv3 = TextTokenizer.from_dir(blank_en, "cosyvoice3")
    text = "You are a helpful assistant.<|endofprompt|>[breath]因为他们[laughter]<strong>好</strong>"
    ids = cv3.encode(text)
    for special in (ENDOFPROMPT, "[breath]", "[laughter]", "<strong>", "</strong>"):
        assert ids.count(cv3.id_of(special)) == 1
    assert cv3.decode(ids, skip_special_tokens=False) == text
    assert cv3.decode(ids) == "You are a helpful assistant.因为他们好"
    # CV3 pronunciation tokens exist only in the CV3 tokenizer
    assert len(cv3.encode("[j][ǐ]")) == 2 and cv3.id_of("[j]") + 0 in cv3.encode("[j][ǐ]")
    assert cv2.token_to_id("[j]") is None and len(cv2.encode("[j][ǐ]")) > 2
    # upstream passes allowed_special; it is ignored
    assert cv2.encode("a<|endofprompt|>b", allowed_special="all") == cv2.encode("a<|endofprompt|>b")


_CACHE: dict = {}


@settings(max_examples=40, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_round_trip_property(blank_en, text):  # noqa: F811
    if blank_en not in _CACHE:
        _CACHE[blank_en] = TextTokenizer.from_dir(blank_en, "cosyvoice3")
    tok = _CACHE[blank_en]
    if "<|" in text or "[" in text or "<" in text:  # may spell an added token
        return
    assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_tokenizer_json_is_used_when_present(blank_en, tmp_path):  # noqa: F811
    ref = TextTokenizer.from_dir(blank_en, "cosyvoice3")
    d = tmp_path / "with_json"
    d.mkdir()
    ref._tok.save(str(d / "tokenizer.json"))
    tok = TextTokenizer.from_dir(str(d), "cosyvoice3")
    for text in MIXED + ["x<|endofprompt|>[AA1]y"]:
        assert tok.encode(text) == ref.encode(text)


def test_golden_model_folder_has_no_tokenizer_files():
    blank = os.path.join(GOLDEN, "cosyvoice2", "modeldir", "CosyVoice-BlankEN")
    with pytest.raises(TokenizerFilesError, match=r"missing vocab\.json, merges\.txt .*found: config\.json"):
        TextTokenizer.from_dir(blank, "cosyvoice2")
    with pytest.raises(TokenizerFilesError, match="missing vocab.json"):
        TextTokenizer.from_model_dir(os.path.join(GOLDEN, "cosyvoice3", "modeldir"))


def test_missing_folder_and_broken_files(tmp_path):
    with pytest.raises(TokenizerFilesError, match="tokenizer folder not found"):
        TextTokenizer.from_dir(str(tmp_path / "nope"))
    (tmp_path / "vocab.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(TokenizerFilesError, match="vocab.json is not valid JSON"):
        TextTokenizer.from_dir(str(tmp_path))
    (tmp_path / "vocab.json").write_text('{"a": 0, "b": 1}', encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(TokenizerFilesError, match="a merge must be two symbols"):
        TextTokenizer.from_dir(str(tmp_path))
    with pytest.raises(ValueError, match="unknown tokenizer version"):
        TextTokenizer.from_dir(str(tmp_path), "cosyvoice1")


def test_matches_transformers(blank_en):  # noqa: F811
    import transformers  # the test extra installs it (no torch needed for tokenizers)

    for version, specials in (("cosyvoice2", CV2_SPECIAL_TOKENS), ("cosyvoice3", CV3_SPECIAL_TOKENS)):
        ref = transformers.AutoTokenizer.from_pretrained(blank_en)
        ref.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                                "additional_special_tokens": list(specials)})
        tok = TextTokenizer.from_dir(blank_en, version)
        for text in MIXED + ["You are a helpful assistant.<|endofprompt|>[breath]好[AA1]"]:
            assert tok.encode(text) == ref([text])["input_ids"][0]
