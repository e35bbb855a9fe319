"""`Frontend`: text + prompt audio -> the model-input dicts upstream's `CosyVoiceFrontEnd.frontend_*` return.

Key names, dtypes and shapes follow upstream (`cosyvoice/cli/frontend.py`), as NumPy arrays:
token arrays int32 [1, L], `*_len` int32 [1], embeddings float32 [1, 192], `prompt_speech_feat`
float32 [1, F, 80]. Per mode:

| mode | keys |
|---|---|
| sft | text, text_len, llm_embedding, flow_embedding (from spk2info[spk]['embedding']) |
| zero_shot | text, text_len, prompt_text(_len), llm_/flow_prompt_speech_token(_len), prompt_speech_feat(_len), llm_/flow_embedding |
| zero_shot + zero_shot_spk_id | the saved entry (everything but text) + text, text_len |
| cross_lingual | zero_shot minus prompt_text(_len), llm_prompt_speech_token(_len) |
| instruct2 | zero_shot with prompt_text = instruct text, minus llm_prompt_speech_token(_len) |
| vc | source_speech_token(_len), flow_prompt_speech_token(_len), prompt_speech_feat(_len), flow_embedding |

For 24 kHz models (CosyVoice2/3) zero_shot trims the prompt so that mel frames = 2 x speech tokens
(`align_prompt`); vc does not (upstream quirk Q8). CosyVoice3's LLM asserts `<|endofprompt|>` in
prompt_text + text; the builders check that up front (`PromptFormatError`).

The `inputs_*` generators reproduce `cosyvoice/cli/cosyvoice.py:CosyVoice*.inference_*`: normalise and
split the text, then yield one model input per segment (prompt features computed once).
"""
from __future__ import annotations

import collections.abc
import logging
import os
from typing import Iterator

import numpy as np

from cosyjax.frontend.audio import Audio, AudioSource, load_audio
from cosyjax.frontend.errors import PromptFormatError, SpeakerError
from cosyjax.frontend.features import MelConfig, prompt_mel, speaker_fbank, whisper_log_mel
from cosyjax.frontend.onnx_models import SpeakerEncoder, SpeechTokenizer, speech_tokenizer_file
from cosyjax.frontend.prompt import Prompt, PromptError, is_prompt_npz
from cosyjax.frontend.speakers import SpeakerStore
from cosyjax.frontend.text_normalize import TextNormalizer
from cosyjax.frontend.tokenizer import ENDOFPROMPT, TextTokenizer

__all__ = ["CV3_SYSTEM_PROMPT", "Frontend", "Prompt", "align_prompt"]

log = logging.getLogger(__name__)

#: CosyVoice3 prompt prefix (example.py): zero-shot prompt_text / cross-lingual tts_text start with it.
CV3_SYSTEM_PROMPT = "You are a helpful assistant.<|endofprompt|>"


def _i32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


def align_prompt(speech_feat: np.ndarray, speech_token: np.ndarray, token_mel_ratio: int = 2):
    """Upstream's 24 kHz prompt trim: L = min(F // 2, n_tokens); mel[:, :2L], tokens[:, :L]."""
    n = min(int(speech_feat.shape[1] / token_mel_ratio), speech_token.shape[1])
    return speech_feat[:, :token_mel_ratio * n], speech_token[:, :n]


class Frontend:
    """CosyVoice2/3 frontend. Build with `Frontend.from_model_dir(model_dir)`.

    The tokenizer and the ONNX sessions are created on first use, so e.g. voice conversion works on a
    folder without tokenizer files and text-only calls work without onnxruntime.
    """

    def __init__(self, version: str, *, tokenizer: TextTokenizer | None = None, tokenizer_dir: str | None = None,
                 mel_config: MelConfig | None = None, sample_rate: int = 24000, token_mel_ratio: int = 2,
                 speaker_encoder: SpeakerEncoder | str | None = None,
                 speech_tokenizer: SpeechTokenizer | str | None = None,
                 spk2info: SpeakerStore | None = None, normalizer: TextNormalizer | None = None,
                 text_frontend: str = "auto", ttsfrd_resource: str | None = None,
                 onnx_providers=None, check_endofprompt: bool = True):
        if version not in ("cosyvoice2", "cosyvoice3"):
            raise ValueError(f"unsupported version {version!r}")
        self.version = version
        self._tokenizer = tokenizer
        self._tokenizer_dir = tokenizer_dir
        if mel_config is None:
            mel_config = MelConfig(fmax=8000 if version == "cosyvoice2" else None)
        self.mel_config = mel_config
        self.sample_rate = sample_rate
        self.token_mel_ratio = token_mel_ratio
        self._speaker_encoder = speaker_encoder
        self._speech_tokenizer = speech_tokenizer
        self.onnx_providers = onnx_providers
        self.spk2info = spk2info if spk2info is not None else SpeakerStore()
        self._normalizer = normalizer
        self._text_frontend = text_frontend
        self._ttsfrd_resource = ttsfrd_resource
        self.check_endofprompt = check_endofprompt

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike, **kwargs) -> "Frontend":
        """Frontend for a model folder: yaml `feat_extractor`, `CosyVoice-BlankEN/`, `campplus.onnx`,
        `speech_tokenizer_v2|v3.onnx`, optional `spk2info.pt` (or our `spk2info.npz`)."""
        from cosyjax.config import ModelConfig

        cfg = ModelConfig.from_dir(model_dir, need_qwen=False)
        spk_path = next((p for p in (os.path.join(cfg.model_dir, "spk2info.npz"),
                                     os.path.join(cfg.model_dir, "spk2info.pt")) if os.path.isfile(p)), None)
        kwargs.setdefault("spk2info", SpeakerStore.load(spk_path) if spk_path else SpeakerStore())
        kwargs.setdefault("tokenizer_dir", os.path.join(cfg.model_dir, "CosyVoice-BlankEN"))
        kwargs.setdefault("mel_config", MelConfig.from_model_config(cfg))
        kwargs.setdefault("speaker_encoder", os.path.join(cfg.model_dir, "campplus.onnx"))
        kwargs.setdefault("speech_tokenizer", os.path.join(cfg.model_dir, speech_tokenizer_file(cfg.version)))
        front = cls(cfg.version, sample_rate=cfg.sample_rate, token_mel_ratio=cfg.token_mel_ratio, **kwargs)
        front.model_dir = cfg.model_dir
        return front

    # ------------------------------------------------------------------------------------ components
    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            if self._tokenizer_dir is None:
                raise ValueError("this Frontend has no text tokenizer (pass tokenizer= or tokenizer_dir=)")
            self._tokenizer = TextTokenizer.from_dir(self._tokenizer_dir, self.version)
        return self._tokenizer

    @property
    def normalizer(self) -> TextNormalizer:
        if self._normalizer is None:
            self._normalizer = TextNormalizer(self.tokenizer.encode, engine=self._text_frontend,
                                              ttsfrd_resource=self._ttsfrd_resource)
        return self._normalizer

    @property
    def speaker_encoder(self) -> SpeakerEncoder:
        if not isinstance(self._speaker_encoder, SpeakerEncoder) and not callable(self._speaker_encoder):
            if self._speaker_encoder is None:
                raise ValueError("this Frontend has no speaker encoder (campplus.onnx)")
            self._speaker_encoder = SpeakerEncoder(self._speaker_encoder, providers=self.onnx_providers)
        return self._speaker_encoder

    @property
    def speech_tokenizer(self) -> SpeechTokenizer:
        if not isinstance(self._speech_tokenizer, SpeechTokenizer) and not callable(self._speech_tokenizer):
            if self._speech_tokenizer is None:
                raise ValueError("this Frontend has no speech tokenizer (speech_tokenizer_v*.onnx)")
            self._speech_tokenizer = SpeechTokenizer(self._speech_tokenizer, providers=self.onnx_providers)
        return self._speech_tokenizer

    # ------------------------------------------------------------------------------------ text
    def text_normalize(self, text, split: bool = True, text_frontend: bool = True):
        """Upstream `text_normalize`: list of segments (split=True) or one string."""
        return self.normalizer.normalize(text, split=split, text_frontend=text_frontend)

    def extract_text_token(self, text):
        """(int32 [1, L], int32 [1]); a generator gives (generator of int32 [1, 1], [0]) as upstream."""
        if isinstance(text, collections.abc.Generator):
            return self._text_token_generator(text), _i32([0])
        ids = self.tokenizer.encode(text)
        return _i32([ids]).reshape(1, len(ids)), _i32([len(ids)])

    def _text_token_generator(self, texts) -> Iterator[np.ndarray]:
        for text in texts:
            tokens, _ = self.extract_text_token(text)
            for i in range(tokens.shape[1]):
                yield tokens[:, i:i + 1]

    # ------------------------------------------------------------------------------------ audio
    @staticmethod
    def load_prompt(wav: AudioSource, what: str = "prompt") -> Audio:
        """Decode and validate a prompt/source wav (see `Audio.validate`)."""
        return load_audio(wav, what=what)

    def extract_speech_token(self, wav: AudioSource, what: str = "prompt"):
        """Speech tokens of the 16 kHz audio: (int32 [1, L], int32 [1])."""
        audio = self.load_prompt(wav, what)
        tokens = self.speech_tokenizer(whisper_log_mel(audio.at(16000), n_mels=128))
        return tokens, _i32([tokens.shape[1]])

    def extract_spk_embedding(self, wav: AudioSource) -> np.ndarray:
        """campplus embedding of the 16 kHz prompt -> float32 [1, 192]."""
        audio = self.load_prompt(wav)
        return np.asarray(self.speaker_encoder(speaker_fbank(audio.at(16000))), np.float32)

    def extract_speech_feat(self, wav: AudioSource):
        """Prompt mel of the 24 kHz prompt: (float32 [1, F, 80], int32 [1])."""
        audio = self.load_prompt(wav)
        feat = prompt_mel(audio.at(self.mel_config.sampling_rate), self.mel_config)
        return feat, _i32([feat.shape[1]])

    def prepare_prompt(self, wav) -> Prompt:
        """A complete `Prompt` (tokens [P], mel [F, 80], embedding [192]; unaligned) from a prompt given as audio
        (path / `(samples, rate)` / `Audio`), a prompt `.npz`, or a `Prompt` (parts it lacks are computed from its
        `wav`). The audio is decoded once; a part that needs an ONNX model the folder lacks is a `PromptError`."""
        if wav is None:
            raise PromptError("this mode needs a prompt (prompt_wav)")
        if isinstance(wav, Prompt):
            pre = wav
        elif is_prompt_npz(wav):
            pre = Prompt.load(wav)
        else:
            pre = Prompt(wav=wav)
        if pre.complete:
            return pre
        if pre.wav is None:
            missing = [n for n in ("speech_token", "speech_feat", "embedding") if getattr(pre, n) is None]
            raise PromptError(f"prompt features lack {', '.join(missing)} (give a prompt wav or complete features)")
        audio = self.load_prompt(pre.wav)
        feat = pre.speech_feat if pre.speech_feat is not None else self.extract_speech_feat(audio)[0][0]
        tokens = pre.speech_token
        if tokens is None:
            self._need_model(self._speech_tokenizer, "extracting prompt speech tokens")
            tokens = self.extract_speech_token(audio)[0][0]
        emb = pre.embedding
        if emb is None:
            self._need_model(self._speaker_encoder, "extracting the prompt speaker embedding")
            emb = self.extract_spk_embedding(audio)[0]
        return Prompt(tokens, feat, emb, prompt_text=pre.prompt_text, wav=getattr(audio, "source", pre.wav))

    @staticmethod
    def _need_model(model, what: str) -> None:
        if isinstance(model, (str, os.PathLike)) and not os.path.isfile(model):
            raise PromptError(
                f"no {os.path.basename(os.fspath(model))} in the model folder: {what} from audio needs it. Copy it "
                "from the released model folder, or pass precomputed features (a prompt .npz with speech_token / "
                "speech_feat / embedding, or --prompt-speech-tokens / --prompt-embedding)")
        if model is None:
            raise PromptError(f"this Frontend has no ONNX model for {what}; pass precomputed prompt features")

    # ------------------------------------------------------------------------------------ mode builders
    def _check_prompt_rule(self, model_input: dict) -> None:
        """CosyVoice3 LLM: `<|endofprompt|>` must be in prompt_text + text (in prompt_text for bistream)."""
        if not self.check_endofprompt or self.version != "cosyvoice3":
            return
        eop = self.tokenizer.endofprompt_id
        parts = [model_input.get("prompt_text")]
        if not isinstance(model_input.get("text"), collections.abc.Generator):
            parts.append(model_input.get("text"))
        if any(p is not None and np.any(np.asarray(p) == eop) for p in parts):
            return
        where = "prompt_text" if len(parts) == 1 else "prompt_text or text"
        raise PromptFormatError(
            f"CosyVoice3 needs {ENDOFPROMPT} (id {eop}) in the {where}: use prompt_text = "
            f"'{CV3_SYSTEM_PROMPT}' + transcript (zero_shot), tts_text = '{CV3_SYSTEM_PROMPT}' + text "
            "(cross_lingual) or an instruct text ending in <|endofprompt|> (instruct2)")

    def _speaker(self, spk_id: str) -> dict:
        return self.spk2info[spk_id]

    def frontend_sft(self, tts_text, spk_id: str) -> dict:
        text, text_len = self.extract_text_token(tts_text)
        entry = self._speaker(spk_id)
        if "embedding" not in entry:
            raise SpeakerError(
                f"speaker {spk_id!r} has no 'embedding' entry (sft needs SFT-style spk2info entries; entries made "
                "by add_zero_shot_spk are used with zero_shot_spk_id instead)")
        emb = entry["embedding"]
        model_input = {"text": text, "text_len": text_len, "llm_embedding": emb, "flow_embedding": emb}
        self._check_prompt_rule(model_input)
        return model_input

    def _zero_shot(self, tts_text, prompt_text, prompt_wav, resample_rate, zero_shot_spk_id) -> dict:
        text, text_len = self.extract_text_token(tts_text)
        if zero_shot_spk_id == "":
            prompt_text_token, prompt_text_len = self.extract_text_token(prompt_text)
            prompt = self.prepare_prompt(prompt_wav)
            feat, tokens, emb = prompt.speech_feat[None], prompt.speech_token[None], prompt.embedding[None]
            if (resample_rate or self.sample_rate) == 24000:
                feat, tokens = align_prompt(feat, tokens, self.token_mel_ratio)
            model_input = {
                "prompt_text": prompt_text_token, "prompt_text_len": prompt_text_len,
                "llm_prompt_speech_token": tokens, "llm_prompt_speech_token_len": _i32([tokens.shape[1]]),
                "flow_prompt_speech_token": tokens, "flow_prompt_speech_token_len": _i32([tokens.shape[1]]),
                "prompt_speech_feat": feat, "prompt_speech_feat_len": _i32([feat.shape[1]]),
                "llm_embedding": emb, "flow_embedding": emb,
            }
        else:
            model_input = dict(self._speaker(zero_shot_spk_id))
        model_input["text"] = text
        model_input["text_len"] = text_len
        return model_input

    def frontend_zero_shot(self, tts_text, prompt_text: str, prompt_wav, resample_rate: int | None = None,
                           zero_shot_spk_id: str = "") -> dict:
        """Zero-shot input; with `zero_shot_spk_id` the saved speaker replaces prompt_text/prompt_wav."""
        model_input = self._zero_shot(tts_text, prompt_text, prompt_wav, resample_rate, zero_shot_spk_id)
        self._check_prompt_rule(model_input)
        return model_input

    def _drop(self, model_input: dict, keys, mode: str, spk_id: str) -> dict:
        missing = [k for k in keys if k not in model_input]
        if missing:
            raise SpeakerError(f"{mode}: speaker {spk_id!r} lacks {', '.join(missing)} (not a zero-shot entry)")
        for k in keys:
            del model_input[k]
        return model_input

    def frontend_cross_lingual(self, tts_text, prompt_wav, resample_rate: int | None = None,
                               zero_shot_spk_id: str = "") -> dict:
        """Zero-shot input without the LLM prompt (prompt text and LLM prompt tokens removed)."""
        model_input = self._zero_shot(tts_text, "", prompt_wav, resample_rate, zero_shot_spk_id)
        self._drop(model_input, ("prompt_text", "prompt_text_len", "llm_prompt_speech_token",
                                 "llm_prompt_speech_token_len"), "cross_lingual", zero_shot_spk_id)
        self._check_prompt_rule(model_input)
        return model_input

    def frontend_instruct2(self, tts_text, instruct_text: str, prompt_wav, resample_rate: int | None = None,
                           zero_shot_spk_id: str = "") -> dict:
        """prompt_text = the (unnormalised) instruct text; no LLM prompt speech tokens.

        As upstream, with `zero_shot_spk_id` the saved entry's prompt_text is kept (instruct text ignored).
        """
        model_input = self._zero_shot(tts_text, instruct_text, prompt_wav, resample_rate, zero_shot_spk_id)
        self._drop(model_input, ("llm_prompt_speech_token", "llm_prompt_speech_token_len"), "instruct2",
                   zero_shot_spk_id)
        self._check_prompt_rule(model_input)
        return model_input

    def frontend_vc(self, source_wav, prompt_wav, resample_rate: int | None = None) -> dict:
        """Voice conversion: source speech tokens + the prompt's tokens, mel, embedding (not aligned)."""
        prompt = self.prepare_prompt(prompt_wav)
        source_tokens, source_len = self.extract_speech_token(source_wav, what="source")
        return {
            "source_speech_token": source_tokens, "source_speech_token_len": source_len,
            "flow_prompt_speech_token": prompt.speech_token[None],
            "flow_prompt_speech_token_len": _i32([prompt.speech_token.shape[0]]),
            "prompt_speech_feat": prompt.speech_feat[None], "prompt_speech_feat_len": _i32([prompt.speech_feat.shape[0]]),
            "flow_embedding": prompt.embedding[None],
        }

    # ------------------------------------------------------------------------------------ speakers
    def add_zero_shot_spk(self, prompt_text: str, prompt_wav, zero_shot_spk_id: str) -> bool:
        """Store the zero-shot prompt (model input minus text) under `zero_shot_spk_id`."""
        if zero_shot_spk_id == "":
            raise SpeakerError("do not use an empty zero_shot_spk_id")
        model_input = self._zero_shot("", prompt_text, prompt_wav, self.sample_rate, "")
        del model_input["text"]
        del model_input["text_len"]
        self.spk2info[zero_shot_spk_id] = model_input
        return True

    def save_spkinfo(self, path: str | os.PathLike | None = None) -> str:
        """Save the speakers as `.npz` (default `<model_dir>/spk2info.npz`)."""
        if path is None:
            model_dir = getattr(self, "model_dir", None)
            if model_dir is None:
                raise ValueError("save_spkinfo needs a path (this Frontend was not built from a model folder)")
            path = os.path.join(model_dir, "spk2info.npz")
        return self.spk2info.save(path)

    def list_available_spks(self) -> list[str]:
        return list(self.spk2info)

    # ------------------------------------------------------------------------------------ per-segment inputs
    def inputs_sft(self, tts_text, spk_id: str, text_frontend: bool = True) -> Iterator[dict]:
        for seg in self.text_normalize(tts_text, split=True, text_frontend=text_frontend):
            yield self.frontend_sft(seg, spk_id)

    def inputs_zero_shot(self, tts_text, prompt_text: str, prompt_wav, zero_shot_spk_id: str = "",
                         text_frontend: bool = True) -> Iterator[dict]:
        prompt_text = self.text_normalize(prompt_text, split=False, text_frontend=text_frontend)
        prompt = None if zero_shot_spk_id else self.prepare_prompt(prompt_wav)
        for seg in self.text_normalize(tts_text, split=True, text_frontend=text_frontend):
            if not isinstance(seg, collections.abc.Generator) and len(seg) < 0.5 * len(prompt_text):
                log.warning("synthesis text %s is much shorter than prompt text %s; quality may suffer",
                            seg, prompt_text)
            yield self.frontend_zero_shot(seg, prompt_text, prompt, self.sample_rate, zero_shot_spk_id)

    def inputs_cross_lingual(self, tts_text, prompt_wav, zero_shot_spk_id: str = "",
                             text_frontend: bool = True) -> Iterator[dict]:
        prompt = None if zero_shot_spk_id else self.prepare_prompt(prompt_wav)
        for seg in self.text_normalize(tts_text, split=True, text_frontend=text_frontend):
            yield self.frontend_cross_lingual(seg, prompt, self.sample_rate, zero_shot_spk_id)

    def inputs_instruct2(self, tts_text, instruct_text: str, prompt_wav, zero_shot_spk_id: str = "",
                         text_frontend: bool = True) -> Iterator[dict]:
        prompt = None if zero_shot_spk_id else self.prepare_prompt(prompt_wav)
        for seg in self.text_normalize(tts_text, split=True, text_frontend=text_frontend):
            yield self.frontend_instruct2(seg, instruct_text, prompt, self.sample_rate, zero_shot_spk_id)

    def inputs_vc(self, source_wav, prompt_wav) -> Iterator[dict]:
        yield self.frontend_vc(source_wav, prompt_wav, self.sample_rate)
