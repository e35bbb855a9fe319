"""Errors raised by the frontend (text, audio, features, ONNX models, speaker cache).

Every bad-input error is a `FrontendError` (a `ValueError`), so callers can catch one class; a missing
optional package is a `MissingDependencyError` (an `ImportError`) that names the pip extra to install.
"""
from __future__ import annotations
from cosyjax.errors import CosyJaxError

__all__ = [
    "AudioError",
    "AudioReadError",
    "AudioTooLongError",
    "AudioTooShortError",
    "EmptyAudioError",
    "FrontendError",
    "MissingDependencyError",
    "OnnxModelError",
    "PromptFormatError",
    "SampleRateError",
    "SilentAudioError",
    "SpeakerError",
    "TokenizerFilesError",
]


class FrontendError(CosyJaxError):
    """Input the frontend cannot prepare for the models."""


class TokenizerFilesError(FrontendError):
    """The Qwen2 tokenizer files (`CosyVoice-BlankEN/vocab.json`, `merges.txt`, ...) are missing or broken."""


class AudioError(FrontendError):
    """A prompt / source waveform that cannot be used."""


class AudioReadError(AudioError):
    """The audio file cannot be opened or decoded."""


class EmptyAudioError(AudioError):
    """The audio has no samples."""


class SilentAudioError(AudioError):
    """The audio is (digitally) silent."""


class SampleRateError(AudioError):
    """The audio's sample rate is below what the frontend accepts (16 kHz)."""


class AudioTooLongError(AudioError):
    """The audio is longer than the speech tokenizer accepts (30 s)."""


class AudioTooShortError(AudioError):
    """The audio is too short to give a single feature frame / speech token."""


class OnnxModelError(FrontendError):
    """An ONNX model file that is missing or whose inputs/outputs do not look like upstream's."""


class SpeakerError(FrontendError):
    """An unknown speaker id, or a speaker-cache entry that lacks what a mode needs."""


class PromptFormatError(FrontendError):
    """Text that breaks a model's prompt convention (CosyVoice3 needs `<|endofprompt|>`)."""


class MissingDependencyError(ImportError, CosyJaxError):
    """An optional package (onnxruntime, ...) is needed for this call but is not installed."""
