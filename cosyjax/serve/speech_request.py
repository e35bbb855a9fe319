"""`POST /v1/audio/speech` bodies: OpenAI's fields plus the peers' extensions, validated with clear errors.

OpenAI: model, input (1-4096 characters), voice, response_format, speed (0.25-4.0), instructions,
stream_format ('audio' | 'sse'). Extensions: seed (int), ref_audio (base64 / data URL) + ref_text
(one-off cloning), stream (bool: force streaming synthesis on or off).

Streaming synthesis (chunks as the model produces them) is used when `stream` is true, or when it is
absent and `stream_format` is given or `response_format` is 'pcm'. Otherwise the request is
non-streaming and joins a batch.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
from typing import Optional

from cosyjax.serve.audio import STREAM_FORMATS
from cosyjax.serve.errors import ServeError

__all__ = ["SpeechRequest", "parse_speech_request", "Limits"]


@dataclasses.dataclass(frozen=True)
class Limits:
    max_input_chars: int = 4096
    max_ref_audio_bytes: int = 10 * 2 ** 20


@dataclasses.dataclass(frozen=True)
class SpeechRequest:
    model: str
    input: str
    voice: Optional[str]
    response_format: str
    speed: float
    instructions: Optional[str]
    stream_format: Optional[str]
    stream: bool
    seed: Optional[int]
    ref_audio: Optional[bytes]
    ref_text: Optional[str]


def _str(d: dict, name: str, required: bool = False) -> Optional[str]:
    v = d.get(name)
    if v is None:
        if required:
            raise ServeError(f"missing required field {name!r}", param=name, code="missing_field")
        return None
    if not isinstance(v, str):
        raise ServeError(f"{name} must be a string, got {type(v).__name__}", param=name)
    return v


def _decode_ref_audio(v: str, limit: int) -> bytes:
    if v.startswith("data:"):
        head, sep, v = v.partition(",")
        if not sep or ";base64" not in head:
            raise ServeError("ref_audio data URL must be base64 (data:audio/wav;base64,...)", param="ref_audio")
    if len(v) > 4 * limit // 3 + 4:
        raise ServeError(f"ref_audio is larger than the {limit} byte limit", param="ref_audio", status=413,
                         code="too_large")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ServeError(f"ref_audio is not valid base64 ({e})", param="ref_audio") from e


def parse_speech_request(d, *, formats: tuple[str, ...], models: tuple[str, ...],
                         limits: Limits = Limits()) -> SpeechRequest:
    """A decoded JSON body -> SpeechRequest, or ServeError(400) naming the bad field."""
    if not isinstance(d, dict):
        raise ServeError(f"request body must be a JSON object, got {type(d).__name__}")
    model = _str(d, "model", required=True)
    if model not in models:
        raise ServeError(f"unknown model {model!r}; this server offers: {', '.join(models)}", param="model",
                         code="model_not_found")
    text = _str(d, "input", required=True)
    if not text.strip():
        raise ServeError("input is empty", param="input", code="empty_input")
    if len(text) > limits.max_input_chars:
        raise ServeError(f"input has {len(text)} characters; the limit is {limits.max_input_chars}", param="input",
                         code="input_too_long")
    voice = d.get("voice")
    if isinstance(voice, dict):  # newer OpenAI clients may send {"id": "..."} for custom voices
        voice = voice.get("id")
    if voice is not None and not isinstance(voice, str):
        raise ServeError(f"voice must be a string, got {type(voice).__name__}", param="voice")
    ref_audio_s = _str(d, "ref_audio")
    ref_text = _str(d, "ref_text")
    if voice is None and ref_audio_s is None:
        raise ServeError("missing required field 'voice' (or ref_audio for one-off cloning)", param="voice",
                         code="missing_field")
    stream_format = _str(d, "stream_format")
    if stream_format is not None and stream_format not in ("audio", "sse"):
        raise ServeError(f"unsupported stream_format {stream_format!r}; accepted: audio, sse", param="stream_format")
    fmt = _str(d, "response_format")
    stream_flag = d.get("stream")
    if stream_flag is not None and not isinstance(stream_flag, bool):
        raise ServeError("stream must be true or false", param="stream")
    if fmt is None:
        fmt = "pcm" if (stream_format is not None or stream_flag) else "mp3" if "mp3" in formats else "wav"
    if fmt not in formats:
        raise ServeError(f"unsupported response_format {fmt!r}; accepted: {', '.join(formats)}",
                         param="response_format", code="unsupported_format")
    stream = stream_flag if stream_flag is not None else (stream_format is not None or fmt == "pcm")
    if stream and fmt not in STREAM_FORMATS:
        raise ServeError(f"response_format {fmt!r} cannot be streamed; streaming accepts: {', '.join(STREAM_FORMATS)}"
                         " (or send stream=false for a whole file)", param="response_format",
                         code="unsupported_format")
    speed = d.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0.25 <= float(speed) <= 4.0:
        raise ServeError(f"speed must be a number from 0.25 to 4.0, got {speed!r}", param="speed")
    if stream and float(speed) != 1.0:
        raise ServeError("speed other than 1.0 needs non-streaming synthesis (send stream=false with a file "
                         "format such as wav)", param="speed")
    instructions = _str(d, "instructions")
    if instructions is not None and not instructions.strip():
        instructions = None
    if instructions is not None and len(instructions) > limits.max_input_chars:
        raise ServeError(f"instructions have {len(instructions)} characters; the limit is {limits.max_input_chars}",
                         param="instructions")
    seed = d.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32):
        raise ServeError(f"seed must be an integer from 0 to 2**32-1, got {seed!r}", param="seed")
    ref_audio = _decode_ref_audio(ref_audio_s, limits.max_ref_audio_bytes) if ref_audio_s is not None else None
    return SpeechRequest(model=model, input=text, voice=voice, response_format=fmt, speed=float(speed),
                         instructions=instructions, stream_format=stream_format, stream=bool(stream), seed=seed,
                         ref_audio=ref_audio, ref_text=ref_text)
