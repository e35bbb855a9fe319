"""Stream scheduler, silent filter, caches and fades against the golden e2e recordings.

The flow and vocoder are replaced by replays of the recorded upstream tensors
(`tests/golden/<v>/e2e/stream.npz`), so these tests check the orchestration alone, bit-exactly.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cosyjax.streaming import (CV3_SILENT_TOKENS, Chunk, CV2Token2Wav, CV3Token2Wav, RecomputeVocoderCV3,
                               SilentTokenFilter, StreamConfig, StreamError, StreamScheduler, fade_in_out,
                               filter_silent_tokens, plan_schedule, run_stream)
from tests.conftest import GOLDEN

# tests/golden/README.md "Streaming schedule": (offset, n_tokens fed, finalize, stream flag, samples yielded)
GOLDEN_SCHEDULES = {
    "cosyvoice2": (14, [(0, 39, 0, 1, 30720), (36, 89, 0, 1, 48000), (86, 189, 0, 1, 96000), (186, 200, 1, 0, 17280)]),
    "cosyvoice3": (20, [(0, 33, 0, 1, 24960), (30, 83, 0, 1, 48000), (80, 183, 0, 1, 96000), (180, 200, 1, 0, 23040)]),
}


def _e2e(version, name):
    path = os.path.join(GOLDEN, version, "e2e", f"{name}.npz")
    if not os.path.exists(path):
        pytest.skip(f"{path} absent")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("version", ["cosyvoice2", "cosyvoice3"])
def test_plan_matches_golden_schedule(version):
    prompt_len, rows = GOLDEN_SCHEDULES[version]
    plan = plan_schedule(200, prompt_len)
    assert [(c.token_offset, c.n_tokens, int(c.finalize), int(c.streaming)) for c in plan] == [r[:4] for r in rows]
    rec = _e2e(version, "stream")
    assert rec["schedule"].tolist() == [list(r) for r in rows]


def test_scheduler_state_is_per_call():
    # upstream mutates model.token_hop_len (25 -> 100) and never resets it; here a new call starts at 25
    first = plan_schedule(200, 14)
    second = plan_schedule(200, 14)
    assert first == second
    assert first[0].n_tokens == 39


def test_scheduler_incremental_equals_plan():
    s = StreamScheduler(14)
    chunks = []
    for n in range(1, 201):  # one token at a time, as a streaming LLM delivers them
        while (c := s.poll(n)) is not None:
            chunks.append(c)
    chunks.append(s.final(200))
    assert chunks == plan_schedule(200, 14)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 700), p=st.integers(0, 130))
def test_schedule_properties(n, p):
    cfg = StreamConfig()
    plan = plan_schedule(n, p, cfg)
    assert plan[-1].finalize and not plan[-1].streaming and plan[-1].n_tokens == n
    for c in plan[:-1]:
        assert not c.finalize and c.streaming
        # every non-final flow call ends on the 25-token chunk grid (+3 look-ahead tokens)
        assert (p + c.n_tokens - cfg.pre_lookahead_len) % cfg.token_hop_len == 0
        assert c.n_tokens <= n
    offsets = [c.token_offset for c in plan]
    assert offsets == sorted(offsets) and offsets[0] == 0
    for a, b in zip(plan[:-1], plan[1:]):
        assert b.token_offset == a.n_tokens - cfg.pre_lookahead_len
        assert b.token_offset - a.token_offset <= cfg.token_max_hop_len + cfg.token_hop_len
    # the final chunk always gets at least the look-ahead tokens of the last hop
    if len(plan) > 1:
        assert n - plan[-1].token_offset >= cfg.pre_lookahead_len


def test_silent_filter_runs_of_five():
    s = CV3_SILENT_TOKENS
    toks = [7, 1, 2, 28, 29, 55, 248, 494, 9, 2241, 2241, 2241, 2241, 2241, 2241, 2241, 3]
    out = filter_silent_tokens(toks, s)
    assert out == [7, 1, 2, 28, 29, 55, 9, 2241, 2241, 2241, 2241, 2241, 3]
    assert filter_silent_tokens(toks, ()) == toks
    f = SilentTokenFilter(s)
    assert [f.keep(t) for t in [1] * 7] == [True] * 5 + [False] * 2


def test_silent_filter_golden_forced_silence():
    rec = _e2e("cosyvoice3", "nonstream_forced_silence")
    got = filter_silent_tokens(rec["llm_tokens"].tolist(), CV3_SILENT_TOKENS)
    assert got == rec["tts_speech_tokens"].tolist()
    assert len(got) == 197


def test_fade_in_out_float64():
    rng = np.random.default_rng(0)
    new = rng.standard_normal((1, 9000)).astype(np.float32)
    old = rng.standard_normal((1, 3840)).astype(np.float32)
    w = np.hamming(7680)
    out = fade_in_out(new, old, w)
    ref = (new[:, :3840].astype(np.float64) * w[:3840] + old.astype(np.float64) * w[3840:]).astype(np.float32)
    np.testing.assert_array_equal(out[:, :3840], ref)
    np.testing.assert_array_equal(out[:, 3840:], new[:, 3840:])
    assert out.dtype == np.float32


class _Replay:
    """Plays back recorded upstream flow / hift outputs and records what it was fed."""

    def __init__(self, rec, version):
        self.rec, self.version = rec, version
        self.flow_calls, self.hift_calls = [], []
        self.n_chunks = int(rec["n_chunks"])

    # the flow-stage interface of cosyjax.streaming: chunk()/final() -> (mel from token_offset*2, frames)
    def chunk(self, tokens, token_offset, n_tokens, final=False):
        i = len(self.flow_calls)
        self.flow_calls.append((np.asarray(tokens[:n_tokens])[None].copy(), not final, final))
        mel = np.transpose(self.rec[f"flow{i}__mel"], (0, 2, 1))  # [1, 80, T] -> [1, T, 80]
        return mel[:, 2 * token_offset:], mel.shape[1]

    def final(self, tokens, token_offset, n_tokens):
        return self.chunk(tokens, token_offset, n_tokens, final=True)

    def hift_cv2(self, mel, cache_source):
        i = len(self.hift_calls)
        self.hift_calls.append((mel.copy(), cache_source.copy()))
        r = self.rec
        n = int(r[f"hift{i}__speech_len"])
        audio = r[f"chunk{i}__audio"]
        parts = [r[f"hift{i}__speech_head_prefade"], audio[:, 3840:]] if i > 0 else [audio]
        if i + 1 < self.n_chunks:
            parts.append(r[f"chunk{i}__cache_speech"])
        speech = np.concatenate(parts, axis=1)
        assert speech.shape[1] == n
        if i == 0:  # first chunk: no fade, so the head is the recorded output itself
            np.testing.assert_array_equal(speech[:, :3840], r["hift0__speech_head_prefade"])
        source = np.zeros((1, n), np.float32)
        if i + 1 < self.n_chunks:
            source[:, -3840:] = r[f"hift{i + 1}__cache_source"].reshape(1, -1)
        return speech, source

    def hift_cv3(self, mel, finalize):
        i = len(self.hift_calls)
        self.hift_calls.append((mel.copy(), finalize))
        return np.concatenate([self.rec[f"chunk{j}__audio"] for j in range(i + 1)], axis=1)


@pytest.mark.parametrize("version", ["cosyvoice2", "cosyvoice3"])
def test_stream_driver_replays_golden(version):
    rec = _e2e(version, "stream")
    inputs = _e2e(version, "inputs")
    replay = _Replay(rec, version)
    if version == "cosyvoice2":
        t2w = CV2Token2Wav(replay, replay.hift_cv2)
        silent = ()
    else:
        t2w = CV3Token2Wav(replay, RecomputeVocoderCV3(replay.hift_cv3))  # upstream's re-vocode-everything stage
        silent = CV3_SILENT_TOKENS
    records = []
    # the LLM delivers tokens one at a time
    outs = list(run_stream(iter(rec["llm_tokens"].tolist()), t2w, inputs["flow_prompt_speech_token"].shape[1],
                           silent_tokens=silent, records=records))
    chunks = [o["tts_speech"] for o in outs]
    for i, o in enumerate(outs):  # the work each chunk reports is what its stages returned
        assert o["work"]["flow_frames"] == rec[f"flow{i}__mel"].shape[2]
        if version == "cosyvoice2":
            assert o["work"]["vocoder_frames"] == rec[f"hift{i}__speech_feat"].shape[2]
        else:
            assert o["work"]["vocoder_frames"] == int(rec[f"hift{i}__mel_len"])
    assert [list(r.row()) for r in records] == rec["schedule"].tolist()
    assert len(chunks) == int(rec["n_chunks"])
    tokens = rec["tts_speech_tokens"]
    for i, (toks, streaming, finalize) in enumerate(replay.flow_calls):
        assert toks.shape[1] == int(rec[f"flow{i}__n_tokens"])
        np.testing.assert_array_equal(toks[0], tokens[:toks.shape[1]])
        assert streaming == bool(rec[f"flow{i}__streaming"]) and finalize == bool(rec[f"flow{i}__finalize"])
    for i, audio in enumerate(chunks):
        np.testing.assert_array_equal(audio, rec[f"chunk{i}__audio"])  # bit-exact, fades included
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), rec["tts_speech"])
    if version == "cosyvoice2":
        for i, (mel, cache_source) in enumerate(replay.hift_calls):
            np.testing.assert_array_equal(mel, np.transpose(rec[f"hift{i}__speech_feat"], (0, 2, 1)))
            np.testing.assert_array_equal(cache_source.reshape(-1), rec[f"hift{i}__cache_source"].reshape(-1))
    else:
        for i, (mel, finalize) in enumerate(replay.hift_calls):
            assert mel.shape[1] == int(rec[f"hift{i}__mel_len"])
            assert finalize == bool(rec[f"hift{i}__finalize"])
        last_mel = np.concatenate([np.transpose(rec[f"flow{i}__mel"], (0, 2, 1))[:, 2 * int(rec[f"chunk{i}__token_offset"]):]
                                   for i in range(int(rec["n_chunks"]))], axis=1)
        np.testing.assert_array_equal(replay.hift_calls[-1][0], last_mel)


def test_scheduler_rejects_bad_calls():
    s = StreamScheduler(0)
    s.final(10)
    with pytest.raises(StreamError, match="already finalized"):
        s.poll(100)
    with pytest.raises(StreamError, match="prompt_len"):
        StreamScheduler(-1)
    with pytest.raises(StreamError, match="n_total"):
        t = StreamScheduler(0)
        assert t.poll(40) is not None
        t.final(10)


class _ConstFlow:
    """Flow stage emitting a constant mel for the frames a chunk owns (counts its calls)."""

    def __init__(self, cfg):
        self.cfg, self.calls = cfg, []

    def chunk(self, tokens, token_offset, n_tokens):
        self.calls.append((token_offset, n_tokens, False))
        n = n_tokens - self.cfg.pre_lookahead_len - token_offset
        return np.full((1, 2 * n, 80), 0.5, np.float32), 2 * (n_tokens - self.cfg.pre_lookahead_len)

    def final(self, tokens, token_offset, n_tokens):
        self.calls.append((token_offset, n_tokens, True))
        return np.full((1, 2 * (n_tokens - token_offset), 80), 0.5, np.float32), 2 * n_tokens


def test_cv3_recompute_vocoder_stage_yields_only_new_samples():
    seen = []

    def voc(mel, finalize):
        seen.append((mel.shape[1], finalize))
        n = mel.shape[1] if finalize else mel.shape[1] - 8
        return np.arange(n * 480, dtype=np.float32)[None]

    t2w = CV3Token2Wav(_ConstFlow(StreamConfig()), RecomputeVocoderCV3(voc))
    outs = list(run_stream([list(range(120))], t2w, 0))
    audio = np.concatenate([o["tts_speech"] for o in outs], axis=1)
    np.testing.assert_array_equal(audio[0], np.arange(240 * 480, dtype=np.float32))  # contiguous, no repeats
    assert seen[-1] == (240, True) and all(not f for _, f in seen[:-1])
    assert [o["work"]["vocoder_frames"] for o in outs] == [t for t, _ in seen]  # re-vocodes everything: growing


def test_cv2_fade_uses_hamming_and_caches():
    cfg = StreamConfig()

    def voc(mel, cache_source):
        n = mel.shape[1] * 480
        speech = np.full((1, n), 1.0, np.float32)
        source = np.full((1, n), 2.0, np.float32)
        source[:, :cache_source.shape[1]] = cache_source
        return speech, source

    t2w = CV2Token2Wav(_ConstFlow(cfg), voc)
    outs = list(run_stream([list(range(120))], t2w, 0))
    chunks = [o["tts_speech"] for o in outs]
    # CV2 vocodes the new frames + the 8-frame mel cache
    assert [o["work"]["vocoder_frames"] for o in outs] == [50, 108, 98]
    # constant signals: the fade sums the two halves of the Hamming window (≈ 1 + 0.08 at the ends)
    w = np.hamming(7680)
    expect = (w[:3840] + w[3840:]).astype(np.float32)
    np.testing.assert_array_equal(chunks[1][0, :3840], expect)
    total = sum(c.shape[1] for c in chunks)
    assert total == 120 * 2 * 480
    assert [c.token_offset for c in plan_schedule(120, 0)] == [0, 25, 75]
    assert isinstance(plan_schedule(120, 0)[-1], Chunk)
