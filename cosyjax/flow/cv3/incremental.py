"""Exact incremental streaming for the CosyVoice3 flow: the DiT keys/values of earlier frames are kept.

Upstream streaming (`cosyvoice/cli/model.py` `tts(stream=True)` -> `token2wav`) re-runs the flow on
every token so far at each chunk with the block-causal mask (`static_chunk_size` = 50 frames). Frames
of earlier chunks then never see later frames, and their inputs (mu from the pre-lookahead layer, which
needs only tokens t-2..t+3; cond = prompt mel; the seed-0 noise at absolute positions; spks) do not
change when tokens arrive. So at every ODE step, CFG row and DiT layer their keys/values, and their ODE
states, are the same in the next call. `IncrementalFlowCV3.chunk` computes only the new frames:

  per ODE step s (one `lax.scan`, `cfm.euler_schedule`), for CFG rows [cond; uncond]:
    DiT(x_s[new], mu[new], cond[new], spks, cache = K/V of frames < start at step s, conv-pos context)
  and appends the new frames' K/V at step s to the cache.

Non-final chunks must end on a chunk boundary (upstream's schedule always does: the first hop is
padded so that prompt + hop is a multiple of 25 tokens = 50 frames). The final chunk runs upstream's
full-attention pass (`streaming=False, finalize=True`) over everything (earlier frames change there).

Bit-exact: every chunk's mel equals the recompute path's (`incremental=False`) bit for bit, not just to
rounding (`tests/test_stream_incremental.py`, 30 s and 60 s). The two compute the same frames among
different numbers of rows and keys, so everything shape-dependent is made shape-independent: streaming
attention runs in fixed-shape tiles on the absolute chunk grid (`cosyjax.nn.attention`, the CV2
position term per tile too), the norms reduce with `cosyjax.nn.layers.feature_mean`, and the streaming
convolutions (pre-lookahead, DiT conv-pos, CV2 encoder / U-Net on streaming chunks) are `cosyjax.nn.layers.RowStableConv`:
XLA's CPU convolution changes its bits with the length on some CPUs (an AMD EPYC here), its plain dots
do not. The dense layers are row-stable as XLA's CPU emits them (checked by the same test).

Device state (`state` dict, donated to each call): `k`, `v` [n_steps, depth, 2, S, inner] (dtype =
matmul dtype), `conv_in`, `conv_mid` [n_steps, 2, K-1, dim] float32. S (cache capacity, frames) and F
(new frames per call, padded) are bucketed: one compiled program per (S, F) pair.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.errors import CosyJaxError
from cosyjax.flow.cfm import euler_schedule
from cosyjax.flow.cv3.config import FlowCV3Config
from cosyjax.flow.cv3.dit import DiTCache
from cosyjax.flow.cv3.model import FlowCV3, flow_core
from cosyjax.flow.inference import final_pass
from cosyjax.flow.inputs import DEFAULT_BUCKETS, bucket_for, seed0_noise_np
from cosyjax.nn.attention import KEY_BLOCKS_PER_TILE
from cosyjax.stage_batch import StageCall, run_alone

__all__ = ["IncrementalFlowCV3", "IncrementalFlowError", "incremental_chunk", "init_state", "grow_state",
           "DEFAULT_CACHE_BUCKETS", "DEFAULT_NEW_FRAME_BUCKETS"]

# Cache capacities in mel frames (doubling multiples of the attention's 200-frame key tile, up to
# upstream's 15000-frame noise buffer): few reallocations/compiles. Unused capacity costs memory only:
# attention reads the key tiles below the valid prefix in place (`attention(..., kv_cache=...)`), and
# nothing copies the whole buffer.
DEFAULT_CACHE_BUCKETS = (400, 800, 1600, 3200, 6400, 12800, 15000)
# New frames per call: multiples of the 50-frame chunk (upstream hops are 50 / 100 / 200 frames).
DEFAULT_NEW_FRAME_BUCKETS = (50, 100, 200, 300, 400, 600, 800, 1200, 1600, 2400, 3200, 4800, 6400, 9600, 15000)


class IncrementalFlowError(CosyJaxError):
    """A streaming call that the incremental flow cannot serve exactly (order, boundaries, changed tokens)."""


def init_state(cfg: FlowCV3Config, capacity: int, n_timesteps: int, dtype: str = "float32") -> dict:
    """Zero cache for `capacity` frames: k/v [n_steps, depth, 2, S, inner] (dtype), conv contexts f32."""
    rows = 2 if cfg.inference_cfg_rate != 0.0 else 1
    kv = (n_timesteps, cfg.depth, rows, capacity, cfg.inner_dim)
    ctx = (n_timesteps, rows, cfg.conv_pos_kernel - 1, cfg.dim)
    return {"k": jnp.zeros(kv, jnp.dtype(dtype)), "v": jnp.zeros(kv, jnp.dtype(dtype)),
            "conv_in": jnp.zeros(ctx, jnp.float32), "conv_mid": jnp.zeros(ctx, jnp.float32)}


@functools.partial(jax.jit, static_argnames=("capacity",))
def grow_state(state: dict, *, capacity: int) -> dict:
    """Reallocate the k/v cache to `capacity` frames (axis 3), keeping the frames already cached."""
    pad = lambda a: jnp.pad(a, ((0, 0),) * 3 + ((0, capacity - a.shape[3]), (0, 0)))  # noqa: E731
    return {**state, "k": pad(state["k"]), "v": pad(state["v"])}


@functools.partial(jax.jit, static_argnames=("cfg", "n_timesteps", "dtype", "attention_impl"),
                   donate_argnums=(1,))
def incremental_chunk(params, state, tokens, n_win, left, cond, noise, embedding, start, n_valid, *,
                      cfg: FlowCV3Config, n_timesteps: int, dtype: str = "float32", attention_impl: str = "auto"):
    """Solve the flow ODE for F new frames against the cached earlier frames (streaming chunk mask).

    tokens [W] int32 (W = F/2 + 5): the token window starting `left` (0 at the sequence start, else 2)
    tokens before the first new frame's token, `n_win` valid, then zeros; cond, noise [F, 80] f32 (prompt
    mel / seed-0 noise at absolute frames start + [0, F)); embedding [192]; start, n_valid int32 scalars.
    -> (mel [F, 80] float32 (frames >= n_valid are padding), new state).
    """
    module = FlowCV3(cfg, jnp.dtype(dtype), attention_impl)
    variables = {"params": params}
    r = cfg.token_mel_ratio
    F = cond.shape[0]
    _, mu_win = module.apply(variables, tokens[None], n_win[None], method=FlowCV3.embed)
    mu = jax.lax.dynamic_slice_in_dim(mu_win, left * r, F, axis=1)  # [1, F, 80]
    spks = module.apply(variables, embedding[None], method=FlowCV3.speaker)
    use_cfg = cfg.inference_cfg_rate != 0.0
    if use_cfg:  # rows [cond; uncond]: the unconditional row zeroes mu, spks and cond (as `cfm.solve_cfm`)
        mu, spks = jnp.concatenate([mu, jnp.zeros_like(mu)]), jnp.concatenate([spks, jnp.zeros_like(spks)])
        cond = jnp.stack([cond, jnp.zeros_like(cond)])
    else:
        cond = cond[None]
    rows = mu.shape[0]
    t_in, dts = euler_schedule(n_timesteps, cfg.t_scheduler)
    c_cond, c_unc = np.float32(1.0 + cfg.inference_cfg_rate), np.float32(cfg.inference_cfg_rate)

    # The cache buffers are read in place by every step's attention tiles (`DiTCache.step`, the layer
    # index) and written once after the ODE loop: the donated buffer is aliased to the output, so a
    # call copies nothing proportional to the cache capacity.
    def step(x, xs):
        s, t, dt, conv_in, conv_mid = xs
        cache = DiTCache(state["k"], state["v"], s, conv_in, conv_mid, start, n_valid)
        x_in = jnp.broadcast_to(x, (rows,) + x.shape[1:])
        v_raw, upd = module.apply(variables, x_in, None, mu, jnp.full((rows,), t, jnp.float32), spks, cond,
                                  True, cache, method=FlowCV3.estimate)
        vel = c_cond * v_raw[:1] - c_unc * v_raw[1:] if use_cfg else v_raw
        return x + dt * vel, upd

    steps = (jnp.arange(n_timesteps, dtype=jnp.int32), jnp.asarray(t_in), jnp.asarray(dts),
             state["conv_in"], state["conv_mid"])
    x1, upd = jax.lax.scan(step, noise[None].astype(jnp.float32), steps)
    z = jnp.int32(0)
    put = lambda a, u: jax.lax.dynamic_update_slice(a, u.astype(a.dtype), (z, z, z, start, z))  # noqa: E731
    new_state = {"k": put(state["k"], upd.k), "v": put(state["v"], upd.v),
                 "conv_in": upd.conv_in, "conv_mid": upd.conv_mid}
    return x1[0], new_state


def _int_vector(name, a):
    a = np.asarray(a)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise IncrementalFlowError(f"{name} must be a 1-D integer array, got shape {a.shape} dtype {a.dtype}")
    return a.astype(np.int64)


class IncrementalFlowCV3:
    """One streaming utterance of the CV3 flow with cached DiT keys/values (host driver, numpy out).

    prompt_token int [P]; prompt_feat float32 [2P, 80] (time-major); embedding float32 [192].
    Call `chunk(...)` for each non-final chunk in order, then `final(...)` once.
    """

    def __init__(self, params, cfg: FlowCV3Config, prompt_token, prompt_feat, embedding, *, dtype="float32",
                 attention_impl="auto", n_timesteps=10, max_tokens: Optional[int] = None,
                 cache_buckets: Sequence[int] = DEFAULT_CACHE_BUCKETS,
                 new_frame_buckets: Sequence[int] = DEFAULT_NEW_FRAME_BUCKETS,
                 token_buckets: Sequence[int] = DEFAULT_BUCKETS, run: Callable = run_alone):
        if cfg.static_chunk_size <= 0:
            raise IncrementalFlowError("incremental streaming needs the block-causal chunk mask "
                                       f"(static_chunk_size > 0), got {cfg.static_chunk_size}")
        r = cfg.token_mel_ratio
        self.prompt_token = _int_vector("prompt_token", prompt_token)
        P = self.prompt_token.shape[0]
        feat = np.asarray(prompt_feat, np.float32)
        if feat.shape != (r * P, cfg.output_size):
            raise IncrementalFlowError(f"prompt_feat must be [{r} x P = {r * P}, {cfg.output_size}] (time-major), "
                                       f"got {feat.shape}")
        emb = np.asarray(embedding, np.float32)
        if emb.shape != (cfg.spk_embed_dim,):
            raise IncrementalFlowError(f"embedding must be [{cfg.spk_embed_dim}], got {emb.shape}")
        if not (np.all(np.isfinite(feat)) and np.all(np.isfinite(emb))):
            raise IncrementalFlowError("prompt_feat / embedding contain NaN or Inf")
        self._check_vocab("prompt_token", self.prompt_token, cfg)
        tile = cfg.static_chunk_size * KEY_BLOCKS_PER_TILE  # the attention reads the cache in key tiles
        for name, b, m in (("cache_buckets", cache_buckets, tile), ("new_frame_buckets", new_frame_buckets, r)):
            if not b or any(int(x) % m for x in b):
                raise IncrementalFlowError(f"{name} must be non-empty multiples of {m} frames, got {tuple(b)}")
        self.params, self.cfg = jax.device_put(params), cfg  # uploaded once, not on every chunk
        self.prompt_feat, self.embedding = feat, emb
        self.dtype, self.attention_impl, self.n_timesteps = str(jnp.dtype(dtype)), attention_impl, int(n_timesteps)
        self.cache_buckets, self.new_frame_buckets = tuple(sorted(cache_buckets)), tuple(sorted(new_frame_buckets))
        self.token_buckets = tuple(token_buckets)
        self.run = run  # runs each chunk's `StageCall` (`cosyjax.stage_batch`: alone, or with other streams)
        self.max_frames = min(cfg.noise_frames, self.cache_buckets[-1])
        self.min_capacity = 0
        if max_tokens is not None:  # one allocation for the whole utterance
            self.min_capacity = self._bucket(r * (P + int(max_tokens)), self.cache_buckets, "cache")
        self.state: Optional[dict] = None
        self.frames_done = 0  # frames (prompt included) whose K/V are cached
        self.emitted = 0  # token offset the next call must start at
        self.tokens_seen = np.zeros((0,), np.int64)  # tokens the cached frames depend on
        self.finished = False

    # -- helpers ------------------------------------------------------------------------------------
    @staticmethod
    def _check_vocab(name, ids, cfg):
        bad = np.flatnonzero((ids < 0) | (ids >= cfg.vocab_size))
        if bad.size:
            raise IncrementalFlowError(f"{name}[{bad[0]}] = {int(ids[bad[0]])} is outside the speech-token "
                                       f"vocabulary [0, {cfg.vocab_size})")

    def _bucket(self, n: int, buckets, what: str) -> int:
        for b in buckets:
            if n <= b:
                return int(b)
        raise IncrementalFlowError(f"{n} {what} frames exceed the largest {what} bucket {buckets[-1]}")

    def _check_call(self, tokens, token_offset: int, n_tokens: int):
        if self.finished:
            raise IncrementalFlowError("this utterance is finished (final() was called); start a new one")
        tokens = _int_vector("tokens", tokens)
        if not 0 < n_tokens <= tokens.shape[0]:
            raise IncrementalFlowError(f"n_tokens {n_tokens} outside [1, len(tokens) = {tokens.shape[0]}]")
        if token_offset != self.emitted:
            raise IncrementalFlowError(f"token_offset {token_offset} != {self.emitted}, the end of the previous "
                                       "chunk (chunks must come in order without gaps or repeats)")
        seen = self.tokens_seen.shape[0]
        if n_tokens < seen:
            raise IncrementalFlowError(f"n_tokens {n_tokens} < {seen} tokens already used by earlier chunks")
        if not np.array_equal(tokens[:seen], self.tokens_seen):
            i = int(np.flatnonzero(tokens[:seen] != self.tokens_seen)[0])
            raise IncrementalFlowError(f"tokens changed since the previous chunk (first at index {i}: "
                                       f"{int(self.tokens_seen[i])} -> {int(tokens[i])})")
        tokens = tokens[:n_tokens]
        self._check_vocab("tokens", tokens, self.cfg)
        return tokens

    # -- public -------------------------------------------------------------------------------------
    def chunk(self, tokens, token_offset: int, n_tokens: int) -> tuple[np.ndarray, int]:
        """Non-final chunk (streaming=True, finalize=False) -> (mel [1, 2*(n_tokens-3-token_offset), 80], flow_frames).

        The mel equals `flow_inference(tokens[:n_tokens], streaming=True, finalize=False)` from frame
        2*token_offset; flow_frames = estimator query rows per ODE step (new frames incl. padding; the
        first call also computes the prompt frames).
        """
        c, r, L = self.cfg, self.cfg.token_mel_ratio, self.cfg.pre_lookahead_len
        token_offset, n_tokens = int(token_offset), int(n_tokens)
        tokens = self._check_call(tokens, token_offset, n_tokens)
        P = self.prompt_token.shape[0]
        end_tok = P + n_tokens - L  # frames of the last L tokens are right context only
        if n_tokens - L <= token_offset:
            raise IncrementalFlowError(f"a non-final chunk needs more than {L} tokens beyond token_offset "
                                       f"{token_offset}, got n_tokens {n_tokens}")
        start, end = self.frames_done, r * end_tok
        if end % c.static_chunk_size:
            raise IncrementalFlowError(
                f"non-final chunk ends at mel frame {end} (prompt {P} + {n_tokens - L} tokens), not on a "
                f"{c.static_chunk_size}-frame chunk boundary: later tokens would change its last frames")
        if end > self.max_frames:
            raise IncrementalFlowError(f"{end} mel frames exceed the {self.max_frames}-frame limit")
        n_new = end - start
        F = self._bucket(n_new, self.new_frame_buckets, "new")
        capacity = max(self._bucket(start + F, self.cache_buckets, "cache"), self.min_capacity)
        if self.state is None:
            self.state = init_state(c, capacity, self.n_timesteps, self.dtype)
        elif self.state["k"].shape[3] < capacity:
            self.state = grow_state(self.state, capacity=capacity)

        all_tok = np.concatenate([self.prompt_token, tokens])
        left = 0 if start == 0 else 2  # the pre-lookahead's causal conv (k=3) needs 2 earlier tokens
        s_tok = start // r
        win = all_tok[s_tok - left:end_tok + L]
        tok = np.zeros((F // r + 2 + L,), np.int32)
        tok[:win.shape[0]] = win
        cond = np.zeros((F, c.output_size), np.float32)
        n_cond = max(0, min(r * P, start + F) - start)
        cond[:n_cond] = self.prompt_feat[start:start + n_cond]
        noise = np.zeros((F, c.mel_dim), np.float32)
        n_noise = min(F, c.noise_frames - start)
        noise[:n_noise] = seed0_noise_np(start + n_noise, c.mel_dim)[0, start:]
        state, self.state = self.state, None  # donated to the call
        mel, self.state = self.run(StageCall(
            incremental_chunk, (self.params,),
            (state, tok, np.int32(win.shape[0]), np.int32(left), cond, noise, self.embedding, np.int32(start),
             np.int32(n_new)),
            static=(("attention_impl", self.attention_impl), ("cfg", c), ("dtype", self.dtype),
                    ("n_timesteps", self.n_timesteps)), donate=(0,)))
        first = r * (P + token_offset) - start  # the first call also solved the prompt frames
        out = np.asarray(mel)[first:n_new][None]
        self.frames_done, self.emitted, self.tokens_seen = end, n_tokens - L, tokens.copy()
        return out, F

    def final(self, tokens, token_offset: int, n_tokens: int) -> tuple[np.ndarray, int]:
        """Final chunk, as upstream: full attention (streaming=False, finalize=True) over prompt + all tokens.

        -> (mel [1, 2*(n_tokens-token_offset), 80], flow_frames = every (bucketed) frame: a full recompute).
        """
        c, r = self.cfg, self.cfg.token_mel_ratio
        token_offset, n_tokens = int(token_offset), int(n_tokens)
        tokens = self._check_call(tokens, token_offset, n_tokens)
        P = self.prompt_token.shape[0]
        mel = final_pass(flow_core, self.params, c, tokens, self.prompt_token, self.prompt_feat, self.embedding,
                         n_timesteps=self.n_timesteps, dtype=self.dtype, attention_impl=self.attention_impl,
                         buckets=self.token_buckets, run=self.run)
        self.finished, self.state = True, None
        return mel[:, r * token_offset:], r * bucket_for(P + n_tokens, self.token_buckets)
