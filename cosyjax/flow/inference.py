"""The version-independent parts of flow inference, shared by the CV2 and CV3 flows.

* `solve_and_strip_prompt` (inside each version's jitted `flow_core`, after its own encoding):
  CFM solve from mu [B, T, C], then the prompt frames are cut off -> the `flow_core` result dict.
* `make_flow_inference(flow_core, doc)`: the host wrapper `flow_inference(params, cfg, token, ...)`
  = `pack_inputs` (validate + bucket) -> `flow_core` -> optional trim to max(mel_len) frames.
* `final_pass`: the last chunk of a stream (upstream `streaming=False, finalize=True`) of one request,
  the same `flow_core` call made as a `StageCall`, so that concurrent streams' last chunks can batch.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from cosyjax.flow.cfm import solve_cfm
from cosyjax.flow.inputs import DEFAULT_BUCKETS, new_frames, pack_inputs
from cosyjax.flow.masks import padding_mask
from cosyjax.stage_batch import StageCall, run_alone

__all__ = ["solve_and_strip_prompt", "make_flow_inference", "final_pass"]

# `pack_inputs` keys in the order of `flow_core`'s positional inputs after params (both versions)
CORE_INPUTS = ("tokens", "n_tokens", "n_prompt", "lookahead", "cond", "embedding", "noise")


def solve_and_strip_prompt(estimator_fn, mu, spks, cond, noise, n_frames, prompt_frames, *, n_mels: int,
                           n_timesteps: int, cfg_rate: float, t_scheduler: str, return_trajectory: bool) -> dict:
    """mu [B, T, C] f32, spks [B, S], cond [B, T, n_mels], noise [B|1, T, n_mels], n_frames [B] (valid frames incl.
    prompt), prompt_frames [B] -> dict: mel [B, T, n_mels] (new frames first, zero after mel_len), mel_len [B],
    mu, cond, spks, mask [B, T], feat (the whole solved mel incl. prompt frames), `trajectory` when requested."""
    B, T = mu.shape[:2]
    mask = padding_mask(n_frames, T)
    noise = jnp.broadcast_to(noise.astype(jnp.float32), (B, T, n_mels))
    out = solve_cfm(estimator_fn, mu, mask, spks, cond, noise, n_steps=n_timesteps, cfg_rate=cfg_rate,
                    return_trajectory=return_trajectory, t_scheduler=t_scheduler)
    feat, traj = out if return_trajectory else (out, None)
    mel_len = n_frames - prompt_frames
    idx = jnp.clip(prompt_frames[:, None] + jnp.arange(T)[None, :], 0, T - 1)
    mel = jnp.take_along_axis(feat, idx[:, :, None], axis=1)
    mel = jnp.where(padding_mask(mel_len, T)[:, :, None], mel, 0.0)
    res = {"mel": mel, "mel_len": mel_len, "mu": mu, "cond": cond, "spks": spks, "mask": mask, "feat": feat}
    if return_trajectory:
        res["trajectory"] = traj
    return res


def make_flow_inference(flow_core, doc: str):
    """The host-side `flow_inference` of one flow version, running its jitted `flow_core`."""

    def flow_inference(params, cfg, token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len,
                       embedding, *, streaming: bool, finalize: bool, noise=None, n_timesteps: int = 10,
                       dtype: str = "float32", attention_impl: str = "auto", buckets: Sequence[int] = DEFAULT_BUCKETS,
                       trim: bool = True):
        packed = pack_inputs(cfg, token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len,
                             embedding, finalize=finalize, noise=noise, buckets=buckets)
        out = flow_core(params, *(packed[k] for k in CORE_INPUTS), cfg=cfg, streaming=bool(streaming),
                        n_timesteps=int(n_timesteps), dtype=str(jnp.dtype(dtype)), attention_impl=attention_impl)
        mel, mel_len = out["mel"], out["mel_len"]
        if trim:
            mel = mel[:, :new_frames(packed, cfg.token_mel_ratio)]
        return mel, mel_len

    flow_inference.__doc__ = doc
    flow_inference.__module__ = getattr(flow_core, "__module__", __name__)
    return flow_inference


def final_pass(flow_core, params, cfg, tokens, prompt_token, prompt_feat, embedding, *, n_timesteps: int,
               dtype: str, attention_impl: str, buckets: Sequence[int] = DEFAULT_BUCKETS,
               run: Callable = run_alone) -> np.ndarray:
    """One request's full-attention final pass -> mel [1, frames, 80] numpy (prompt frames removed).

    tokens [N], prompt_token [P] int; prompt_feat [2P, 80]; embedding [192]. Equals `flow_inference(...,
    streaming=False, finalize=True)` (the same jitted call, bit for bit, when `run` runs it alone)."""
    r = cfg.token_mel_ratio
    P = int(prompt_token.shape[0])
    packed = pack_inputs(cfg, tokens[None], np.array([tokens.shape[0]]), prompt_token[None], np.array([P]),
                         prompt_feat[None], np.array([r * P]), embedding[None], finalize=True, buckets=buckets)
    out = run(StageCall(
        flow_core, (params,),
        tuple(packed[k] for k in CORE_INPUTS),
        static=(("attention_impl", attention_impl), ("cfg", cfg), ("dtype", str(jnp.dtype(dtype))),
                ("n_timesteps", int(n_timesteps)), ("streaming", False))))
    return np.asarray(out["mel"])[:, :new_frames(packed, r)]
