"""Mode builders (sft, zero_shot, cross_lingual, instruct2, vc) for both versions, the CV3 <|endofprompt|>
rule, prompt alignment, the speaker cache (upstream spk2info.pt / our npz) and the per-segment iterators."""
from __future__ import annotations

import os

import numpy as np
import pytest

from cosyjax.frontend import (
    CV3_SYSTEM_PROMPT,
    AudioTooLongError,
    Frontend,
    OnnxModelError,
    PromptFormatError,
    SpeakerError,
    SpeakerStore,
    TokenizerFilesError,
    align_prompt,
    load_audio,
)
from cosyjax.frontend.features import prompt_mel, speaker_fbank, whisper_log_mel
from tests.conftest import GOLDEN
from tests.test_frontend_support import (  # noqa: F401 - fixtures
    blank_en,
    expected_campplus,
    expected_speech_tokens,
    model_dirs,
    onnx_available,
    speech_like,
    write_torch_pickle,
    write_wav,
)

ZERO_SHOT_KEYS = {"text", "text_len", "prompt_text", "prompt_text_len", "llm_prompt_speech_token",
                  "llm_prompt_speech_token_len", "flow_prompt_speech_token", "flow_prompt_speech_token_len",
                  "prompt_speech_feat", "prompt_speech_feat_len", "llm_embedding", "flow_embedding"}
VERSIONS = ("cosyvoice2", "cosyvoice3")


def tts_text(version, text="你好，世界。"):
    return CV3_SYSTEM_PROMPT + text if version == "cosyvoice3" else text


def prompt_text(version, text="希望你以后能够做的比我还好呦。"):
    return CV3_SYSTEM_PROMPT + text if version == "cosyvoice3" else text


@pytest.fixture(scope="module")
def prompt_wav(tmp_path_factory):
    # 1.23 s at 22.05 kHz: mel frames (61) and tokens (31) do not line up 2:1 -> exercises the trim
    return write_wav(str(tmp_path_factory.mktemp("wav") / "prompt.wav"), speech_like(1.23, 22050, seed=1), 22050)


@pytest.fixture(scope="module")
def source_wav(tmp_path_factory):
    return write_wav(str(tmp_path_factory.mktemp("wav") / "source.wav"), speech_like(0.9, 16000, seed=2), 16000)


@pytest.fixture(scope="module")
def fronts(model_dirs):  # noqa: F811
    return {v: Frontend.from_model_dir(model_dirs[v], text_frontend="none") for v in VERSIONS}


def expected_prompt(prompt_wav):
    audio = load_audio(prompt_wav)
    s16 = audio.at(16000)
    return {"tokens": expected_speech_tokens(whisper_log_mel(s16)), "emb": expected_campplus(speaker_fbank(s16))}


def check_types(model_input):
    for k, v in model_input.items():
        if k.endswith("_len"):
            assert v.dtype == np.int32 and v.shape == (1,), k
        elif "embedding" in k or k == "prompt_speech_feat":
            assert v.dtype == np.float32 and v.ndim in (2, 3) and v.shape[0] == 1, k
        else:
            assert v.dtype == np.int32 and v.ndim == 2 and v.shape[0] == 1, k
        base = k[:-4]
        if k.endswith("_len") and base in model_input:
            assert model_input[base].shape[1] == v[0], k


@pytest.mark.parametrize("version", VERSIONS)
def test_zero_shot(fronts, prompt_wav, version):
    fe = fronts[version]
    mi = fe.frontend_zero_shot(tts_text(version), prompt_text(version), prompt_wav, 24000)
    assert set(mi) == ZERO_SHOT_KEYS
    check_types(mi)
    exp = expected_prompt(prompt_wav)
    feat = prompt_mel(load_audio(prompt_wav).at(24000), fe.mel_config)
    n = min(feat.shape[1] // 2, exp["tokens"].shape[1])
    assert mi["prompt_speech_feat"].shape == (1, 2 * n, 80) and mi["flow_prompt_speech_token"].shape == (1, n)
    assert feat.shape[1] != 2 * exp["tokens"].shape[1]  # the trim really happened
    np.testing.assert_array_equal(mi["llm_prompt_speech_token"], exp["tokens"][:, :n])
    np.testing.assert_array_equal(mi["prompt_speech_feat"], feat[:, :2 * n])
    np.testing.assert_allclose(mi["flow_embedding"], exp["emb"], rtol=1e-5, atol=1e-6)
    assert mi["llm_embedding"] is mi["flow_embedding"]
    assert mi["text"][0].tolist() == fe.tokenizer.encode(tts_text(version))
    assert mi["prompt_text"][0].tolist() == fe.tokenizer.encode(prompt_text(version))
    # no alignment for other output rates (upstream: only resample_rate == 24000 trims)
    raw = fe.frontend_zero_shot(tts_text(version), prompt_text(version), prompt_wav, 22050)
    assert raw["prompt_speech_feat"].shape[1] == feat.shape[1]


@pytest.mark.parametrize("version", VERSIONS)
def test_cross_lingual_and_instruct2(fronts, prompt_wav, version):
    fe = fronts[version]
    cl = fe.frontend_cross_lingual(tts_text(version, "[breath]因为他们那一辈人。"), prompt_wav)
    assert set(cl) == ZERO_SHOT_KEYS - {"prompt_text", "prompt_text_len", "llm_prompt_speech_token",
                                        "llm_prompt_speech_token_len"}
    check_types(cl)
    instruct = ("You are a helpful assistant. 请用广东话表达。<|endofprompt|>" if version == "cosyvoice3"
                else "用四川话说这句话<|endofprompt|>")
    ins = fe.frontend_instruct2("好少咯，一般系放嗰啲国庆啊。", instruct, prompt_wav)
    assert set(ins) == ZERO_SHOT_KEYS - {"llm_prompt_speech_token", "llm_prompt_speech_token_len"}
    check_types(ins)
    assert ins["prompt_text"][0].tolist() == fe.tokenizer.encode(instruct)  # not normalised
    np.testing.assert_array_equal(ins["prompt_speech_feat"], cl["prompt_speech_feat"])


@pytest.mark.parametrize("version", VERSIONS)
def test_vc_is_not_aligned(fronts, prompt_wav, source_wav, version):
    fe = fronts[version]
    mi = fe.frontend_vc(source_wav, prompt_wav)
    assert set(mi) == {"source_speech_token", "source_speech_token_len", "flow_prompt_speech_token",
                       "flow_prompt_speech_token_len", "prompt_speech_feat", "prompt_speech_feat_len",
                       "flow_embedding"}
    check_types(mi)
    exp = expected_prompt(prompt_wav)
    np.testing.assert_array_equal(mi["flow_prompt_speech_token"], exp["tokens"])  # untrimmed (quirk Q8)
    assert mi["prompt_speech_feat"].shape[1] == load_audio(prompt_wav).length_at(24000) // 480
    np.testing.assert_array_equal(
        mi["source_speech_token"], expected_speech_tokens(whisper_log_mel(load_audio(source_wav).at(16000))))
    long_src = (speech_like(31.0, 16000), 16000)
    with pytest.raises(AudioTooLongError, match="source audio"):
        fe.frontend_vc(long_src, prompt_wav)


@pytest.mark.parametrize("version", VERSIONS)
def test_sft_with_upstream_spk2info_pt(model_dirs, tmp_path, version):  # noqa: F811
    emb = np.arange(192, dtype=np.float32).reshape(1, 192) / 100
    path = write_torch_pickle(str(tmp_path / "spk2info.pt"), {"中文女": {"embedding": emb}})
    fe = Frontend.from_model_dir(model_dirs[version], spk2info=SpeakerStore.load(path), text_frontend="none")
    assert fe.list_available_spks() == ["中文女"]
    mi = fe.frontend_sft(tts_text(version), "中文女")
    assert set(mi) == {"text", "text_len", "llm_embedding", "flow_embedding"}
    check_types(mi)
    np.testing.assert_array_equal(mi["flow_embedding"], emb)
    with pytest.raises(SpeakerError, match=r"unknown speaker id '英文男' \(available: 中文女\)"):
        fe.frontend_sft(tts_text(version), "英文男")


@pytest.mark.parametrize("version", VERSIONS)
def test_zero_shot_speaker_cache_round_trip(model_dirs, prompt_wav, tmp_path, version):  # noqa: F811
    fe = Frontend.from_model_dir(model_dirs[version], text_frontend="none")
    assert fe.add_zero_shot_spk(prompt_text(version), prompt_wav, "my_spk") is True
    direct = fe.frontend_zero_shot(tts_text(version), prompt_text(version), prompt_wav)
    cached = fe.frontend_zero_shot(tts_text(version), "", "", zero_shot_spk_id="my_spk")
    assert set(cached) == set(direct)
    for k in direct:
        np.testing.assert_array_equal(cached[k], direct[k], err_msg=k)
    saved = fe.save_spkinfo(str(tmp_path / "spk2info"))
    assert saved.endswith(".npz")
    # upstream torch.save format of the same entry reads back identically
    pt = write_torch_pickle(str(tmp_path / "spk2info.pt"), {"my_spk": dict(fe.spk2info["my_spk"])})
    for store in (SpeakerStore.load(saved), SpeakerStore.load(pt)):
        entry = store["my_spk"]
        assert set(entry) == ZERO_SHOT_KEYS - {"text", "text_len"}
        for k, v in fe.spk2info["my_spk"].items():
            assert entry[k].dtype == v.dtype and np.array_equal(entry[k], v), k
    # cross_lingual / instruct2 from the cache; instruct2 keeps the cached prompt_text (as upstream)
    cl = fe.frontend_cross_lingual(tts_text(version), None, zero_shot_spk_id="my_spk")
    assert "prompt_text" not in cl and "flow_prompt_speech_token" in cl
    ins = fe.frontend_instruct2(tts_text(version), "ignored<|endofprompt|>", None, zero_shot_spk_id="my_spk")
    np.testing.assert_array_equal(ins["prompt_text"], direct["prompt_text"])
    with pytest.raises(SpeakerError, match="empty zero_shot_spk_id"):
        fe.add_zero_shot_spk(prompt_text(version), prompt_wav, "")
    with pytest.raises(SpeakerError, match="has no 'embedding' entry"):
        fe.frontend_sft(tts_text(version), "my_spk")


def test_speaker_entries_missing_fields(model_dirs, tmp_path):  # noqa: F811
    store = SpeakerStore({"sft_spk": {"embedding": np.zeros((1, 192), np.float32)}})
    fe = Frontend.from_model_dir(model_dirs["cosyvoice2"], spk2info=store, text_frontend="none")
    with pytest.raises(SpeakerError, match="cross_lingual: speaker 'sft_spk' lacks prompt_text"):
        fe.frontend_cross_lingual("你好。", None, zero_shot_spk_id="sft_spk")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(SpeakerError, match="neither a torch zip checkpoint nor a cosyjax .npz"):
        SpeakerStore.load(str(bad))
    with pytest.raises(SpeakerError, match="speaker file not found"):
        SpeakerStore.load(str(tmp_path / "none.pt"))
    with pytest.raises(SpeakerError, match="speaker 'spk' is a int, expected a dict of tensors"):
        SpeakerStore.load(write_torch_pickle(str(tmp_path / "int.pt"), {"spk": 3}))
    with pytest.raises(SpeakerError, match=r"expected a dict \{spk_id"):
        SpeakerStore.load(write_torch_pickle(str(tmp_path / "list.pt"), [1, 2]))


def test_model_folder_spk2info_is_loaded(model_dirs, tmp_path):  # noqa: F811
    import shutil

    d = shutil.copytree(model_dirs["cosyvoice2"], str(tmp_path / "cv2"))
    write_torch_pickle(os.path.join(d, "spk2info.pt"), {"a": {"embedding": np.ones((1, 192), np.float32)}})
    fe = Frontend.from_model_dir(d, text_frontend="none")
    assert fe.list_available_spks() == ["a"]
    fe.spk2info["b"] = {"embedding": np.zeros((1, 192), np.float32)}
    assert fe.save_spkinfo() == os.path.join(d, "spk2info.npz")
    assert Frontend.from_model_dir(d, text_frontend="none").list_available_spks() == ["a", "b"]  # npz preferred


def test_cv3_endofprompt_rule(fronts, prompt_wav):
    fe = fronts["cosyvoice3"]
    with pytest.raises(PromptFormatError, match=r"CosyVoice3 needs <\|endofprompt\|> .* in the prompt_text or text"):
        fe.frontend_zero_shot("你好。", "希望你以后能够做的比我还好呦。", prompt_wav)
    with pytest.raises(PromptFormatError, match="endofprompt"):
        fe.frontend_cross_lingual("你好。", prompt_wav)
    with pytest.raises(PromptFormatError, match="endofprompt"):
        fe.frontend_instruct2("你好。", "请用广东话表达。", prompt_wav)
    # in either part is enough; CV2 has no such rule
    fe.frontend_zero_shot(CV3_SYSTEM_PROMPT + "你好。", "希望你以后。", prompt_wav)
    fronts["cosyvoice2"].frontend_zero_shot("你好。", "希望你以后。", prompt_wav)

    def gen():
        yield "你好"

    with pytest.raises(PromptFormatError, match="in the prompt_text:"):  # bistream: must be in prompt_text
        fe.frontend_zero_shot(gen(), "希望你以后。", prompt_wav)
    mi = fe.frontend_zero_shot(gen(), prompt_text("cosyvoice3"), prompt_wav)
    assert mi["text_len"].tolist() == [0]
    pieces = list(mi["text"])
    assert [p.shape for p in pieces] == [(1, 1)] * len(fe.tokenizer.encode("你好"))


def test_align_prompt():
    feat = np.zeros((1, 61, 80), np.float32)
    tok = np.arange(40, dtype=np.int32)[None]
    f, t = align_prompt(feat, tok)
    assert f.shape == (1, 60, 80) and t.shape == (1, 30)
    f, t = align_prompt(feat[:, :20], tok)
    assert f.shape == (1, 20, 80) and t.tolist() == [list(range(10))]


def test_iterators_split_text_and_compute_prompt_once(model_dirs, prompt_wav, source_wav):  # noqa: F811
    fe = Frontend.from_model_dir(model_dirs["cosyvoice2"], text_frontend="none")
    calls = []
    tok = fe.speech_tokenizer
    fe._speech_tokenizer = lambda mel: calls.append(mel.shape) or tok(mel)
    text = "今天天气很好，我们去公园散步吧。" * 12
    inputs = list(fe.inputs_zero_shot(text, "希望你以后能够做的比我还好呦。", prompt_wav))
    assert len(inputs) == len(fe.text_normalize(text)) > 1 and len(calls) == 1
    assert [mi["text"][0].tolist() for mi in inputs] == [fe.tokenizer.encode(s) for s in fe.text_normalize(text)]
    assert len(list(fe.inputs_cross_lingual(text, prompt_wav))) == len(inputs) and len(calls) == 2
    assert len(list(fe.inputs_instruct2(text, "用四川话说这句话<|endofprompt|>", prompt_wav))) == len(inputs)
    assert len(list(fe.inputs_vc(source_wav, prompt_wav))) == 1
    fe.spk2info["s"] = {"embedding": np.ones((1, 192), np.float32)}
    assert len(list(fe.inputs_sft("Hello there. It is 5 o'clock.", "s"))) == 1


def test_folder_without_tokenizer_files_still_does_vc(model_dirs, prompt_wav, source_wav, tmp_path):  # noqa: F811
    import shutil

    d = shutil.copytree(model_dirs["cosyvoice3"], str(tmp_path / "cv3"))
    shutil.rmtree(os.path.join(d, "CosyVoice-BlankEN"))
    os.makedirs(os.path.join(d, "CosyVoice-BlankEN"))
    shutil.copy(os.path.join(GOLDEN, "cosyvoice3", "modeldir", "CosyVoice-BlankEN", "config.json"),
                os.path.join(d, "CosyVoice-BlankEN"))
    fe = Frontend.from_model_dir(d)
    assert fe.frontend_vc(source_wav, prompt_wav)["flow_embedding"].shape == (1, 192)
    with pytest.raises(TokenizerFilesError, match=r"missing vocab\.json, merges\.txt"):
        fe.frontend_cross_lingual(tts_text("cosyvoice3"), prompt_wav)


def test_golden_folder_without_onnx_files_reports_them(tmp_path):
    fe = Frontend.from_model_dir(os.path.join(GOLDEN, "cosyvoice2", "modeldir"))
    assert fe.version == "cosyvoice2" and fe.mel_config.fmax == 8000
    with pytest.raises(OnnxModelError, match=r"speech tokenizer .* not found: .*speech_tokenizer_v2\.onnx"):
        fe.extract_speech_token((speech_like(0.5, 16000), 16000))
    with pytest.raises(OnnxModelError, match=r"not found: .*campplus\.onnx"):
        fe.extract_spk_embedding((speech_like(0.5, 16000), 16000))
