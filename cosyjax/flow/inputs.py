"""Host-side flow inputs shared by the CV2 and CV3 flows: user token / prompt arrays -> validated,
bucketed, zero-padded numpy arrays for the version's jitted `flow_core`.

`pack_inputs(cfg, token [B, Tt], token_len [B], prompt_token [B, Tp], prompt_token_len [B],
prompt_feat [B, Tm, 80], prompt_feat_len [B], embedding [B, 192], *, finalize, noise=None, buckets)`
-> dict(tokens [B, N] int32, n_tokens [B], n_prompt [B], lookahead [B], cond [B, N*r, 80],
embedding [B, 192] f32, noise [1|B, N*r, 80]) where N = the smallest bucket holding prompt + new tokens.
`cfg` is either version's flow config (fields used: output_size, spk_embed_dim, token_mel_ratio,
pre_lookahead_len, vocab_size, noise_frames).
"""
from __future__ import annotations
from cosyjax.errors import CosyJaxError

import functools
from typing import Sequence

import jax.numpy as jnp
import numpy as np

__all__ = ["DEFAULT_BUCKETS", "FlowInputError", "bucket_for", "pack_inputs", "new_frames", "seed0_noise_np",
           "seed0_noise"]

# Total (prompt + new) token counts the flow is compiled for; a call is padded to the smallest
# bucket that holds it. 7500 tokens = 15000 mel frames = upstream's noise buffer (300 s).
DEFAULT_BUCKETS = (64, 128, 192, 256, 320, 384, 512, 640, 768, 1024, 1280, 1536, 2048, 2560, 3072, 4096,
                   5120, 6144, 7500)


class FlowInputError(CosyJaxError):
    """Inputs that the flow cannot process (lengths, vocabulary, shapes)."""


def bucket_for(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """Smallest bucket >= n (token count)."""
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    raise FlowInputError(f"{n} tokens (prompt + new) exceed the largest bucket {max(buckets)}")


def _as_np(name, a, ndim, kind):
    a = np.asarray(a)
    if a.ndim != ndim:
        raise FlowInputError(f"{name} must have {ndim} dims, got shape {a.shape}")
    if kind == "i" and a.dtype.kind not in "iu":
        raise FlowInputError(f"{name} must be integer, got {a.dtype}")
    if kind == "f" and a.dtype.kind not in "fiu":
        raise FlowInputError(f"{name} must be numeric, got {a.dtype}")
    return a


def pack_inputs(cfg, token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len,
                embedding, *, finalize: bool, noise=None, buckets: Sequence[int] = DEFAULT_BUCKETS) -> dict:
    """Validate on the host and pack into the bucketed arrays `flow_core` takes (numpy)."""
    token = _as_np("token", token, 2, "i")
    prompt_token = _as_np("prompt_token", prompt_token, 2, "i")
    prompt_feat = _as_np("prompt_feat", prompt_feat, 3, "f")
    embedding = _as_np("embedding", embedding, 2, "f")
    token_len = _as_np("token_len", token_len, 1, "i").astype(np.int64)
    prompt_token_len = _as_np("prompt_token_len", prompt_token_len, 1, "i").astype(np.int64)
    prompt_feat_len = _as_np("prompt_feat_len", prompt_feat_len, 1, "i").astype(np.int64)
    B = token.shape[0]
    for name, a in (("token_len", token_len), ("prompt_token", prompt_token), ("prompt_token_len", prompt_token_len),
                    ("prompt_feat", prompt_feat), ("prompt_feat_len", prompt_feat_len), ("embedding", embedding)):
        if a.shape[0] != B:
            raise FlowInputError(f"{name} has batch size {a.shape[0]}, token has {B}")
    M = cfg.output_size
    if prompt_feat.shape[2] != M:
        raise FlowInputError(f"prompt_feat must be [B, T, {M}] (time-major mel), got {prompt_feat.shape}")
    if embedding.shape[1] != cfg.spk_embed_dim:
        raise FlowInputError(f"embedding must be [B, {cfg.spk_embed_dim}], got {embedding.shape}")
    if np.any(token_len < 1):
        raise FlowInputError(f"empty token sequence (token_len = {token_len.tolist()}); need at least one token")
    if np.any(token_len > token.shape[1]):
        raise FlowInputError(f"token_len {token_len.tolist()} exceeds the token array width {token.shape[1]}")
    if np.any(prompt_token_len < 0) or np.any(prompt_token_len > prompt_token.shape[1]):
        raise FlowInputError(f"prompt_token_len {prompt_token_len.tolist()} outside [0, {prompt_token.shape[1]}]")
    r = cfg.token_mel_ratio
    if np.any(prompt_feat_len != r * prompt_token_len):
        raise FlowInputError(
            f"prompt_feat_len {prompt_feat_len.tolist()} must be {r} x prompt_token_len {prompt_token_len.tolist()} "
            "(upstream's frontend trims prompt tokens and mel to match: token_len = min(feat_len // 2, n_tokens))")
    if np.any(prompt_feat_len > prompt_feat.shape[1]):
        raise FlowInputError(f"prompt_feat_len {prompt_feat_len.tolist()} exceeds prompt_feat width "
                             f"{prompt_feat.shape[1]}")
    L = cfg.pre_lookahead_len
    if not finalize and np.any(token_len <= L):
        raise FlowInputError(f"finalize=False needs more than pre_lookahead_len={L} new tokens (the last {L} are "
                             f"right context only), got token_len {token_len.tolist()}")
    for name, ids, lens in (("token", token, token_len), ("prompt_token", prompt_token, prompt_token_len)):
        valid = np.arange(ids.shape[1])[None, :] < lens[:, None]
        bad = valid & ((ids < 0) | (ids >= cfg.vocab_size))
        if np.any(bad):
            b, i = np.argwhere(bad)[0]
            raise FlowInputError(f"{name}[{b}, {i}] = {int(ids[b, i])} is outside the speech-token vocabulary "
                                 f"[0, {cfg.vocab_size})")
    if not np.all(np.isfinite(prompt_feat)) or not np.all(np.isfinite(embedding)):
        raise FlowInputError("prompt_feat / embedding contain NaN or Inf")
    n_tokens = prompt_token_len + token_len
    if n_tokens.max() * r > cfg.noise_frames:
        raise FlowInputError(f"{int(n_tokens.max())} tokens (prompt + new) = {int(n_tokens.max()) * r} mel frames "
                             f"exceed upstream's fixed noise buffer of {cfg.noise_frames} frames")
    N = bucket_for(int(n_tokens.max()), buckets)
    T = N * r
    tokens = np.zeros((B, N), np.int32)
    cond = np.zeros((B, T, M), np.float32)
    for b in range(B):
        p, n = int(prompt_token_len[b]), int(token_len[b])
        tokens[b, :p] = prompt_token[b, :p]
        tokens[b, p:p + n] = token[b, :n]
        cond[b, :p * r] = prompt_feat[b, :p * r]
    lookahead = np.full((B,), 0 if finalize else L, np.int32)
    if noise is None:
        noise_arr = seed0_noise(T, M)
    else:
        noise = _as_np("noise", noise, 3, "f").astype(np.float32)
        if noise.shape[0] not in (1, B) or noise.shape[2] != M:
            raise FlowInputError(f"noise must be [1 or B, T, {M}] (time-major), got {noise.shape}")
        need = int((n_tokens - lookahead).max()) * r  # frames the solver integrates
        if noise.shape[1] < need:
            raise FlowInputError(f"noise has {noise.shape[1]} frames, need {need} (prompt + new mel frames)")
        noise_arr = np.zeros((noise.shape[0], T, M), np.float32)
        w = min(T, noise.shape[1])
        noise_arr[:, :w] = noise[:, :w]
    return dict(tokens=tokens, n_tokens=n_tokens.astype(np.int32), n_prompt=prompt_token_len.astype(np.int32),
                lookahead=lookahead, cond=cond, embedding=embedding.astype(np.float32), noise=noise_arr)


def new_frames(packed: dict, token_mel_ratio: int) -> int:
    """max(mel_len) of a packed call: the new (non-prompt, non-look-ahead) mel frames of its longest row."""
    return int((packed["n_tokens"] - packed["lookahead"] - packed["n_prompt"]).max()) * token_mel_ratio


def seed0_noise_np(T: int, n_mels: int) -> np.ndarray:
    """Upstream's seed-0 `rand_noise[:, :, :T]`, time-major: float32 [1, T, n_mels] (numpy)."""
    from cosyjax.flow.noise import cfm_noise

    return np.ascontiguousarray(cfm_noise(T, n_mels)[0].T[None])


@functools.lru_cache(maxsize=8)
def seed0_noise(T: int, n_mels: int):
    """`seed0_noise_np` as a cached device array [1, T, n_mels]."""
    return jnp.asarray(seed0_noise_np(T, n_mels))
