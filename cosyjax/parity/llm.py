"""LLM parity on `<v>/llm/backbone.npz` and `<v>/llm/decode.npz` (upstream Qwen2LM / CosyVoice3LM, fp32).

Rows: backbone hidden / logits (rel-L2 <= 1e-5); decode `lm_input` (prompt embedding), greedy
tokens (exact), greedy per-step log-probs (top-32 values of every step and full rows of the first 8,
rel-L2 <= 1e-4, read from the cached jitted decode), RAS tokens and trace replayed from the
recorded uniforms (exact), and the first-step RAS log-probs.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cosyjax.parity.core import compare, exact

COMPONENT = "llm"
UNUSED = {"decode.npz": {
    "embedding_unused": "speaker embedding upstream's Qwen2LM / CosyVoice3LM inference ignores",
    "greedy_top1_minus_top2": "diagnostic margin (derived from the compared top-32 log-probs)",
}}
TOL_BACKBONE = 1e-5
TOL_LOGP = 1e-4


def check(ctx):
    if not (ctx.has("llm", "backbone.npz") or ctx.has("llm", "decode.npz")):
        return []
    from cosyjax.llm.config import LLMConfig

    cfg = LLMConfig.from_model_config(ctx.model_config)
    params = ctx.params("llm")  # the normal converter path
    v = ctx.version
    rows = []
    if ctx.has("llm", "backbone.npz"):
        rows += _backbone(ctx.npz("llm", "backbone.npz"), params, cfg, v)
    if ctx.has("llm", "decode.npz"):
        rows += _decode(ctx.npz("llm", "decode.npz"), params, cfg, v)
    return rows


def _backbone(z, params, cfg, v):
    from cosyjax.llm.speech_lm import backbone_forward

    h, logits = backbone_forward(params, cfg, jnp.asarray(z["xs"]), jnp.asarray(z["xs_len"]))
    n = int(np.max(z["xs_len"]))  # positions past a row's length are undefined upstream too
    mask = np.arange(z["xs"].shape[1])[None, :] < z["xs_len"][:, None]
    h, logits = np.asarray(h), np.asarray(logits)
    return [
        compare(v, COMPONENT, "backbone.hidden", np.where(mask[..., None], h, 0)[:, :n],
                np.where(mask[..., None], z["hidden"], 0)[:, :n], TOL_BACKBONE),
        compare(v, COMPONENT, "backbone.logits", np.where(mask[..., None], logits, 0)[:, :n],
                np.where(mask[..., None], z["logits"], 0)[:, :n], TOL_BACKBONE),
    ]


def _decode(z, params, cfg, v):
    from cosyjax.llm.generate import _apply, generate_detailed, prepare
    from cosyjax.llm.speech_lm import SpeechLM

    rows = []
    args = dict(text=z["text"], prompt_text=z["prompt_text"], prompt_speech_token=z["prompt_speech_token"])
    lim = dict(min_len=int(z["min_len"]), max_len=int(z["max_len"]))

    # prompt embedding (no lengths override: checks the 2x/20x rule too)
    p = prepare(cfg, **args, sampling="greedy")
    if int(p.min_len[0]) != lim["min_len"] or int(p.max_len[0]) != lim["max_len"]:
        rows.append(exact(v, COMPONENT, "decode.min_max_len", np.array([p.min_len[0], p.max_len[0]]),
                          np.array([lim["min_len"], lim["max_len"]])))
    emb = np.asarray(_apply(cfg, params, SpeechLM.embed_prompt, jnp.asarray(p.ids), jnp.asarray(p.kind)))
    n = z["lm_input"].shape[1]
    rows.append(compare(v, COMPONENT, "decode.lm_input", emb[:, -n:], z["lm_input"], TOL_BACKBONE))

    # greedy
    g = generate_detailed(params, cfg, **args, sampling="greedy", record_topk=32,
                          record_full_steps=z["greedy_logp_first8"].shape[0])
    want = z["greedy_tokens"].astype(np.int64)
    got = np.asarray(g.tokens[0, : int(g.lengths[0])]).astype(np.int64)
    rows.append(exact(v, COMPONENT, "decode.greedy_tokens", _pad_like(got, want), want,
                      note=f"{len(got)} tokens, expected {len(want)}"))
    calls = z["greedy_logp_top32_values"].shape[0]
    tv = np.asarray(g.logp_topk_values[0, :calls])
    rows.append(compare(v, COMPONENT, "decode.greedy_logp_top32_values", tv, z["greedy_logp_top32_values"], TOL_LOGP))
    ti = np.asarray(g.logp_topk_indices[0, :calls]).astype(np.int64)
    # ids may swap among exact ties only; compare where the expected values are distinct
    distinct = np.concatenate([np.diff(z["greedy_logp_top32_values"], axis=1) != 0,
                               np.ones((calls, 1), bool)], axis=1)
    distinct &= np.concatenate([np.ones((calls, 1), bool), distinct[:, :-1]], axis=1)
    rows.append(exact(v, COMPONENT, "decode.greedy_logp_top32_indices", np.where(distinct, ti, -1),
                      np.where(distinct, z["greedy_logp_top32_indices"], -1)))
    first = z["greedy_logp_first8"]
    rows.append(compare(v, COMPONENT, "decode.greedy_logp_first8", np.asarray(g.logp_full[0, : first.shape[0]]),
                        first, TOL_LOGP))

    # RAS with the recorded uniforms (inverse CDF)
    r = generate_detailed(params, cfg, **args, sampling="ras", uniforms=z["ras_uniforms"], record_topk=1,
                          record_full_steps=1)
    want = z["ras_tokens"].astype(np.int64)
    got = np.asarray(r.tokens[0, : int(r.lengths[0])]).astype(np.int64)
    rows.append(exact(v, COMPONENT, "decode.ras_tokens", _pad_like(got, want), want,
                      note=f"{len(got)} tokens, expected {len(want)}"))
    tr = z["ras_trace"]
    got_tr = np.asarray(r.trace[0, : tr.shape[0]]).astype(np.int64)
    rows.append(exact(v, COMPONENT, "decode.ras_trace", got_tr, tr))
    rows.append(compare(v, COMPONENT, "decode.ras_logp_first_step", np.asarray(r.logp_full[0, 0]),
                        z["ras_logp_first_step"], TOL_LOGP))
    return rows


def _pad_like(got, want):
    out = np.full(want.shape, -1, np.int64)
    m = min(len(got), len(want))
    out[:m] = got[:m]
    if len(got) > len(want):  # extra tokens: make the mismatch visible
        out[-1] = -2
    return out
