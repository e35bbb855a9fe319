"""Prompt / source audio: read with soundfile, mix to mono, resample like torchaudio, validate.

Upstream `cosyvoice/utils/file_utils.py:load_wav(wav, target_sr, min_sr=16000)`:
`torchaudio.load(wav, backend='soundfile')` (= `soundfile.read(dtype='float32', always_2d=True).T`, PCM scaled
to [-1, 1)), mean over channels -> [1, N], and if the file rate differs from `target_sr` (it must then be
>= 16 kHz) `torchaudio.transforms.Resample(rate, target_sr)`. The frontend loads a prompt at 16 kHz (speech
tokens, speaker embedding) and 24 kHz (prompt mel); the speech tokenizer asserts <= 30 s at 16 kHz.

`Audio` decodes a file once and caches its resampled versions; `load_audio` also rejects unusable prompts
(unreadable, empty, silent, rate < 16 kHz, longer than 30 s, too short for one feature frame) up front
with `AudioError`s instead of failing deep inside the feature code.
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Union

import numpy as np

from cosyjax.frontend.errors import (
    AudioReadError,
    AudioTooLongError,
    AudioTooShortError,
    EmptyAudioError,
    SampleRateError,
    SilentAudioError,
)
from cosyjax.frontend.resampling import resample, resampled_length

__all__ = [
    "Audio",
    "AudioSource",
    "MAX_PROMPT_SECONDS",
    "MIN_PROMPT_SECONDS",
    "MIN_SAMPLE_RATE",
    "SILENCE_PEAK",
    "load_audio",
    "load_wav",
    "read_audio",
]

MIN_SAMPLE_RATE = 16000
#: Upstream asserts `len(speech_16k) / 16000 <= 30` before the speech tokenizer.
MAX_PROMPT_SECONDS = 30.0
#: Shortest prompt that still yields speech tokens, a fbank frame and a prompt-mel frame.
MIN_PROMPT_SECONDS = 0.1
#: Peak |x| below this (-80 dBFS, ~3 LSB of 16-bit PCM) counts as silence.
SILENCE_PEAK = 1e-4

AudioSource = Union[str, os.PathLike, io.IOBase, "Audio", tuple]


def _describe(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    return getattr(src, "name", None) or f"<{type(src).__name__}>"


def read_audio(src) -> tuple[np.ndarray, int]:
    """Decode a file (path or file object) -> (float32 [C, N] in [-1, 1], sample_rate)."""
    import soundfile as sf

    name = _describe(src)
    if isinstance(src, (str, os.PathLike)) and not os.path.isfile(src):
        raise AudioReadError(f"audio file not found: {name}")
    try:
        data, rate = sf.read(src, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise AudioReadError(f"cannot read audio {name}: {e}") from e
    return np.ascontiguousarray(data.T), int(rate)


def _as_channels_first(samples, name: str) -> np.ndarray:
    x = np.asarray(samples)
    if not np.issubdtype(x.dtype, np.floating):
        raise AudioReadError(f"{name}: in-memory audio must be floating point in [-1, 1], got dtype {x.dtype}")
    if x.ndim == 1:
        x = x[None, :]
    elif x.ndim != 2:
        raise AudioReadError(f"{name}: in-memory audio must be [N] or [channels, N], got shape {x.shape}")
    return x.astype(np.float32, copy=False)


@dataclasses.dataclass(eq=False)
class Audio:
    """Mono audio at its native rate; `at(rate)` -> float32 [1, M] exactly as upstream `load_wav(..., rate)`."""

    samples: np.ndarray  # float32 [1, N] (mean of the channels)
    sample_rate: int
    source: str = "<array>"
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_source(cls, src: AudioSource) -> "Audio":
        """From a path / file object (decoded with soundfile), an `Audio`, or `(array, sample_rate)`
        with array [N] or [channels, N] float in [-1, 1]."""
        if isinstance(src, Audio):
            return src
        if isinstance(src, tuple):
            if len(src) != 2:
                raise AudioReadError("in-memory audio must be given as (samples, sample_rate)")
            data, rate = _as_channels_first(src[0], "<array>"), src[1]
            name = "<array>"
        else:
            data, rate = read_audio(src)
            name = _describe(src)
        if int(rate) != rate or rate <= 0:
            raise SampleRateError(f"{name}: invalid sample rate {rate}")
        mono = data.mean(axis=0, keepdims=True, dtype=np.float32) if data.shape[0] > 1 else data[:1].copy()
        return cls(mono.astype(np.float32, copy=False), int(rate), name)

    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate

    def length_at(self, rate: int) -> int:
        return resampled_length(self.num_samples, self.sample_rate, rate)

    def at(self, rate: int, min_sr: int = MIN_SAMPLE_RATE) -> np.ndarray:
        """float32 [1, M] at `rate` (resampled only when the native rate differs, like upstream)."""
        if rate == self.sample_rate:
            return self.samples
        if self.sample_rate < min_sr:
            raise SampleRateError(
                f"{self.source}: sample rate {self.sample_rate} Hz is below {min_sr} Hz; upstream only resamples "
                f"audio recorded at >= {min_sr} Hz (record or export the prompt at 16 kHz or more)")
        if rate not in self._cache:
            self._cache[rate] = resample(self.samples, self.sample_rate, rate)
        return self._cache[rate]

    def validate(self, what: str = "prompt", max_seconds: float | None = MAX_PROMPT_SECONDS,
                 min_seconds: float = MIN_PROMPT_SECONDS, min_sample_rate: int = MIN_SAMPLE_RATE,
                 silence_peak: float = SILENCE_PEAK) -> "Audio":
        """Raise an `AudioError` naming the problem; returns self."""
        name = f"{what} audio {self.source}"
        if self.num_samples == 0:
            raise EmptyAudioError(f"{name} is empty (0 samples)")
        if self.sample_rate < min_sample_rate:
            raise SampleRateError(
                f"{name}: sample rate {self.sample_rate} Hz is too low; at least {min_sample_rate} Hz is needed "
                "(the speech tokenizer and speaker model work at 16 kHz and upstream does not upsample below it)")
        if not np.all(np.isfinite(self.samples)):
            raise AudioReadError(f"{name} contains NaN or infinite samples")
        peak = float(np.max(np.abs(self.samples)))
        if peak < silence_peak:
            raise SilentAudioError(
                f"{name} is silent (peak amplitude {peak:.3g} < {silence_peak:g}); a prompt must contain speech")
        n16 = self.length_at(16000)
        if max_seconds is not None and n16 > max_seconds * 16000:
            raise AudioTooLongError(
                f"{name} is {n16 / 16000:.2f} s long; the speech tokenizer accepts at most {max_seconds:g} s "
                "(trim the prompt)")
        if self.duration < min_seconds:
            raise AudioTooShortError(
                f"{name} is {self.duration * 1000:.0f} ms long; at least {min_seconds * 1000:.0f} ms is needed "
                "for speech tokens and features")
        return self


def load_audio(src: AudioSource, what: str = "prompt", validate: bool = True, **limits) -> Audio:
    """Decode + mono-mix `src` and (by default) reject unusable audio; see `Audio.validate` for `limits`."""
    audio = Audio.from_source(src)
    return audio.validate(what, **limits) if validate else audio


def load_wav(src: AudioSource, target_sr: int, min_sr: int = MIN_SAMPLE_RATE) -> np.ndarray:
    """Upstream `load_wav`: float32 [1, N] mono at `target_sr` (no validation beyond the rate check)."""
    return Audio.from_source(src).at(target_sr, min_sr=min_sr)
