"""The streaming scheduler of upstream `CosyVoice2Model.tts(stream=True)`, with per-call state.

Upstream (`cosyvoice/cli/model.py`, `CosyVoice2Model.tts` / `token2wav`, `CosyVoice3Model.token2wav`,
`CosyVoiceModel.llm_job`, `cosyvoice/utils/common.py:fade_in_out`) runs the LLM in a thread and, while
tokens arrive, calls `token2wav` on a growing prefix. This module reproduces that schedule and drives
the jitted stages through two small interfaces, so the schedule, caches and fades are testable without
models and either algorithm plugs in:

* a *flow stage*: `chunk(tokens [n], token_offset, n_tokens) -> (mel [1, F, 80], flow_frames)` for a
  non-final chunk (streaming=True, finalize=False) and `final(...)` for the last one (streaming=False,
  finalize=True); mel starts at frame `token_offset * token_mel_ratio`. `RecomputeFlow` re-solves the whole
  prefix every chunk (upstream's algorithm, the reference); `cosyjax.flow.cv{2,3}.incremental` keep the
  per-step K/V and conv state of earlier chunks, so a chunk costs what it emits.
* a CosyVoice3 *vocoder stage*: `push(mel_new [1, F, 80], finalize) -> (speech [1, N], vocoder_frames)`.
  `RecomputeVocoderCV3` re-vocodes the whole accumulated mel (upstream); `cosyjax.hift.incremental` carries
  the causal generator's state. CosyVoice2 vocodes new frames + an 8-frame mel cache (upstream's design).

* `StreamScheduler`: hop `25 + pad` (pad aligns prompt + first hop to the 25-token chunk grid), then
  `min(100, 2 * hop)`; a chunk fires when `3` look-ahead tokens beyond the hop exist; the final chunk
  uses full attention (`streaming=False`, `finalize=True`). Unlike upstream, whose `token_hop_len`
  lives on the model object and is never reset (SPEC §6.2 quirk), the state lives in one request.
* `SilentTokenFilter`: CosyVoice3 keeps at most 5 consecutive silent/breath tokens (`llm_job`).
* `CV2Token2Wav`: 8-frame mel cache, 3840-sample source cache, Hamming(7680) cross-fade in float64.
* `CV3Token2Wav`: appends each chunk's new mel to its vocoder stage and yields what it returns.
* `run_stream`: the streaming driver over a token iterator (tokens may arrive one by one from a
  streaming LLM or all at once); yields `{'tts_speech': audio, 'work': {'flow_frames', 'vocoder_frames'}}`.
Non-streaming synthesis is not here: it is one call of the jitted core (`cosyjax.pipeline.synthesize`).

Shapes: mel is NWC `[1, T, 80]`, audio `[1, N]` float32 at 24 kHz (host numpy between jitted stages).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from cosyjax.errors import CosyJaxError

__all__ = [
    "StreamConfig", "Chunk", "ChunkRecord", "StreamScheduler", "plan_schedule",
    "CV3_SILENT_TOKENS", "StreamError", "SilentTokenFilter", "filter_silent_tokens",
    "fade_in_out", "RecomputeFlow", "RecomputeVocoderCV3", "CV2Token2Wav", "CV3Token2Wav", "make_token2wav",
    "run_stream",
]

# `CosyVoice3Model.__init__`: FSQ silence / breath codes.
CV3_SILENT_TOKENS = (1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323)
MAX_SILENT_RUN = 5


class StreamError(CosyJaxError):
    """A streaming call the scheduler cannot serve (bad chunk order, speed with streaming, ...)."""


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
            raise StreamError(f"bad hop lengths {self.token_hop_len}/{self.token_max_hop_len}")
        if self.stream_scale_factor < 1:
            raise StreamError("stream_scale_factor should be >= 1")


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
            raise StreamError(f"prompt_len must be >= 0, got {prompt_len}")
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
            raise StreamError("scheduler already finalized")
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
            raise StreamError("scheduler already finalized")
        if n_total < self.offset:
            raise StreamError(f"n_total {n_total} < token offset {self.offset}")
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


class RecomputeFlow:
    """The reference flow stage: every chunk re-solves the whole prefix (upstream's algorithm, O(n^2) total).

    `flow_inference(params, cfg, token, token_len, prompt_token, prompt_token_len, prompt_feat,
    prompt_feat_len, embedding, *, streaming, finalize, dtype, attention_impl)` is a flow version's host
    wrapper (`cosyjax.flow.cv{2,3}.model.flow_inference`)."""

    def __init__(self, flow_inference, params, cfg, prompt_token, prompt_feat, embedding, *, dtype="float32",
                 attention_impl="auto"):
        self._run = flow_inference
        self.params, self.cfg = params, cfg
        self.ptok = np.asarray(prompt_token, np.int32).reshape(1, -1)
        self.feat = np.asarray(prompt_feat, np.float32).reshape(1, -1, 80)
        self.emb = np.asarray(embedding, np.float32).reshape(1, -1)
        self.kw = dict(dtype=dtype, attention_impl=attention_impl)

    def _call(self, tokens, token_offset, n_tokens, streaming: bool, finalize: bool):
        toks = np.asarray(tokens, np.int32).reshape(1, -1)[:, :n_tokens]
        r = self.cfg.token_mel_ratio
        P = self.ptok.shape[1]
        mel, _ = self._run(self.params, self.cfg, toks, np.array([toks.shape[1]]), self.ptok, np.array([P]), self.feat,
                           np.array([self.feat.shape[1]]), self.emb, streaming=streaming, finalize=finalize, **self.kw)
        lookahead = 0 if finalize else self.cfg.pre_lookahead_len
        frames = (P + toks.shape[1] - lookahead) * r  # valid frames the estimator ran on (bucket padding aside)
        return np.asarray(mel)[:, token_offset * r:], frames

    def chunk(self, tokens, token_offset: int, n_tokens: int):
        return self._call(tokens, token_offset, n_tokens, True, False)

    def final(self, tokens, token_offset: int, n_tokens: int):
        return self._call(tokens, token_offset, n_tokens, False, True)


class RecomputeVocoderCV3:
    """The reference CosyVoice3 vocoder stage (upstream `CosyVoice3Model.token2wav`): keeps the whole mel,
    re-vocodes it every chunk, yields the samples past what was already yielded.

    `vocode(mel [1, T, 80], finalize) -> speech [1, N]` (N = T*480, or (T-8)*480 when not finalizing)."""

    def __init__(self, vocode: Callable):
        self.vocode = vocode
        self.mel: Optional[np.ndarray] = None
        self.speech_offset = 0

    def push(self, mel_new, finalize: bool):
        mel_new = np.asarray(mel_new, np.float32)
        self.mel = mel_new if self.mel is None else np.concatenate([self.mel, mel_new], axis=1)
        if self.mel.shape[1] == 0:
            return np.zeros((1, 0), np.float32), 0
        speech = np.asarray(self.vocode(self.mel, finalize), np.float32).reshape(1, -1)[:, self.speech_offset:]
        self.speech_offset += speech.shape[1]
        return speech, int(self.mel.shape[1])


def _flow_call(flow, tokens: np.ndarray, chunk: Chunk):
    call = flow.final if chunk.finalize else flow.chunk
    mel, frames = call(tokens, chunk.token_offset, chunk.n_tokens)
    return np.asarray(mel, np.float32), int(frames)


class CV2Token2Wav:
    """Per-request `CosyVoice2Model.token2wav`: mel / source / speech caches and Hamming cross-fade.

    `vocoder(mel [1, T, 80], cache_source [1, S] (S = 0 or 3840)) -> (speech [1, T*480], source [1, T*480])`
    must overwrite the first S source samples with `cache_source` (HiFTGenerator.inference).
    """

    def __init__(self, flow, vocoder: Callable, config: StreamConfig = StreamConfig()):
        self.flow, self.vocoder, self.config = flow, vocoder, config
        self.window = np.hamming(2 * config.source_cache_len)  # float64, symmetric
        self.cache: Optional[dict] = None

    def __call__(self, tokens: np.ndarray, chunk: Chunk):
        """-> (speech [1, N] float32, work {'flow_frames', 'vocoder_frames'})."""
        cfg = self.config
        mel, flow_frames = _flow_call(self.flow, tokens, chunk)
        if self.cache is not None:
            mel = np.concatenate([self.cache["mel"], mel], axis=1)
            cache_source = self.cache["source"]
        else:
            cache_source = np.zeros((1, 0), np.float32)
        if mel.shape[1] == 0:
            speech = source = np.zeros((1, 0), np.float32)
        else:
            speech, source = self.vocoder(mel, cache_source)
        speech = np.asarray(speech, np.float32).reshape(1, -1)
        source = np.asarray(source, np.float32).reshape(1, -1)
        if self.cache is not None:
            speech = fade_in_out(speech, self.cache["speech"], self.window)
        if not chunk.finalize:
            n = cfg.source_cache_len
            self.cache = {"mel": mel[:, -cfg.mel_cache_len:], "source": source[:, -n:], "speech": speech[:, -n:]}
            speech = speech[:, :-n]
        return speech, {"flow_frames": flow_frames, "vocoder_frames": int(mel.shape[1])}


class CV3Token2Wav:
    """Per-request `CosyVoice3Model.token2wav`: each chunk's new mel goes to the vocoder stage."""

    def __init__(self, flow, vocoder, config: StreamConfig = StreamConfig()):
        self.flow, self.vocoder, self.config = flow, vocoder, config

    def __call__(self, tokens: np.ndarray, chunk: Chunk):
        """-> (speech [1, N] float32, work {'flow_frames', 'vocoder_frames'})."""
        mel, flow_frames = _flow_call(self.flow, tokens, chunk)
        speech, voc_frames = self.vocoder.push(mel, chunk.finalize)
        return np.asarray(speech, np.float32).reshape(1, -1), {"flow_frames": flow_frames,
                                                              "vocoder_frames": int(voc_frames)}


def make_token2wav(version: str, flow, vocoder, config: StreamConfig = StreamConfig()):
    if version == "cosyvoice2":
        return CV2Token2Wav(flow, vocoder, config)
    if version == "cosyvoice3":
        return CV3Token2Wav(flow, vocoder, config)
    raise StreamError(f"unsupported version {version!r}")


def _as_token_list(item) -> list[int]:
    a = np.asarray(item)
    return [int(a)] if a.ndim == 0 else [int(t) for t in a.reshape(-1)]


def run_stream(tokens: Iterable, token2wav, prompt_len: int, *, silent_tokens: Sequence[int] = (),
               config: StreamConfig = StreamConfig(), records: Optional[list] = None) -> Iterator[dict]:
    """Drive `token2wav` over arriving LLM tokens like upstream `tts(stream=True)`; yields per chunk
    {'tts_speech': float32 [1, N], 'work': {'flow_frames': F, 'vocoder_frames': V}}.

    tokens: iterable of ints or int arrays (a streaming LLM may yield one token or a block at a time).
    silent_tokens: CosyVoice3's list (empty for CosyVoice2 and for voice conversion).
    records: if a list is given, a `ChunkRecord` is appended per `token2wav` call.
    """
    filt = SilentTokenFilter(silent_tokens) if silent_tokens else None
    kept: list[int] = []
    scheduler = StreamScheduler(prompt_len, config)

    def emit(chunk: Chunk):
        audio, work = token2wav(np.asarray(kept, np.int32), chunk)
        if records is not None:
            records.append(ChunkRecord(chunk, int(audio.shape[1])))
        return {"tts_speech": audio, "work": work}

    for item in tokens:
        for t in _as_token_list(item):
            if filt is None or filt.keep(t):
                kept.append(t)
        while (chunk := scheduler.poll(len(kept))) is not None:
            yield emit(chunk)
    yield emit(scheduler.final(len(kept)))
