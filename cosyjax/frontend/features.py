"""The three prompt feature extractors upstream computes with torch/librosa/whisper, in NumPy.

* `prompt_mel` - matcha `mel_spectrogram` (the yaml's `feat_extractor`): reflect pad (n_fft - hop) / 2,
  STFT (periodic Hann, center False), magnitude sqrt(re^2 + im^2 + 1e-9), librosa Slaney mel basis,
  log(clamp(1e-5)). 24 kHz, n_fft 1920, hop 480, 80 mels, fmax 8000 (CV2) / None = sr/2 (CV3).
  Returns [1, F, 80] (upstream's `prompt_speech_feat`, already transposed), F = N // 480.
* `kaldi_fbank` - `torchaudio.compliance.kaldi.fbank(num_mel_bins=80, dither=0, sample_frequency=16000)`:
  snip-edges framing 400/160, per-frame DC removal, pre-emphasis 0.97 (first sample replicated), Povey window,
  zero-pad to 512, power spectrum, Kaldi mel banks (20 Hz .. Nyquist, mel = 1127 ln(1 + f/700)),
  log(max(x, float32 eps)). `speaker_fbank` subtracts the mean over frames (what campplus.onnx gets).
* `whisper_log_mel` - `whisper.log_mel_spectrogram(audio, n_mels=128)`: STFT n_fft 400 hop 160 (center,
  reflect), last frame dropped, power, Slaney mel (= whisper's bundled filters), log10(clamp(1e-10)),
  floor at max - 8, (x + 4) / 4 -> [1, 128, N // 160].

Spectra are computed in float64 and returned as float32 (torch computes in float32; differences are at
float32 rounding level). Mel bases are built exactly like librosa 0.10 (float32 storage).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from cosyjax.frontend.errors import AudioTooShortError

__all__ = [
    "MelConfig",
    "kaldi_fbank",
    "kaldi_mel_banks",
    "prompt_mel",
    "slaney_mel_filters",
    "speaker_fbank",
    "whisper_log_mel",
]


# --------------------------------------------------------------------------------------- mel bases
def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asanyarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    if f.ndim:
        log_t = f >= min_log_hz
        mels[log_t] = min_log_mel + np.log(f[log_t] / min_log_hz) / logstep
    elif f >= min_log_hz:
        mels = min_log_mel + np.log(f / min_log_hz) / logstep
    return mels


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asanyarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    freqs = f_sp * m
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    log_t = m >= min_log_mel
    freqs[log_t] = min_log_hz * np.exp(logstep * (m[log_t] - min_log_mel))
    return freqs


@functools.lru_cache(maxsize=8)
def slaney_mel_filters(sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """`librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)` (Slaney scale and
    area norm) -> float32 [n_mels, n_fft // 2 + 1]."""
    if fmax is None:
        fmax = float(sr) / 2
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float32)
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_f = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    enorm = 2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels])
    weights *= enorm[:, np.newaxis]
    weights.setflags(write=False)
    return weights


@functools.lru_cache(maxsize=4)
def kaldi_mel_banks(num_bins: int = 80, padded_window_size: int = 512, sample_frequency: float = 16000.0,
                    low_freq: float = 20.0, high_freq: float = 0.0) -> np.ndarray:
    """torchaudio `kaldi.get_mel_banks` (no VTLN) padded with a zero Nyquist column -> float32
    [num_bins, padded_window_size // 2 + 1]."""
    num_fft_bins = padded_window_size // 2
    nyquist = 0.5 * sample_frequency
    if high_freq <= 0.0:
        high_freq += nyquist
    fft_bin_width = sample_frequency / padded_window_size
    mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high_freq / 700.0)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = np.arange(num_bins, dtype=np.float32)[:, None]
    f32 = np.float32
    left = f32(mel_low) + b * f32(delta)
    center = f32(mel_low) + (b + f32(1.0)) * f32(delta)
    right = f32(mel_low) + (b + f32(2.0)) * f32(delta)
    mel = (f32(1127.0) * np.log(f32(1.0) + (f32(fft_bin_width) * np.arange(num_fft_bins, dtype=np.float32))
                                / f32(700.0)))[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = np.maximum(f32(0.0), np.minimum(up, down)).astype(np.float32)
    banks = np.pad(banks, ((0, 0), (0, 1)))
    banks.setflags(write=False)
    return banks


def _hann_periodic(n: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2.0 * math.pi * np.arange(n) / n)


def _frames(x: np.ndarray, size: int, hop: int) -> np.ndarray:
    """[N] -> [1 + (N - size) // hop, size] strided view."""
    return np.lib.stride_tricks.sliding_window_view(x, size)[::hop]


def _as_1d(wav: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(wav)
    if x.ndim == 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 1:
        raise ValueError(f"{name} expects a mono waveform [N] or [1, N], got shape {x.shape}")
    return x


# --------------------------------------------------------------------------------------- prompt mel
@dataclasses.dataclass(frozen=True)
class MelConfig:
    """The yaml's `feat_extractor: !name:matcha.utils.audio.mel_spectrogram` arguments."""

    n_fft: int = 1920
    num_mels: int = 80
    sampling_rate: int = 24000
    hop_size: int = 480
    win_size: int = 1920
    fmin: float = 0
    fmax: float | None = 8000
    center: bool = False

    @classmethod
    def from_yaml_node(cls, node) -> "MelConfig":
        """From the parsed `feat_extractor` node (a `YamlCall` or a plain dict of its kwargs)."""
        kw = dict(getattr(node, "kwargs", node) or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(kw) - names
        if unknown:
            raise ValueError(f"feat_extractor has unsupported arguments: {sorted(unknown)}")
        return cls(**kw)

    @classmethod
    def from_model_config(cls, cfg) -> "MelConfig":
        node = cfg.yaml.get("feat_extractor")
        if node is None:
            raise ValueError(f"{cfg.model_dir}: the yaml has no feat_extractor entry")
        return cls.from_yaml_node(node)

    @property
    def mel_basis(self) -> np.ndarray:
        return slaney_mel_filters(self.sampling_rate, self.n_fft, self.num_mels, self.fmin, self.fmax)


def prompt_mel(wav: np.ndarray, config: MelConfig = MelConfig()) -> np.ndarray:
    """Matcha mel spectrogram of a mono waveform at `config.sampling_rate` -> float32 [1, F, num_mels]."""
    x = _as_1d(wav, "prompt_mel").astype(np.float64)
    pad = int((config.n_fft - config.hop_size) / 2)
    if x.shape[0] <= pad:
        raise AudioTooShortError(
            f"prompt mel needs more than {pad} samples at {config.sampling_rate} Hz, got {x.shape[0]}")
    x = np.pad(x, (pad, pad), mode="reflect")
    if config.center:
        x = np.pad(x, (config.n_fft // 2, config.n_fft // 2), mode="reflect")
    if x.shape[0] < config.n_fft:
        raise AudioTooShortError(f"prompt mel needs at least one {config.n_fft}-sample frame")
    window = np.zeros(config.n_fft)
    left = (config.n_fft - config.win_size) // 2
    window[left:left + config.win_size] = _hann_periodic(config.win_size)
    spec = np.fft.rfft(_frames(x, config.n_fft, config.hop_size) * window, axis=-1)
    mag = np.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-9)
    mel = mag @ config.mel_basis.astype(np.float64).T
    return np.log(np.maximum(mel, 1e-5)).astype(np.float32)[None]


# --------------------------------------------------------------------------------------- kaldi fbank
def kaldi_fbank(wav: np.ndarray, num_mel_bins: int = 80, sample_frequency: float = 16000.0,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, preemphasis: float = 0.97,
                low_freq: float = 20.0, high_freq: float = 0.0) -> np.ndarray:
    """torchaudio `kaldi.fbank(wav, num_mel_bins, dither=0, sample_frequency)` with the other defaults
    (povey window, snip_edges, remove DC, power, log) -> float32 [frames, num_mel_bins]."""
    x = _as_1d(wav, "kaldi_fbank").astype(np.float64)
    shift = int(sample_frequency * frame_shift_ms * 0.001)
    size = int(sample_frequency * frame_length_ms * 0.001)
    padded = 1 if size == 0 else 2 ** (size - 1).bit_length()
    if x.shape[0] < size:
        raise AudioTooShortError(f"kaldi fbank needs at least {size} samples, got {x.shape[0]}")
    frames = np.array(_frames(x, size, shift))
    frames -= frames.mean(axis=1, keepdims=True)
    prev = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = frames - preemphasis * prev
    n = np.arange(size)
    povey = (0.5 - 0.5 * np.cos(2.0 * math.pi * n / (size - 1))) ** 0.85
    frames = frames * povey
    spec = np.fft.rfft(frames, n=padded, axis=-1)
    power = spec.real ** 2 + spec.imag ** 2
    banks = kaldi_mel_banks(num_mel_bins, padded, sample_frequency, low_freq, high_freq).astype(np.float64)
    energies = power @ banks.T
    eps = float(np.finfo(np.float32).eps)
    return np.log(np.maximum(energies, eps)).astype(np.float32)


def speaker_fbank(wav: np.ndarray) -> np.ndarray:
    """The campplus input: 80-bin Kaldi fbank of the 16 kHz prompt minus its mean over frames ->
    float32 [frames, 80]."""
    feat = kaldi_fbank(wav, num_mel_bins=80, sample_frequency=16000.0)
    return feat - feat.mean(axis=0, keepdims=True)


# --------------------------------------------------------------------------------------- whisper
def whisper_log_mel(wav: np.ndarray, n_mels: int = 128, n_fft: int = 400, hop_length: int = 160,
                    sample_rate: int = 16000) -> np.ndarray:
    """`whisper.log_mel_spectrogram(audio, n_mels)` without 30 s padding -> float32 [1, n_mels, N // hop]."""
    x = _as_1d(wav, "whisper_log_mel").astype(np.float64)
    if x.shape[0] <= n_fft // 2:
        raise AudioTooShortError(f"whisper log-mel needs more than {n_fft // 2} samples, got {x.shape[0]}")
    x = np.pad(x, (n_fft // 2, n_fft // 2), mode="reflect")
    spec = np.fft.rfft(_frames(x, n_fft, hop_length) * _hann_periodic(n_fft), axis=-1)[:-1]
    power = spec.real ** 2 + spec.imag ** 2
    filters = slaney_mel_filters(sample_rate, n_fft, n_mels).astype(np.float64)
    mel = power @ filters.T  # [frames, n_mels]
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    log_spec = (log_spec + 4.0) / 4.0
    return log_spec.T.astype(np.float32)[None]
