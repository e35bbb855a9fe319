"""`ModelInput`: the one typed model input of the engine (a frozen dataclass of arrays, one utterance).

Upstream passes a string-keyed dict (`CosyVoiceFrontEnd.frontend_*` -> `CosyVoice2Model.tts(**model_input)`);
that dict is accepted only at the API boundary (`ModelInput.from_dict`), everything behind it takes this.
Shapes (no batch axis): token ids int32 [L], `prompt_speech_feat` float32 [2P, 80] (time-major mel),
embeddings float32 [192]. Absent parts are empty arrays, as upstream's `tts()` defaults are empty tensors.

Kinds of input (`kind`):
* 'text'     — text (+ optional prompt text / LLM prompt speech): the LLM makes the speech tokens;
* 'bistream' — text arrives as an iterable of id chunks (`text_stream`): upstream `inference_bistream`;
* 'tokens'   — voice conversion: `source_speech_token` replaces the LLM (no silent-token filter, as upstream).
"""
from __future__ import annotations

import collections.abc
import dataclasses
from typing import Any, Iterable, Optional

import numpy as np

from cosyjax.errors import CosyJaxError

__all__ = ["ModelInput", "ModelInputError"]


class ModelInputError(CosyJaxError):
    """A model input the engine cannot run (missing parts, bad shapes, mismatched prompt lengths)."""


def _ids(name: str, x) -> np.ndarray:
    """[L] / [1, L] int ids (or None) -> int32 [L]."""
    if x is None:
        return np.zeros((0,), np.int32)
    a = np.asarray(x)
    if a.ndim == 2:
        if a.shape[0] != 1:
            raise ModelInputError(f"{name}: one utterance per model input, got shape {a.shape}")
        a = a[0]
    if a.ndim != 1:
        raise ModelInputError(f"{name} must be [L] or [1, L] token ids, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ModelInputError(f"{name} must hold integer token ids, got dtype {a.dtype}")
    return a.astype(np.int32)


def _vec(name: str, x, dim: int) -> Optional[np.ndarray]:
    if x is None:
        return None
    a = np.asarray(x, np.float32)
    if a.size == 0:
        return None
    a = a.reshape(-1)
    if a.shape != (dim,):
        raise ModelInputError(f"{name} must have {dim} values, got shape {np.shape(x)}")
    if not np.all(np.isfinite(a)):
        raise ModelInputError(f"{name} contains NaN or Inf")
    return a


@dataclasses.dataclass(frozen=True, eq=False)
class ModelInput:
    """One utterance for the engine (see the module docstring for shapes and kinds)."""

    text: np.ndarray  # int32 [Lt] (empty for 'tokens' and 'bistream')
    prompt_text: np.ndarray  # int32 [Lp]
    llm_prompt_speech_token: np.ndarray  # int32 [Pl]
    flow_prompt_speech_token: np.ndarray  # int32 [P]
    prompt_speech_feat: np.ndarray  # float32 [2P, 80]
    flow_embedding: np.ndarray  # float32 [192]
    llm_embedding: Optional[np.ndarray] = None  # float32 [192] (unused by Qwen2LM / CosyVoice3LM)
    source_speech_token: Optional[np.ndarray] = None  # int32 [N]: voice conversion
    text_stream: Optional[Iterable] = None  # bistream: iterable of int id chunks

    @property
    def kind(self) -> str:
        if self.source_speech_token is not None:
            return "tokens"
        return "bistream" if self.text_stream is not None else "text"

    @property
    def prompt_len(self) -> int:
        return int(self.flow_prompt_speech_token.shape[0])

    @classmethod
    def from_dict(cls, d: dict, token_mel_ratio: int = 2) -> "ModelInput":
        """Upstream's model_input dict (`frontend_*` output: [1, L] ids, [1, F, 80] mel, [1, 192] embeddings)."""
        if isinstance(d, ModelInput):
            return d
        if not isinstance(d, collections.abc.Mapping):
            raise ModelInputError(f"model input must be a dict or ModelInput, got {type(d).__name__}")
        emb = _vec("flow_embedding", d.get("flow_embedding"), 192)
        if emb is None:
            raise ModelInputError("model input lacks flow_embedding (the speaker embedding)")
        ptok = _ids("flow_prompt_speech_token", d.get("flow_prompt_speech_token"))
        feat = d.get("prompt_speech_feat")
        feat = np.zeros((0, 80), np.float32) if feat is None else np.asarray(feat, np.float32)
        if feat.ndim == 3:
            if feat.shape[0] != 1:
                raise ModelInputError(f"prompt_speech_feat: one utterance per model input, got {feat.shape}")
            feat = feat[0]
        if feat.size == 0:
            feat = np.zeros((0, 80), np.float32)
        if feat.ndim != 2 or feat.shape[1] != 80:
            raise ModelInputError(f"prompt_speech_feat must be [frames, 80] (time-major mel), got {feat.shape}")
        if feat.shape[0] != token_mel_ratio * ptok.shape[0]:
            raise ModelInputError(
                f"prompt_speech_feat has {feat.shape[0]} frames, flow prompt has {ptok.shape[0]} tokens (need "
                f"{token_mel_ratio} frames per token; the frontend trims both: token_len = min(frames // 2, tokens))")
        if not np.all(np.isfinite(feat)):
            raise ModelInputError("prompt_speech_feat contains NaN or Inf")
        text = d.get("text")
        stream = None
        source = None
        if "source_speech_token" in d and np.asarray(d["source_speech_token"]).size:
            source = _ids("source_speech_token", d["source_speech_token"])
            text = None
        elif isinstance(text, collections.abc.Iterator):  # a generator of id chunks (bistream)
            stream, text = text, None
        elif text is None:
            raise ModelInputError("model input lacks text (or source_speech_token for voice conversion)")
        text = _ids("text", text)
        if source is None and stream is None and text.size == 0:
            raise ModelInputError("text is empty: nothing to synthesise")
        return cls(text=text, prompt_text=_ids("prompt_text", d.get("prompt_text")),
                   llm_prompt_speech_token=_ids("llm_prompt_speech_token", d.get("llm_prompt_speech_token")),
                   flow_prompt_speech_token=ptok, prompt_speech_feat=np.ascontiguousarray(feat), flow_embedding=emb,
                   llm_embedding=_vec("llm_embedding", d.get("llm_embedding"), 192), source_speech_token=source,
                   text_stream=stream)

    def to_dict(self) -> dict[str, Any]:
        """Upstream's layout ([1, L] arrays + `*_len`), e.g. for saving or for upstream-style callers."""
        i32 = lambda n: np.asarray([n], np.int32)  # noqa: E731
        d: dict[str, Any] = {}
        if self.source_speech_token is not None:
            d["source_speech_token"] = self.source_speech_token[None]
            d["source_speech_token_len"] = i32(self.source_speech_token.shape[0])
        else:
            d["text"] = self.text_stream if self.text_stream is not None else self.text[None]
            d["text_len"] = i32(0 if self.text_stream is not None else self.text.shape[0])
        for name in ("prompt_text", "llm_prompt_speech_token", "flow_prompt_speech_token"):
            a = getattr(self, name)
            d[name], d[name + "_len"] = a[None], i32(a.shape[0])
        d["prompt_speech_feat"] = self.prompt_speech_feat[None]
        d["prompt_speech_feat_len"] = i32(self.prompt_speech_feat.shape[0])
        d["flow_embedding"] = self.flow_embedding[None]
        if self.llm_embedding is not None:
            d["llm_embedding"] = self.llm_embedding[None]
        return d
