"""End-to-end parity: upstream `CosyVoice{2,3}Model.tts(stream=False|True)` vs `cosyjax.pipeline.Engine.tts`.

Fixtures (`<v>/e2e/`, see tests/golden/README.md "End-to-end fixtures"): `inputs.npz` (model_input),
`nonstream.npz`, `stream.npz`, CosyVoice3 `nonstream_forced_silence.npz` and `cv3_hift_fixed_noise.npz`.
The golden runs used greedy LLM sampling and recorded the HiFT noise; the checker replays both:
CosyVoice2 `hift<i>__noise_q / 16` per vocoder call, CosyVoice3 `sine_waves_q / 256` as the fixed buffer.

Rows per run: LLM tokens (exact), flow tokens after the silent filter (exact), per-step top-32
log-probs, the streaming schedule (exact), every flow call's mel, every yielded chunk and the whole
waveform (rel-L2 <= 1e-3). The forced-silence run forces token 1 at the recorded steps in a
greedy decode that overrides the sampled id (what the reference did; `generate_detailed(forced_tokens=)`).
"""
from __future__ import annotations

import functools
import os

import numpy as np

from cosyjax.parity.core import FixtureContext, Result, compare, exact

AUDIO_TOL = 1e-3
MEL_TOL = 1e-4
LOGP_TOL = 1e-4
RUNS = ("nonstream", "stream", "nonstream_forced_silence")


def _mel_nwc(a):
    return np.transpose(np.asarray(a), (0, 2, 1))


@functools.lru_cache(maxsize=2)
def _engine(model_dir: str):
    from cosyjax.config import ModelConfig
    from cosyjax.model_cache import load_or_convert_params
    from cosyjax.pipeline import Engine, PipelineConfig

    mc = ModelConfig.from_dir(model_dir)
    params, _ = load_or_convert_params(mc, use_cache=False)
    return _ObservedEngine(params, PipelineConfig.from_model_config(mc, sampling="greedy"))


def _observed_engine_class():
    from cosyjax.pipeline import Engine

    class ObservedEngine(Engine):
        """Engine that records every flow call (tokens fed, flags, mel)."""

        flow_calls: list

        def flow_fn(self, mi):
            inner = super().flow_fn(mi)

            def flow(tokens, streaming, finalize):
                mel = inner(tokens, streaming, finalize)
                self.flow_calls.append((np.asarray(tokens).shape[1], bool(streaming), bool(finalize), mel))
                return mel

            return flow

    return ObservedEngine


class _ObservedEngine:  # built lazily so importing this module does not import jax
    def __new__(cls, *args, **kwargs):
        obj = _observed_engine_class()(*args, **kwargs)
        obj.flow_calls = []
        return obj


def _noise_provider(ctx: FixtureContext, rec: dict):
    if ctx.version == "cosyvoice2":
        def provide(i, n_frames):
            key = f"hift{i}__noise_q"
            if key not in rec:
                raise KeyError(f"no recorded noise for vocoder call {i}")
            return {"noise": rec[key].astype(np.float32) / 16.0}
        return provide
    fixed = ctx.npz("e2e", "cv3_hift_fixed_noise.npz")
    noise = fixed["sine_waves_q"].astype(np.float32) / 256.0
    return lambda i, n_frames: {"noise": noise}


def _llm_rows(ctx, engine, mi, rec, run, forced):
    """Returns (rows, tokens) for the run's LLM part."""
    import jax

    v = ctx.version
    rows = []
    if forced:
        steps = forced["steps"]
        g = engine.llm_generation(mi, jax.random.PRNGKey(0), sampling="greedy", record_topk=32,
                                  forced_tokens={int(s): int(forced["token"]) for s in steps})
        n = int(g.lengths[0])
        toks = np.asarray(g.tokens)[0, :n].astype(np.int64)
        n_calls = int(np.sum(np.asarray(g.trace)[0, :, 0] >= 0))  # every sampling call, the final stop included
        topv = np.asarray(g.logp_topk_values)[0, :n_calls]
        note = f"greedy, token {forced['token']} forced at steps {steps[0]}..{steps[-1]}"
    else:
        g = engine.llm_generation(mi, jax.random.PRNGKey(0), sampling="greedy", record_topk=32)
        n = int(g.lengths[0])
        toks = np.asarray(g.tokens)[0, :n].astype(np.int64)
        topv = np.asarray(g.logp_topk_values)[0, :n + (1 if n < rec["llm_logp_top32_values"].shape[0] else 0)]
        note = "greedy"
    rows.append(exact(v, "e2e", f"{run} llm_tokens", toks, rec["llm_tokens"], note=note))
    want = rec["llm_logp_top32_values"]
    m = min(len(want), len(topv))
    rows.append(compare(v, "e2e", f"{run} llm_logp_top32", topv[:m], want[:m], LOGP_TOL,
                        note="" if m == len(want) else f"{m}/{len(want)} steps"))
    return rows, toks


def check_run(ctx: FixtureContext, run: str) -> list[Result]:
    """Rows of one golden run ('nonstream', 'stream' or 'nonstream_forced_silence')."""
    import jax

    from cosyjax.streaming import filter_silent_tokens

    v = ctx.version
    rec = ctx.npz("e2e", f"{run}.npz")
    mi = ctx.npz("e2e", "inputs.npz")
    meta = ctx.json("e2e", "meta.json") if ctx.has("e2e", "meta.json") else {}
    forced = (meta.get(f"{run}.npz") or {}).get("forced") or (meta.get("spec", {}).get("forced") if "forced" in run
                                                              else None)
    engine = _engine(ctx.model_dir)
    engine.flow_calls = []
    rows, llm_tokens = _llm_rows(ctx, engine, mi, rec, run, forced)
    silent = engine.config.silent_tokens
    flow_tokens = filter_silent_tokens(llm_tokens.tolist(), silent) if silent else llm_tokens.tolist()
    rows.append(exact(v, "e2e", f"{run} flow_tokens (silent filter)", np.asarray(flow_tokens, np.int64),
                      rec["tts_speech_tokens"], note=f"{len(llm_tokens)} -> {len(flow_tokens)} tokens"))
    stream = run == "stream"
    records = []
    # tokens delivered one at a time, as a streaming LLM would (the schedule must not depend on it)
    chunks = list(engine.tts(mi, stream=stream, key=jax.random.PRNGKey(0), records=records,
                             tokens=iter(llm_tokens.tolist()), noise_provider=_noise_provider(ctx, rec)))
    if stream:
        rows.append(exact(v, "e2e", f"{run} schedule", np.asarray([r.row() for r in records]), rec["schedule"],
                          note="(offset, n_tokens, finalize, stream, samples) per chunk"))
    n_chunks = int(rec["n_chunks"])
    for i, (n_tok, streaming, finalize, mel) in enumerate(engine.flow_calls):
        if f"flow{i}__mel" not in rec:
            rows.append(Result(v, "e2e", f"{run} flow{i} mel", float("inf"), float("inf"), MEL_TOL, False,
                               "more flow calls than the reference"))
            continue
        flags_ok = (n_tok == int(rec[f"flow{i}__n_tokens"]) and streaming == bool(rec[f"flow{i}__streaming"])
                    and finalize == bool(rec[f"flow{i}__finalize"]))
        r = compare(v, "e2e", f"{run} flow{i} mel", mel, _mel_nwc(rec[f"flow{i}__mel"]), MEL_TOL,
                    note=f"{n_tok} tokens, streaming={streaming}, finalize={finalize}")
        if not flags_ok:
            r.passed, r.note = False, r.note + " (call arguments differ from the reference)"
        rows.append(r)
    if len(chunks) != n_chunks:
        rows.append(Result(v, "e2e", f"{run} chunks", float(len(chunks)), float(n_chunks), 0.0, False,
                           f"{len(chunks)} chunks yielded, reference {n_chunks}"))
    if stream:
        for i, audio in enumerate(chunks[:n_chunks]):
            rows.append(compare(v, "e2e", f"{run} chunk{i} audio", audio, rec[f"chunk{i}__audio"], AUDIO_TOL))
    audio = np.concatenate(chunks, axis=1) if chunks else np.zeros((1, 0), np.float32)
    rows.append(compare(v, "e2e", f"{run} tts_speech", audio, rec["tts_speech"], AUDIO_TOL,
                        note=f"{audio.shape[1] / 24000:.2f} s"))
    return rows


def check(ctx: FixtureContext) -> list[Result]:
    if not ctx.has("e2e", "inputs.npz") or not os.path.isdir(ctx.model_dir):
        return []
    rows: list[Result] = []
    for run in RUNS:
        if ctx.has("e2e", f"{run}.npz"):
            rows.extend(check_run(ctx, run))
    return rows
