"""End-to-end parity: upstream `CosyVoice{2,3}Model.tts(stream=False|True)` vs `cosyjax.pipeline.Engine.tts`.

Fixtures (`<v>/e2e/`, see tests/golden/README.md "End-to-end fixtures"): `inputs.npz` (model_input),
`nonstream.npz`, `stream.npz`, CosyVoice3 `nonstream_forced_silence.npz` and `cv3_hift_fixed_noise.npz`.
The golden runs used greedy LLM sampling and recorded the HiFT noise; the checker replays both:
CosyVoice2 `hift<i>__noise_q / 16` per vocoder call, CosyVoice3 `sine_waves_q / 256` as the fixed buffer.

Rows per run: LLM tokens (exact), flow tokens after the silent filter (exact), per-step top-32
log-probs, the streaming schedule (exact), every flow call's mel, every yielded chunk and the whole
waveform (rel-L2 <= 1e-3). The forced-silence run forces token 1 at the recorded steps in a
greedy decode that overrides the sampled id (what the reference did; `generate_detailed(forced_tokens=)`).
`replay_rows` (flow / vocoder / chunk rows of one recorded tts call) is shared with `e2e_modes`.
"""
from __future__ import annotations

import functools
import importlib

import numpy as np

from cosyjax.parity.core import FixtureContext, Result, compare, exact, failure

AUDIO_TOL = 1e-3
MEL_TOL = 1e-4
LOGP_TOL = 1e-4
RUNS = ("nonstream", "stream", "nonstream_forced_silence")
# recorded intermediates no row compares: what they feed is compared (the chunk audio, the schedule)
UNUSED = {"*": {
    "hift*__speech_feat": "vocoder input (cache mel ++ new mel): the flow mel and chunk audio rows cover it",
    "hift*__speech_head_prefade": "vocoder output before the cross-fade: the chunk audio rows cover it",
    "hift*__speech_len": "vocoder output length: the chunk audio shape is compared",
    "hift*__cache_source": "vocoder source cache: the chunk audio rows cover it",
    "hift*__mel_len": "vocoder input length: the chunk audio shape is compared",
    "hift*__finalize": "vocoder flag: the schedule row compares the chunk flags",
    "chunk*__token_offset": "compared in the schedule row",
    "chunk*__n_tokens": "compared in the schedule row",
    "chunk*__finalize": "compared in the schedule row",
    "chunk*__stream_flag": "compared in the schedule row",
    "chunk*__cache_*": "token2wav caches after a chunk: the next chunk's audio row covers them",
    "chunk*__speech_offset_after": "CV3 yield offset: the chunk audio shape is compared",
    "llm_top1_minus_top2": "diagnostic margin (derived from the compared top-32 log-probs)",
    "llm_logp_top32_indices": "ids among exact ties are arbitrary; the values are compared",
    "flow*__n_tokens": "compared with each flow call's mel row (call arguments)",
    "flow*__streaming": "compared with each flow call's mel row (call arguments)",
    "flow*__finalize": "compared with each flow call's mel row (call arguments)",
}}


def _mel_nwc(a):
    return np.transpose(np.asarray(a), (0, 2, 1))


@functools.lru_cache(maxsize=2)
def engine_for(model_dir: str):
    """`cosyjax.pipeline.Engine` on the model folder with greedy LLM sampling (as the golden runs)."""
    from cosyjax.config import ModelConfig
    from cosyjax.model_cache import load_or_convert_params
    from cosyjax.pipeline import Engine, PipelineConfig

    mc = ModelConfig.from_dir(model_dir)
    params, _ = load_or_convert_params(mc, use_cache=False)
    return Engine(params, PipelineConfig.from_model_config(mc, sampling="greedy"))


def noise_provider(ctx: FixtureContext, rec: dict, fixed_noise: dict | None):
    """The recorded HiFT randomness per vocoder call (CV2: `rec`; CV3: the fixed-noise npz)."""
    if ctx.version == "cosyvoice2":
        def provide(i, n_frames):
            key = f"hift{i}__noise_q"
            if key not in rec:
                raise KeyError(f"no recorded noise for vocoder call {i}")
            return {"noise": rec[key].astype(np.float32) / 16.0, "rand_ini": rec.get(f"hift{i}__noise_rand_ini")}
        return provide
    noise = fixed_noise["sine_waves_q"].astype(np.float32) / 256.0
    rand_ini = fixed_noise["rand_ini"]
    return lambda i, n_frames: {"noise": noise, "rand_ini": rand_ini}


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


def lm_input_row(v: str, component: str, label: str, engine, mi: dict, rec: dict) -> Result:
    """The LLM prompt embedding upstream built (`lm_input` [1, L, H]) vs ours for the same model_input."""
    import jax.numpy as jnp

    from cosyjax.llm.generate import _apply, prepare
    from cosyjax.llm.speech_lm import SpeechLM

    cfg = engine.config.llm
    p = prepare(cfg, **engine.llm_inputs(mi), sampling="greedy")
    emb = np.asarray(_apply(cfg, engine.params["llm"], SpeechLM.embed_prompt, jnp.asarray(p.ids), jnp.asarray(p.kind)))
    want = rec["lm_input"]
    return compare(v, component, f"{label} lm_input", emb[:, -want.shape[1]:], want, LOGP_TOL,
                   note=f"prompt layout, {want.shape[1]} positions")


def flow_calls(engine, records: list, n_tokens: int, stream: bool) -> list[tuple[int, bool, bool]]:
    """(n_tokens, streaming, finalize) of every flow call the engine's schedule made."""
    if stream:
        return [(r.chunk.n_tokens, bool(r.chunk.streaming), bool(r.chunk.finalize)) for r in records]
    return [(n_tokens, False, True)]


def flow_mel(engine, mi: dict, tokens: np.ndarray, streaming: bool, finalize: bool) -> np.ndarray:
    """The flow's full output mel [1, T, 80] (before the token_offset slice) for `tokens` of one call."""
    cfg = engine.config
    mod = importlib.import_module("cosyjax.flow.cv2.model" if cfg.version == "cosyvoice2" else "cosyjax.flow.cv3.model")
    ptok = np.asarray(mi.get("flow_prompt_speech_token", np.zeros((1, 0), np.int32)), np.int32).reshape(1, -1)
    feat = np.asarray(mi.get("prompt_speech_feat", np.zeros((1, 0, 80), np.float32)), np.float32).reshape(1, -1, 80)
    emb = np.asarray(mi["flow_embedding"], np.float32).reshape(1, -1)
    tok = np.asarray(tokens, np.int32).reshape(1, -1)
    mel, _ = mod.flow_inference(engine.params["flow"], cfg.flow, tok, np.array([tok.shape[1]]), ptok,
                                np.array([ptok.shape[1]]), feat, np.array([feat.shape[1]]), emb,
                                streaming=streaming, finalize=finalize)
    return np.asarray(mel)


def replay_rows(v: str, component: str, label: str, engine, mi: dict, flow_tokens: np.ndarray, chunks: list,
                records: list, rec: dict, stream: bool) -> list[Result]:
    """Rows of one recorded tts call after `engine.tts` ran on `flow_tokens` (after the silent filter):
    flow tokens (exact), schedule (stream), every flow call's mel, chunk count, every chunk's audio, tts_speech.

    The mel rows run the flow (`flow_inference`) on the engine's tokens with the arguments of each call the
    engine's schedule made (its non-streaming core does not hand out its mel); the audio rows are the engine's."""
    rows = [exact(v, component, f"{label} flow_tokens", np.asarray(flow_tokens, np.int64), rec["tts_speech_tokens"],
                  note=f"{len(flow_tokens)} tokens after the silent filter")]
    if stream:
        rows.append(exact(v, component, f"{label} schedule", np.asarray([r.row() for r in records]), rec["schedule"],
                          note="(offset, n_tokens, finalize, stream, samples) per chunk"))
    calls = flow_calls(engine, records, len(flow_tokens), stream)
    n_ref_calls = sum(1 for k in rec if k.startswith("flow") and k.endswith("__mel"))
    for i, (n_tok, streaming, finalize) in enumerate(calls):
        if f"flow{i}__mel" not in rec:
            rows.append(failure(v, component, f"{label} flow{i} mel", "more flow calls than the reference"))
            continue
        flags_ok = (n_tok == int(rec[f"flow{i}__n_tokens"]) and streaming == bool(rec[f"flow{i}__streaming"])
                    and finalize == bool(rec[f"flow{i}__finalize"]))
        mel = flow_mel(engine, mi, np.asarray(flow_tokens)[:n_tok], streaming, finalize)
        r = compare(v, component, f"{label} flow{i} mel", mel, _mel_nwc(rec[f"flow{i}__mel"]), MEL_TOL,
                    note=f"{n_tok} tokens, streaming={streaming}, finalize={finalize}")
        if not flags_ok:
            r.passed, r.note = False, r.note + " (call arguments differ from the reference)"
        rows.append(r)
    if len(calls) < n_ref_calls:
        rows.append(failure(v, component, f"{label} flow calls", f"{len(calls)} flow calls, reference {n_ref_calls}"))
    n_chunks = int(rec["n_chunks"])
    if len(chunks) != n_chunks:
        rows.append(Result(v, component, f"{label} chunks", float(len(chunks)), float(n_chunks), 0.0, False,
                           f"{len(chunks)} chunks yielded, reference {n_chunks}"))
    for i, audio in enumerate(chunks[:n_chunks]):
        if f"chunk{i}__audio" in rec:  # non-streaming references record tts_speech only
            rows.append(compare(v, component, f"{label} chunk{i} audio", audio, rec[f"chunk{i}__audio"], AUDIO_TOL))
        elif stream:
            rows.append(failure(v, component, f"{label} chunk{i} audio", "the reference records no chunk audio"))
    audio = np.concatenate(chunks, axis=1) if chunks else np.zeros((1, 0), np.float32)
    rows.append(compare(v, component, f"{label} tts_speech", audio, rec["tts_speech"], AUDIO_TOL,
                        note=f"{audio.shape[1] / 24000:.2f} s"))
    return rows


def check_run(ctx: FixtureContext, run: str) -> list[Result]:
    """Rows of one golden run ('nonstream', 'stream' or 'nonstream_forced_silence')."""
    import jax

    v = ctx.version
    rec = ctx.npz("e2e", f"{run}.npz")
    z = ctx.npz("e2e", "inputs.npz")
    mi = {k: z[k] for k in z}  # item access: the runner sees every input as read
    meta = ctx.json("e2e", "meta.json") if ctx.has("e2e", "meta.json") else {}
    forced = (meta.get(f"{run}.npz") or {}).get("forced") or (meta.get("spec", {}).get("forced") if "forced" in run
                                                              else None)
    fixed = ctx.npz("e2e", "cv3_hift_fixed_noise.npz") if ctx.version == "cosyvoice3" else None
    engine = engine_for(ctx.model_dir)
    rows, llm_tokens = _llm_rows(ctx, engine, mi, rec, run, forced)
    rows.append(lm_input_row(v, "e2e", run, engine, mi, rec))
    stream = run == "stream"
    records = []
    # tokens delivered one at a time, as a streaming LLM would (the schedule must not depend on it)
    chunks = list(engine.tts(mi, stream=stream, key=jax.random.PRNGKey(0), records=records,
                             tokens=iter(llm_tokens.tolist()), noise_provider=noise_provider(ctx, rec, fixed)))
    return rows + replay_rows(v, "e2e", run, engine, mi, flow_tokens_of(engine, llm_tokens), chunks, records, rec,
                              stream)


def flow_tokens_of(engine, llm_tokens) -> np.ndarray:
    """What the flow gets from the LLM tokens: upstream llm_job's silent-token filter (CosyVoice3)."""
    from cosyjax.streaming import filter_silent_tokens

    silent = engine.config.silent_tokens
    toks = [int(t) for t in np.asarray(llm_tokens).reshape(-1)]
    return np.asarray(filter_silent_tokens(toks, silent) if silent else toks, np.int64)


def check(ctx: FixtureContext) -> list[Result]:
    if not ctx.has("e2e", "inputs.npz") or not ctx.has("modeldir"):
        return []
    rows: list[Result] = []
    for run in RUNS:
        if ctx.has("e2e", f"{run}.npz"):
            rows.extend(check_run(ctx, run))
    return rows
