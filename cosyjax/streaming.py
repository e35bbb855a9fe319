"""The streaming scheduler of upstream `CosyVoice2Model.tts(stream=True)`, with per-call state.

Upstream (`cosyvoice/cli/model.py`, `CosyVoice2Model.tts` / `token2wav`, `CosyVoice3Model.token2wav`,
`CosyVoiceModel.llm_job`, `cosyvoice/utils/common.py:fade_in_out`) runs the LLM in a thread and, while
tokens arrive, calls `token2wav` on a growing prefix. This module reproduces that behaviour with the
flow and the vocoder injected as callables, so the schedule, caches and fades are testable without
models and any vocoder/flow implementation can be plugged in:

* `StreamScheduler`: hop `25 + pad` (pad aligns prompt + first hop to the 25-token chunk grid), then
  `min(100, 2 * hop)`; a chunk fires when `3` look-ahead tokens beyond the hop exist; the final chunk
  uses full attention (`streaming=False`, `finalize=True`). Unlike upstream, whose `token_hop_len`
  lives on the model object and is never reset (SPEC §6.2 quirk), the state lives in one request.
* `SilentTokenFilter`: CosyVoice3 keeps at most 5 consecutive silent/breath tokens (`llm_job`).
* `CV2Token2Wav`: 8-frame mel cache, 3840-sample source cache, Hamming(7680) cross-fade in float64.
* `CV3Token2Wav`: keeps the whole mel and re-vocodes it every chunk, emitting from `speech_offset`.
* `run_tts`: the non-streaming / streaming driver over a token iterator (tokens may arrive one by
  one from a streaming LLM or all at once).

Shapes: mel is NWC `[1, T, 80]`, audio `[1, N]` float32 at 24 kHz (numpy; the driver is host-side).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

__all__ = [
    "StreamConfig", "Chunk", "ChunkRecord", "StreamScheduler", "plan_schedule",
    "CV3_SILENT_TOKENS", "SilentTokenFilter", "filter_silent_tokens",
    "fade_in_out", "resize_mel_linear", "CV2Token2Wav", "CV3Token2Wav", "make_token2wav", "run_tts",
]

# `CosyVoice3Model.__init__`: FSQ silence / breath codes.
CV3_SILENT_TOKENS = (1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323)
MAX_SILENT_RUN = 5


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """Constants of `CosyVoice2Model.__init__` (shared by CosyVoice3)."""

    token_hop_len: int = 25          # must equal the training chunk size (flow chunk masks)
    token_max_hop_len: int = 100     # 4 * token_hop_len
    stream_scale_factor: int = 2
    pre_lookahead_len: int = 3       # flow.pre_lookahead_len: right-context tokens of a non-final chunk
    token_mel_ratio: int = 2         # mel frames per token
    mel_cache_len: int = 8           # CV2 HiFT mel cache (frames)
    samples_per_frame: int = 480     # 24 kHz / 50 Hz

    @property
    def source_cache_len(self) -> int:
        return self.mel_cache_len * self.samples_per_frame

    def __post_init__(self):
        if self.token_hop_len <= 0 or self.token_max_hop_len < self.token_hop_len:
            raise ValueError(f"bad hop lengths {self.token_hop_len}/{self.token_max_hop_len}")
        if self.stream_scale_factor < 1:
            raise ValueError("stream_scale_factor should be >= 1")


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One `token2wav` call: feed `tokens[:n_tokens]`, keep mel from `token_offset * token_mel_ratio`."""

    token_offset: int
    n_tokens: int
    finalize: bool
    streaming: bool  # the flow's chunk-mask flag (False for the final chunk: full attention)


@dataclasses.dataclass(frozen=True)
class ChunkRecord:
    """What a driver did: the chunk plus the number of samples it yielded."""

    chunk: Chunk
    n_samples: int

    def row(self) -> tuple[int, int, int, int, int]:
        """(token_offset, n_tokens fed, finalize, stream flag, samples yielded) as in the golden `schedule`."""
        c = self.chunk
        return (c.token_offset, c.n_tokens, int(c.finalize), int(c.streaming), self.n_samples)


class StreamScheduler:
    """Decides when the next streaming chunk fires (upstream `tts(stream=True)` loop).

    `prompt_len` = number of flow prompt speech tokens. Call `poll(n_available)` whenever tokens
    arrived (repeat while it returns a chunk), then `final(n_total)` once the LLM has finished.
    """

    def __init__(self, prompt_len: int, config: StreamConfig = StreamConfig()):
        if prompt_len < 0:
            raise ValueError(f"prompt_len must be >= 0, got {prompt_len}")
        self.config = config
        self.hop = config.token_hop_len
        # pad so that prompt + first hop ends on a multiple of token_hop_len
        self.pad = int(math.ceil(prompt_len / self.hop) * self.hop - prompt_len)
        self.offset = 0
        self.done = False

    @property
    def this_hop(self) -> int:
        return self.hop + self.pad if self.offset == 0 else self.hop

    def tokens_needed(self) -> int:
        """Number of available tokens at which the next non-final chunk fires."""
        return self.offset + self.this_hop + self.config.pre_lookahead_len

    def poll(self, n_available: int) -> Optional[Chunk]:
        """The next non-final chunk if `n_available` tokens suffice, else None."""
        if self.done:
            raise RuntimeError("scheduler already finalized")
        if n_available < self.tokens_needed():
            return None
        hop = self.this_hop
        chunk = Chunk(self.offset, self.offset + hop + self.config.pre_lookahead_len,
                      finalize=False, streaming=True)
        self.offset += hop
        self.hop = min(self.config.token_max_hop_len, self.hop * self.config.stream_scale_factor)
        return chunk

    def final(self, n_total: int) -> Chunk:
        """The last chunk: every remaining token, finalize=True, streaming=False (full attention)."""
        if self.done:
            raise RuntimeError("scheduler already finalized")
        if n_total < self.offset:
            raise ValueError(f"n_total {n_total} < token offset {self.offset}")
        self.done = True
        return Chunk(self.offset, n_total, finalize=True, streaming=False)


def plan_schedule(n_tokens: int, prompt_len: int, config: StreamConfig = StreamConfig()) -> list[Chunk]:
    """All chunks of a streaming run over `n_tokens` flow tokens (independent of arrival timing)."""
    s = StreamScheduler(prompt_len, config)
    chunks = []
    while (c := s.poll(n_tokens)) is not None:
        chunks.append(c)
    chunks.append(s.final(n_tokens))
    return chunks


class SilentTokenFilter:
    """`llm_job`'s filter: after `max_run` consecutive silent tokens, further ones are dropped.

    The LLM still conditions on every token; only the flow's token list is filtered.
    """

    def __init__(self, silent_tokens: Sequence[int] = CV3_SILENT_TOKENS, max_run: int = MAX_SILENT_RUN):
        self.silent = frozenset(int(t) for t in silent_tokens)
        self.max_run = max_run
        self.run = 0

    def keep(self, token: int) -> bool:
        if int(token) in self.silent:
            self.run += 1
            return self.run <= self.max_run
        self.run = 0
        return True


def filter_silent_tokens(tokens: Iterable[int], silent_tokens: Sequence[int] = CV3_SILENT_TOKENS,
                         max_run: int = MAX_SILENT_RUN) -> list[int]:
    f = SilentTokenFilter(silent_tokens, max_run)
    return [int(t) for t in tokens if f.keep(t)]


def fade_in_out(new: np.ndarray, old: np.ndarray, window: np.ndarray) -> np.ndarray:
    """`common.fade_in_out`: cross-fade the first `len(window)//2` samples of `new` with the tail of `old`.

    new: [..., N], old: [..., M] (M >= half), window: float64 [2*half]. Upstream multiplies float32
    tensors by the float64 numpy window, so the blend is computed in float64 and rounded once.
    """
    half = window.shape[0] // 2
    out = np.array(new, copy=True)
    blend = (new[..., :half].astype(np.float64) * window[:half]
             + old[..., -half:].astype(np.float64) * window[half:])
    out[..., :half] = blend.astype(out.dtype)
    return out


def resize_mel_linear(mel: np.ndarray, n_out: int) -> np.ndarray:
    """`F.interpolate(mel, size=n_out, mode='linear')` (align_corners=False) along time. mel: [B, T, C]."""
    mel = np.asarray(mel)
    t_in = mel.shape[1]
    if n_out <= 0:
        raise ValueError(f"speed change leaves {n_out} mel frames")
    scale = np.float32(t_in / n_out)
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), t_in - 1)
    i1 = np.minimum(i0 + 1, t_in - 1)
    lam = (src - i0.astype(np.float32))[None, :, None]
    return ((np.float32(1) - lam) * mel[:, i0] + lam * mel[:, i1]).astype(mel.dtype)


# Flow callable: (tokens [1, n] int32, streaming, finalize) -> mel [1, T, 80] (prompt frames removed).
FlowFn = Callable[[np.ndarray, bool, bool], np.ndarray]


class CV2Token2Wav:
    """Per-request `CosyVoice2Model.token2wav`: mel / source / speech caches and Hamming cross-fade.

    `vocoder(mel [1, T, 80], cache_source [1, S] (S = 0 or 3840)) -> (speech [1, T*480], source [1, T*480])`
    must overwrite the first S source samples with `cache_source` (HiFTGenerator.inference).
    """

    def __init__(self, flow: FlowFn, vocoder: Callable, config: StreamConfig = StreamConfig()):
        self.flow, self.vocoder, self.config = flow, vocoder, config
        self.window = np.hamming(2 * config.source_cache_len)  # float64, symmetric
        self.cache: Optional[dict] = None

    def __call__(self, tokens: np.ndarray, chunk: Chunk, speed: float = 1.0) -> np.ndarray:
        cfg = self.config
        mel = np.asarray(self.flow(tokens[:, :chunk.n_tokens], chunk.streaming, chunk.finalize))
        mel = mel[:, chunk.token_offset * cfg.token_mel_ratio:]
        if self.cache is not None:
            mel = np.concatenate([self.cache["mel"], mel], axis=1)
            cache_source = self.cache["source"]
        else:
            cache_source = np.zeros((1, 0), np.float32)
        if speed != 1.0:
            if self.cache is not None or not chunk.finalize:
                raise ValueError("speed change is only supported in non-streaming inference")
            mel = resize_mel_linear(mel, int(mel.shape[1] / speed))
        speech, source = self.vocoder(mel, cache_source)
        speech = np.asarray(speech, np.float32).reshape(1, -1)
        source = np.asarray(source, np.float32).reshape(1, -1)
        if self.cache is not None:
            speech = fade_in_out(speech, self.cache["speech"], self.window)
        if not chunk.finalize:
            n = cfg.source_cache_len
            self.cache = {"mel": mel[:, -cfg.mel_cache_len:], "source": source[:, -n:], "speech": speech[:, -n:]}
            speech = speech[:, :-n]
        return speech


class CV3Token2Wav:
    """Per-request `CosyVoice3Model.token2wav`: re-vocodes the whole accumulated mel every chunk.

    `vocoder(mel [1, T, 80], finalize) -> speech [1, N]` (N = T*480 if finalize else (T-8)*480).
    """

    def __init__(self, flow: FlowFn, vocoder: Callable, config: StreamConfig = StreamConfig()):
        self.flow, self.vocoder, self.config = flow, vocoder, config
        self.mel: Optional[np.ndarray] = None
        self.speech_offset = 0

    def __call__(self, tokens: np.ndarray, chunk: Chunk, speed: float = 1.0) -> np.ndarray:
        mel = np.asarray(self.flow(tokens[:, :chunk.n_tokens], chunk.streaming, chunk.finalize))
        mel = mel[:, chunk.token_offset * self.config.token_mel_ratio:]
        self.mel = mel if self.mel is None else np.concatenate([self.mel, mel], axis=1)
        mel = self.mel
        if speed != 1.0:
            if chunk.token_offset != 0 or not chunk.finalize:
                raise ValueError("speed change is only supported in non-streaming inference")
            mel = resize_mel_linear(mel, int(mel.shape[1] / speed))
        speech = np.asarray(self.vocoder(mel, chunk.finalize), np.float32).reshape(1, -1)
        speech = speech[:, self.speech_offset:]
        self.speech_offset += speech.shape[1]
        return speech


def make_token2wav(version: str, flow: FlowFn, vocoder: Callable, config: StreamConfig = StreamConfig()):
    if version == "cosyvoice2":
        return CV2Token2Wav(flow, vocoder, config)
    if version == "cosyvoice3":
        return CV3Token2Wav(flow, vocoder, config)
    raise ValueError(f"unsupported version {version!r}")


def _as_token_list(item) -> list[int]:
    a = np.asarray(item)
    return [int(a)] if a.ndim == 0 else [int(t) for t in a.reshape(-1)]


def run_tts(tokens: Iterable, token2wav, prompt_len: int, *, stream: bool, speed: float = 1.0,
            silent_tokens: Sequence[int] = (), config: StreamConfig = StreamConfig(),
            records: Optional[list] = None) -> Iterator[np.ndarray]:
    """Drive `token2wav` over LLM tokens like upstream `tts()`; yields audio chunks [1, N] float32.

    tokens: iterable of ints or int arrays (a streaming LLM may yield one token or a block at a
    time). silent_tokens: CosyVoice3's list (empty for CosyVoice2 and for voice conversion).
    records: if a list is given, a `ChunkRecord` is appended per `token2wav` call.
    """
    if stream and speed != 1.0:
        raise ValueError("speed change is only supported in non-streaming inference (stream=False)")
    filt = SilentTokenFilter(silent_tokens) if silent_tokens else None
    kept: list[int] = []
    scheduler = StreamScheduler(prompt_len, config) if stream else None

    def emit(chunk: Chunk):
        arr = np.asarray(kept, np.int32)[None, :]
        audio = token2wav(arr, chunk, speed=speed if chunk.finalize else 1.0)
        if records is not None:
            records.append(ChunkRecord(chunk, int(audio.shape[1])))
        return audio

    for item in tokens:
        for t in _as_token_list(item):
            if filt is None or filt.keep(t):
                kept.append(t)
        if scheduler is not None:
            while (chunk := scheduler.poll(len(kept))) is not None:
                yield emit(chunk)
    if scheduler is not None:
        yield emit(scheduler.final(len(kept)))
    else:
        yield emit(Chunk(0, len(kept), finalize=True, streaming=False))
