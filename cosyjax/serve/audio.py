"""Audio encoders for responses (WAV / raw PCM / FLAC / MP3 / Opus) and the decoder for uploads.

`pcm` is OpenAI's raw format: 16-bit little-endian mono at the model rate (24 kHz), no header. The
compressed formats are whatever the installed libsndfile writes (`encodable_formats()` says which).
`wav` is 32-bit float WAV (lossless: the model's samples exactly; every WAV reader takes it). Streaming
responses send `pcm` chunks, or `wav` = one header with open-ended sizes + float32 chunks.
"""
from __future__ import annotations

import io
import struct
from typing import Optional

import numpy as np

from cosyjax.serve.errors import ServeError

__all__ = ["encode", "pcm16", "float32_le", "wav_stream_header", "encodable_formats", "STREAM_FORMATS", "MEDIA_TYPES",
           "decode_upload"]

# response_format -> (soundfile format, subtype)
_SOUNDFILE = {"wav": ("WAV", "FLOAT"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"),
              "opus": ("OGG", "OPUS")}
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg",
               "opus": "audio/ogg"}
STREAM_FORMATS = ("pcm", "wav")  # formats whose bytes can be sent as chunks are produced


def encodable_formats() -> tuple[str, ...]:
    """The response formats this installation can write: pcm, wav and those libsndfile supports."""
    import soundfile as sf

    have = sf.available_formats()
    out = ["wav", "pcm"]
    for name in ("flac", "mp3", "opus"):
        fmt, sub = _SOUNDFILE[name]
        if fmt in have and sub in sf.available_subtypes(fmt):
            out.append(name)
    return tuple(out)


def pcm16(audio: np.ndarray) -> bytes:
    """float32 [N] (or [1, N]) in [-1, 1] -> 16-bit little-endian PCM bytes (clipped)."""
    x = np.clip(np.asarray(audio, np.float32).reshape(-1), -1.0, 1.0)
    return (np.round(x * 32767.0)).astype("<i2").tobytes()


def float32_le(audio: np.ndarray) -> bytes:
    """float32 [N] -> little-endian float32 bytes (the sample data of a streamed `wav`)."""
    return np.asarray(audio, np.float32).reshape(-1).astype("<f4").tobytes()


def wav_stream_header(sample_rate: int) -> bytes:
    """A 44-byte float32 mono WAV header whose RIFF/data sizes say 'unknown' (0xFFFFFFFF), for streaming."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 3, 1, sample_rate, sample_rate * 4, 4, 32) +
            b"data" + struct.pack("<I", unknown))


def encode(audio: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """float32 [N] -> the bytes of a whole file in `fmt` (one of `encodable_formats()`)."""
    if fmt == "pcm":
        return pcm16(audio)
    if fmt not in _SOUNDFILE:
        raise ServeError(f"unsupported response_format {fmt!r}", param="response_format")
    import soundfile as sf

    sf_fmt, subtype = _SOUNDFILE[fmt]
    buf = io.BytesIO()
    x = np.clip(np.asarray(audio, np.float32).reshape(-1), -1.0, 1.0)
    sf.write(buf, x, sample_rate, format=sf_fmt, subtype=subtype)
    return buf.getvalue()


def decode_upload(data: bytes, filename: Optional[str] = None) -> tuple[np.ndarray, int]:
    """Bytes of an uploaded audio file -> (float32 mono [N], sample rate); ServeError(400) if it is not audio."""
    import soundfile as sf

    try:
        x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise ServeError(f"file {filename or ''!s} is not a readable audio file ({e}); send WAV/FLAC/MP3/OGG audio "
                         "or a prompt .npz (speech_token, speech_feat, embedding)", param="file",
                         code="invalid_audio") from e
    if x.shape[0] == 0:
        raise ServeError("uploaded audio is empty", param="file", code="invalid_audio")
    return x.mean(axis=1), int(sr)
