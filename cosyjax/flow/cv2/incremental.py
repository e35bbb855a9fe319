"""Exact incremental streaming for the CosyVoice2 flow: each chunk encodes and solves only its new frames.

Upstream streaming (`CosyVoice2Model.tts(stream=True)`) re-runs the flow over all tokens so far at every
chunk (`streaming=True, finalize=False`) and keeps the mel from the chunk's offset. With the chunk
masks that result is a prefix-stable function of the tokens, so it can be computed incrementally:

* Encoder: the look-ahead layer sees tokens t..t+3 (present when the frame is emitted); its second
  conv is causal (k=3), so a window starting 2 tokens before the new ones, dropping its first 2 rows,
  gives the full pass's rows. The conformer layers use 25-token block-causal masks: keys/values of
  earlier tokens never change, so they are kept per layer (`RelPositionMultiHeadedAttention` with a
  cache: a new query i against cached key j uses the same relative-position row i - j as the full pass).
  The x2 upsample conv is causal (2 tokens of left context kept), the up-conformer layers have 50-frame
  masks (K/V kept), the rest is pointwise. So mu of earlier frames is fixed.
* U-Net estimator (per ODE step and CFG row): causal k=3 convs (the 2 input frames before the new ones
  kept per conv), pointwise layers, transformer blocks with 50-frame block-causal masks (K/V kept per
  block). Earlier frames' ODE states never change, so only new frames are integrated.

What becomes final ("committed") after a call: the frames up to the last 25-token chunk boundary at
or before the encoded end E (every mask's block edge is on that grid). Frames of a partial block
(a call whose end is not on the grid) attend keys that later tokens add to the same block, so they are
recomputed by the next call (their K/V and conv contexts are overwritten); the scheduler's chunks
always end on the grid, so then nothing is recomputed. The final chunk (`finalize=True`,
`streaming=False`: full attention over everything) cannot reuse any of this and is a full recompute
with `cosyjax.flow.inference.final_pass` (`flow_inference`'s own core call), exactly as upstream.

Bit-exact with the recompute path, for the reasons `cosyjax.flow.cv3.incremental` gives; here the
Conformer's relative-position term is also computed per attention tile (`cosyjax.nn.attention.RelPos`).

Device state: static buffers of a bucketed capacity S tokens (2S frames), grown by reallocation to
the next bucket; a call's new tokens are padded to a bucket of `TOKEN_GRID` multiples (masked), so
one program is compiled per (capacity, new-token) bucket pair; the 10 ODE steps run in one
`lax.scan` over per-step caches; the state is donated.
Memory (per frame of capacity): 2 x 2 (K, V) x n_steps x (transformer blocks) x inner_dim values in
the U-Net cache -- about 2.3 MB/frame for the released model in float32 (7 GB for 60 s).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.errors import CosyJaxError
from cosyjax.flow.cfm import euler_schedule
from cosyjax.flow.cv2.config import FlowCV2Config
from cosyjax.flow.cv2.encoder import EncoderWindow
from cosyjax.flow.cv2.model import FlowCV2, flow_core
from cosyjax.flow.cv2.unet import UNetWindow
from cosyjax.flow.inference import final_pass
from cosyjax.flow.inputs import DEFAULT_BUCKETS, bucket_for, seed0_noise_np
from cosyjax.stage_batch import StageCall, run_alone

__all__ = ["IncrementalFlowError", "IncrementalFlowCV2", "commit_grid", "capacity_bucket", "new_token_bucket",
           "init_cache", "incremental_step"]


class IncrementalFlowError(CosyJaxError):
    """A bad call to the incremental flow (order, lengths, changed tokens, shapes)."""


def commit_grid(cfg: FlowCV2Config) -> int:
    """Tokens per grid step on which every streaming mask has a block edge (25 for CosyVoice2)."""
    e, u, s = cfg.encoder.static_chunk_size, cfg.unet.static_chunk_size, cfg.encoder.upsample_stride
    if e <= 0 or u <= 0:
        raise IncrementalFlowError(f"incremental streaming needs chunk masks (encoder static_chunk_size {e}, "
                                   f"estimator static_chunk_size {u}); full attention cannot be cached")
    frames = math.lcm(s * e, u, s)
    return frames // s


def new_token_bucket(n: int, grid: int) -> int:
    """Smallest grid * 2^k >= n: the padded new-token count of a call (the scheduler's chunks fit exactly)."""
    b = grid
    while b < n:
        b *= 2
    return b


def capacity_bucket(n: int, base: int = 128) -> int:
    """Smallest base * 2^k >= n tokens: buffer capacity (doubling keeps reallocations and compilations few)."""
    b = base
    while b < n:
        b *= 2
    return b


def _kv(n_layers_shape, rows, S, H, D, dtype):
    shape = tuple(n_layers_shape) + (rows, S, H, D)
    return (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))  # two buffers: both are donated


def init_cache(cfg: FlowCV2Config, capacity: int, n_timesteps: int, dtype) -> dict:
    """Empty state for `capacity` tokens: {"enc": encoder cache (batch 1, S = capacity), "unet": U-Net
    cache with a leading [n_timesteps] axis and 2 CFG rows (S = 2 * capacity frames)}."""
    dtype = jnp.dtype(dtype)
    e, u = cfg.encoder, cfg.unet
    s = e.upsample_stride
    H, dk = e.attention_heads, e.head_dim
    enc = {"encoders": _kv((e.num_blocks,), 1, capacity, H, dk, dtype),
           "up_left": jnp.zeros((1, 2, e.output_size), dtype),
           "up_encoders": _kv((e.num_up_blocks,), 1, s * capacity, H, dk, dtype)}
    C, n, Sf = u.channels[0], n_timesteps, s * capacity
    ctx = lambda *lead_and_c: jnp.zeros((n,) + lead_and_c[:-1] + (2, 2, lead_and_c[-1]), dtype)  # noqa: E731
    kv = lambda *lead: _kv((n,) + lead, 2, Sf, u.num_heads, u.attention_head_dim, dtype)  # noqa: E731
    unet = {"down_resnet": (ctx(u.in_channels), ctx(C)), "down_transformers": kv(u.n_blocks), "down_conv": ctx(C),
            "up_resnet": (ctx(2 * C), ctx(C)), "up_transformers": kv(u.n_blocks), "up_conv": ctx(C),
            "final_block": ctx(C)}
    if u.num_mid_blocks:
        unet["mid_blocks"] = {"resnet": (ctx(u.num_mid_blocks, C), ctx(u.num_mid_blocks, C)),
                              "transformers": kv(u.num_mid_blocks, u.n_blocks)}
    return {"enc": enc, "unet": unet}


def _is_kv(path) -> bool:
    return any(getattr(k, "key", None) in ("encoders", "up_encoders", "down_transformers", "up_transformers",
                                           "transformers") for k in path)


def grow_cache(state: dict, capacity: int, new_capacity: int) -> dict:
    """Reallocate every K/V buffer from `capacity` to `new_capacity` tokens (frames: x stride), zero-padded."""

    def grow(path, a):
        if not _is_kv(path):
            return a
        S = a.shape[-3]
        pad = [(0, 0)] * a.ndim
        pad[-3] = (0, S // capacity * (new_capacity - capacity))
        return jnp.pad(a, pad)

    return jax.tree_util.tree_map_with_path(grow, state)


@functools.partial(jax.jit, static_argnames=("cfg", "n_timesteps", "dtype", "attention_impl"), donate_argnums=(1,))
def incremental_step(params, state, window_tokens, n_window, lead, offset, end, commit, spks, noise, cond, *,
                     cfg: FlowCV2Config, n_timesteps: int, dtype: str, attention_impl: str):
    """One incremental chunk, jitted per (capacity, new-token bucket).

    window_tokens [1, Tq+2+L] int32 (tokens from absolute offset - lead), n_window (its valid tokens),
    lead (0 | 2), offset (committed tokens so far = first new token), end (encoded tokens E of this call),
    commit (tokens committed by this call, relative to offset), all int32 scalars; spks [1, 80] f32;
    noise, cond [1, 2S, 80] f32 (seed-0 noise / prompt mel, frame-aligned with the buffers).
    -> (mel [1, 2Tq, 80] f32 of frames 2*offset .., zero after 2*end, updated state).
    """
    module = FlowCV2(cfg, jnp.dtype(dtype), attention_impl)
    variables = {"params": params}
    e, u = cfg.encoder, cfg.unet
    s = e.upsample_stride
    L = e.pre_lookahead_len
    Tq = window_tokens.shape[1] - 2 - L
    F = s * Tq
    enc_window = EncoderWindow(lead, offset, commit, end)
    mu, enc_cache = module.apply(variables, window_tokens, n_window[None], state["enc"], enc_window,
                                 method=FlowCV2.encode_incremental)

    f0 = s * offset
    mask = (jnp.arange(F) < s * (end - offset))[None]  # [1, F] valid new frames
    x0 = jax.lax.dynamic_slice_in_dim(noise, f0, F, axis=1)
    cond_new = jax.lax.dynamic_slice_in_dim(cond, f0, F, axis=1)
    # classifier-free guidance rows [conditional; unconditional] as `cosyjax.flow.cfm.solve_cfm`
    mu_in = jnp.concatenate([mu, jnp.zeros_like(mu)], axis=0)
    spks_in = jnp.concatenate([spks, jnp.zeros_like(spks)], axis=0)
    cond_in = jnp.concatenate([cond_new, jnp.zeros_like(cond_new)], axis=0)
    mask_in = jnp.concatenate([mask, mask], axis=0)
    unet_window = UNetWindow(f0, s * commit, s * end)
    t_in, dts = euler_schedule(n_timesteps, cfg.t_scheduler)
    c_cond, c_unc = np.float32(1.0 + cfg.inference_cfg_rate), np.float32(cfg.inference_cfg_rate)

    def ode_step(x, xs):
        t, dt, cache = xs
        v, cache = module.apply(variables, jnp.concatenate([x, x], axis=0), mask_in, mu_in, jnp.full((2,), t),
                                spks_in, cond_in, True, cache, unet_window, method=FlowCV2.estimate)
        v = v.astype(jnp.float32)
        return x + dt * (c_cond * v[:1] - c_unc * v[1:]), cache

    x1, unet_cache = jax.lax.scan(ode_step, x0.astype(jnp.float32),
                                  (jnp.asarray(t_in), jnp.asarray(dts), state["unet"]))
    mel = jnp.where(mask[..., None], x1, 0.0)
    return mel, {"enc": enc_cache, "unet": unet_cache}


@functools.partial(jax.jit, static_argnames=("cfg",))
def _speaker(params, embedding, *, cfg: FlowCV2Config):
    return FlowCV2(cfg).apply({"params": params}, embedding, method=FlowCV2.speaker)


class IncrementalFlowCV2:
    """Host-side incremental CV2 flow for one streaming request (driven by the streaming scheduler).

    prompt_token int [P]; prompt_feat float32 [2P, 80] (time-major); embedding float32 [192].
    `chunk(tokens, token_offset, n_tokens)` (non-final, streaming=True, finalize=False) ->
    (mel [1, 2*(n_tokens-3-token_offset), 80] float32, flow_frames); `final(...)` -> the same for the final
    chunk (streaming=False, finalize=True: a full recompute). `flow_frames` = query rows (mel frames,
    bucket padding included) the estimator computed per ODE step in that call. `max_tokens` (generated
    tokens expected) preallocates the buffers; without it they grow by reallocation.
    """

    def __init__(self, params, cfg: FlowCV2Config, prompt_token, prompt_feat, embedding, *, dtype="float32",
                 attention_impl="auto", n_timesteps=10, max_tokens=None, run: Callable = run_alone):
        self.params, self.cfg = params, cfg
        self.run = run  # runs each device call's `StageCall` (`cosyjax.stage_batch`: alone, or with other streams)
        self.dtype, self.attention_impl, self.n_timesteps = str(jnp.dtype(dtype)), attention_impl, int(n_timesteps)
        self.grid = commit_grid(cfg)
        pt = np.asarray(prompt_token)
        pf = np.asarray(prompt_feat)
        emb = np.asarray(embedding)
        if pt.ndim != 1 or pt.dtype.kind not in "iu":
            raise IncrementalFlowError(f"prompt_token must be int [P], got {pt.dtype} {pt.shape}")
        r = cfg.token_mel_ratio
        if pf.shape != (r * pt.shape[0], cfg.output_size):
            raise IncrementalFlowError(f"prompt_feat must be [{r * pt.shape[0]}, {cfg.output_size}] "
                                       f"(2 x prompt tokens, time-major), got {pf.shape}")
        if emb.shape != (cfg.spk_embed_dim,):
            raise IncrementalFlowError(f"embedding must be [{cfg.spk_embed_dim}], got {emb.shape}")
        if np.any((pt < 0) | (pt >= cfg.vocab_size)):
            raise IncrementalFlowError(f"prompt_token ids outside the speech-token vocabulary [0, {cfg.vocab_size})")
        if not (np.all(np.isfinite(pf)) and np.all(np.isfinite(emb))):
            raise IncrementalFlowError("prompt_feat / embedding contain NaN or Inf")
        if max_tokens is not None and int(max_tokens) < 1:
            raise IncrementalFlowError(f"max_tokens must be >= 1, got {max_tokens}")
        self.prompt_token = pt.astype(np.int32)
        self.prompt_feat = pf.astype(np.float32)
        self.embedding = emb.astype(np.float32)
        self.spks = _speaker(params, jnp.asarray(self.embedding[None]), cfg=cfg)
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self.capacity = 0
        self.state: Optional[dict] = None
        self.noise = self.cond = None
        self.committed = 0  # tokens (incl. prompt) whose frames are final in the buffers
        self.offset = 0  # generated tokens emitted so far (the next call's token_offset)
        self.seen = np.zeros((0,), np.int32)  # generated tokens fed so far (must stay a prefix)
        self.done = False

    @property
    def P(self) -> int:
        return int(self.prompt_token.shape[0])

    def _check_call(self, tokens, token_offset: int, n_tokens: int) -> np.ndarray:
        if self.done:
            raise IncrementalFlowError("final() was already called for this request")
        if int(token_offset) != self.offset:
            raise IncrementalFlowError(f"token_offset {token_offset} != the end of the frames emitted so far "
                                       f"({self.offset} tokens): chunks must be fed in order")
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise IncrementalFlowError(f"tokens must be int [N], got {tokens.dtype} {tokens.shape}")
        if tokens.shape[0] < n_tokens:
            raise IncrementalFlowError(f"n_tokens {n_tokens} > the {tokens.shape[0]} tokens given")
        tokens = tokens[:n_tokens].astype(np.int32)
        if np.any((tokens < 0) | (tokens >= self.cfg.vocab_size)):
            raise IncrementalFlowError(f"token ids outside the speech-token vocabulary [0, {self.cfg.vocab_size})")
        k = min(len(self.seen), n_tokens)
        if not np.array_equal(tokens[:k], self.seen[:k]):
            raise IncrementalFlowError("tokens changed since the previous chunk (they must only be appended)")
        if self.cfg.token_mel_ratio * (self.P + n_tokens) > self.cfg.noise_frames:
            raise IncrementalFlowError(f"{self.P + n_tokens} tokens (prompt + new) exceed upstream's noise buffer "
                                       f"of {self.cfg.noise_frames} frames")
        return tokens

    def _ensure_capacity(self, need: int) -> None:
        if need <= self.capacity:
            return
        want = need if self.max_tokens is None else max(need, self.P + self.max_tokens + self.grid)
        new = capacity_bucket(want)
        r, M = self.cfg.token_mel_ratio, self.cfg.output_size
        if self.state is None:
            self.state = init_cache(self.cfg, new, self.n_timesteps, self.dtype)
        else:
            self.state = grow_cache(self.state, self.capacity, new)
        frames = r * new
        noise = np.zeros((1, frames, M), np.float32)
        w = min(frames, self.cfg.noise_frames)
        noise[:, :w] = seed0_noise_np(w, M)[:, :w]
        cond = np.zeros((1, frames, M), np.float32)
        cond[0, :r * self.P] = self.prompt_feat
        self.noise, self.cond = jnp.asarray(noise), jnp.asarray(cond)
        self.capacity = new

    def chunk(self, tokens, token_offset: int, n_tokens: int) -> tuple[np.ndarray, int]:
        """Non-final chunk: frames 2*token_offset.. of `flow_inference(tokens[:n_tokens], streaming=True,
        finalize=False)` -> (mel [1, 2*(n_tokens-3-token_offset), 80] float32, flow_frames)."""
        L, r = self.cfg.pre_lookahead_len, self.cfg.token_mel_ratio
        n_tokens = int(n_tokens)
        if n_tokens - L <= int(token_offset):
            raise IncrementalFlowError(f"a non-final chunk needs n_tokens > token_offset + {L} (the last {L} "
                                       f"tokens are look-ahead only), got n_tokens {n_tokens}, offset {token_offset}")
        tokens = self._check_call(tokens, token_offset, n_tokens)
        P, C = self.P, self.committed
        end = P + n_tokens - L  # encoded tokens, prompt included
        Tq = new_token_bucket(end - C, self.grid)
        self._ensure_capacity(C + Tq)
        lead = min(C, 2)
        start = C - lead
        W = Tq + 2 + L
        all_tokens = np.concatenate([self.prompt_token, tokens])
        window = np.zeros((1, W), np.int32)
        piece = all_tokens[start:start + W]
        window[0, :len(piece)] = piece
        new_commit = (end // self.grid) * self.grid
        i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
        state, self.state = self.state, None  # donated to the call
        mel, self.state = self.run(StageCall(
            incremental_step, (self.params,),
            (state, window, i32(len(piece)), i32(lead), i32(C), i32(end), i32(new_commit - C), self.spks,
             self.noise, self.cond),
            static=(("attention_impl", self.attention_impl), ("cfg", self.cfg), ("dtype", self.dtype),
                    ("n_timesteps", self.n_timesteps)), donate=(0,)))
        first = r * (P + int(token_offset)) - r * C
        out = np.asarray(mel)[:, first:r * (end - C)]
        self.committed = new_commit
        self.offset = n_tokens - L
        self.seen = tokens
        return out, r * Tq

    def final(self, tokens, token_offset: int, n_tokens: int) -> tuple[np.ndarray, int]:
        """Final chunk (streaming=False, finalize=True: full attention, a full recompute as upstream) ->
        (mel [1, 2*(n_tokens-token_offset), 80] float32 from frame 2*token_offset, flow_frames)."""
        n_tokens = int(n_tokens)
        if n_tokens < max(1, int(token_offset)):
            raise IncrementalFlowError(f"final chunk needs n_tokens >= max(1, token_offset), got n_tokens "
                                       f"{n_tokens}, offset {token_offset}")
        tokens = self._check_call(tokens, token_offset, n_tokens)
        r, P = self.cfg.token_mel_ratio, self.P
        mel = final_pass(flow_core, self.params, self.cfg, tokens, self.prompt_token, self.prompt_feat,
                         self.embedding, n_timesteps=self.n_timesteps, dtype=self.dtype,
                         attention_impl=self.attention_impl, run=self.run)
        self.done = True
        self.state = self.noise = self.cond = None
        return mel[:, r * int(token_offset):], r * bucket_for(P + n_tokens, DEFAULT_BUCKETS)
