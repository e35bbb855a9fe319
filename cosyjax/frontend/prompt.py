"""`Prompt`: the one prompt class — what a prompt wav contributes (speech tokens, mel, speaker embedding).

Upstream computes the parts with the speech-tokenizer ONNX model (tokens), the matcha mel extractor
(mel) and campplus.onnx (embedding). `Frontend.prepare_prompt(wav)` fills all three from audio; a
folder without the ONNX models (e.g. the tiny demo folder) can use precomputed features: an `.npz`
with `speech_token` [P] int, `speech_feat` [F, 80] and `embedding` [192] (optional `prompt_text`),
or arrays passed to `Prompt(...)`. Missing parts are computed from `wav` when one is given.

Shapes are per utterance, without a batch axis: tokens int32 [P], mel float32 [F, 80] (time-major),
embedding float32 [192]. (Upstream's model-input dicts add the leading batch axis of 1.)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from cosyjax.frontend.errors import FrontendError

__all__ = ["Prompt", "PrecomputedPrompt", "PromptError", "is_prompt_npz"]


class PromptError(FrontendError):
    """Unusable prompt features, or a prompt that needs an ONNX model the folder lacks."""


def is_prompt_npz(x) -> bool:
    return isinstance(x, (str, os.PathLike)) and os.fspath(x).lower().endswith(".npz")


@dataclasses.dataclass
class Prompt:
    """Prompt speech tokens [P] int32, prompt mel [F, 80] float32, speaker embedding [192] float32.

    `wav` (optional) is the audio the missing parts can still be computed from (a path, or any
    `AudioSource`); `prompt_text` is a transcript stored with precomputed features.
    """

    speech_token: Optional[np.ndarray] = None
    speech_feat: Optional[np.ndarray] = None
    embedding: Optional[np.ndarray] = None
    prompt_text: Optional[str] = None
    wav: object = None

    def __post_init__(self):
        if self.speech_token is not None:
            t = np.asarray(self.speech_token)
            if t.ndim == 2 and t.shape[0] == 1:
                t = t[0]
            if t.ndim != 1 or not (np.issubdtype(t.dtype, np.integer) or t.size == 0):
                raise PromptError(f"speech_token must be a 1-D integer array, got {t.dtype} {t.shape}")
            self.speech_token = t.astype(np.int32)
        if self.speech_feat is not None:
            f = np.asarray(self.speech_feat, np.float32)
            if f.ndim == 3 and f.shape[0] == 1:
                f = f[0]
            if f.ndim != 2 or f.shape[1] != 80:
                raise PromptError(f"speech_feat must be [frames, 80], got {f.shape}")
            if not np.all(np.isfinite(f)):
                raise PromptError("speech_feat contains NaN or Inf")
            self.speech_feat = f
        if self.embedding is not None:
            e = np.asarray(self.embedding, np.float32).reshape(-1)
            if e.shape != (192,):
                raise PromptError(f"embedding must have 192 values, got {e.size}")
            if not np.all(np.isfinite(e)):
                raise PromptError("embedding contains NaN or Inf")
            self.embedding = e

    @property
    def complete(self) -> bool:
        return self.speech_token is not None and self.speech_feat is not None and self.embedding is not None

    @property
    def source(self) -> str:
        return str(self.wav) if isinstance(self.wav, (str, os.PathLike)) else "precomputed"

    @classmethod
    def from_parts(cls, wav=None, speech_token=None, embedding=None, speech_feat=None) -> "Prompt":
        """Start from a prompt `.npz` (if `wav` is one) and override the given parts."""
        base = cls.load(wav) if is_prompt_npz(wav) else cls(wav=os.fspath(wav) if wav is not None else None)
        return cls(speech_token=speech_token if speech_token is not None else base.speech_token,
                   speech_feat=speech_feat if speech_feat is not None else base.speech_feat,
                   embedding=embedding if embedding is not None else base.embedding,
                   prompt_text=base.prompt_text, wav=base.wav)

    @classmethod
    def load(cls, path) -> "Prompt":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise PromptError(f"prompt features file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise PromptError(f"cannot read prompt features {path}: {e}") from e
        unknown = set(d) - {"speech_token", "speech_feat", "embedding", "prompt_text"}
        if unknown:
            raise PromptError(f"{path}: unknown arrays {sorted(unknown)} (expected speech_token, speech_feat, embedding)")
        text = d.get("prompt_text")
        return cls(speech_token=d.get("speech_token"), speech_feat=d.get("speech_feat"), embedding=d.get("embedding"),
                   prompt_text=str(text) if text is not None else None)

    def save(self, path) -> None:
        arrays = {k: v for k, v in (("speech_token", self.speech_token), ("speech_feat", self.speech_feat),
                                    ("embedding", self.embedding)) if v is not None}
        if self.prompt_text is not None:
            arrays["prompt_text"] = np.array(self.prompt_text)
        np.savez(path, **arrays)


PrecomputedPrompt = Prompt  # the name the API and CLI documented first
