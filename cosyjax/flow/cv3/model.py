"""CosyVoice3 flow (upstream `cosyvoice/flow/flow.py:CausalMaskedDiffWithDiT.inference`).

tokens -> mel:
  spks = Linear_{192->80}(L2normalize(embedding))
  e    = Embedding(prompt_token ++ token) * length mask                      [B, N, 80]
  h    = PreLookaheadLayer(e)  (finalize=False: the last 3 tokens are right context only)
  mu   = repeat(h, 2) along time                                             [B, 2N, 80]
  cond = prompt mel in the first 2P frames, zeros after
  mel  = CFM(DiT, mu, cond, spks, noise = seed-0 buffer[:2N])[2P:]          (prompt frames removed)

Public API: `flow_inference(params, cfg, token, token_len, prompt_token, prompt_token_len, prompt_feat,
prompt_feat_len, embedding, *, streaming, finalize, noise=None, n_timesteps=10)` -> (mel [B, T_new, 80],
mel_len [B]). Inputs are validated on the host, packed into a bucketed static length (so calls whose
total token count falls in the same bucket reuse one compilation) and run by one jitted function.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.flow.cfm import solve_cfm
from cosyjax.flow.cv3.config import FlowCV3Config
from cosyjax.flow.cv3.dit import DiT
from cosyjax.flow.masks import padding_mask
from cosyjax.flow.pre_lookahead import PreLookaheadLayer

__all__ = ["FlowCV3", "FlowInputError", "flow_inference", "flow_core", "DEFAULT_BUCKETS", "bucket_for",
           "init_params", "pack_inputs", "cast_matmul_weights"]

# Total (prompt + new) token counts the flow is compiled for; a call is padded to the smallest
# bucket that holds it. 7500 tokens = 15000 mel frames = upstream's noise buffer (300 s).
DEFAULT_BUCKETS = (64, 128, 192, 256, 320, 384, 512, 640, 768, 1024, 1280, 1536, 2048, 2560, 3072, 4096,
                   5120, 6144, 7500)


class FlowInputError(ValueError):
    """Inputs that the flow cannot process (lengths, vocabulary, shapes)."""


class FlowCV3(nn.Module):
    """All CV3 flow parameters; methods `embed`, `speaker`, `estimate` are used by `flow_core`."""

    cfg: FlowCV3Config
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"

    def setup(self):
        c = self.cfg
        self.input_embedding = nn.Embed(c.vocab_size, c.input_size, name="input_embedding")
        self.spk_embed_affine_layer = nn.Dense(c.output_size, name="spk_embed_affine_layer")
        self.pre_lookahead_layer = PreLookaheadLayer(c.pre_lookahead_channels, c.pre_lookahead_len, self.dtype,
                                                     name="pre_lookahead_layer")
        self.estimator = DiT(c, self.dtype, self.attention_impl, name="estimator")

    def speaker(self, embedding):
        """embedding [B, 192] -> spks [B, 80] float32 (`F.normalize`, eps 1e-12, then the affine layer)."""
        e = embedding.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(e * e, axis=-1, keepdims=True))
        return self.spk_embed_affine_layer(e / jnp.maximum(norm, 1e-12))

    def token_embedding(self, tokens, n_tokens):
        """tokens [B, N] int, n_tokens [B] -> [B, N, 80] float32, zero after each row's length."""
        tok = jnp.clip(tokens, 0, self.cfg.vocab_size - 1)  # upstream clamps min 0; padding is masked
        e = self.input_embedding(tok).astype(jnp.float32)
        return jnp.where(padding_mask(n_tokens, tokens.shape[1])[:, :, None], e, 0.0)

    def embed(self, tokens, n_tokens):
        """tokens [B, N], n_tokens [B] -> (embedding [B, N, 80], mu [B, N*ratio, 80]) float32.

        The pre-lookahead output at token t needs tokens t..t+3; for rows that do not finalize,
        the caller shortens the valid length by 3 afterwards (those tokens then act as context).
        """
        e = self.token_embedding(tokens, n_tokens)
        h = self.pre_lookahead_layer(e).astype(jnp.float32)
        return e, jnp.repeat(h, self.cfg.token_mel_ratio, axis=1)

    def estimate(self, x, mask, mu, t, spks, cond, streaming: bool = False):
        return self.estimator(x, mask, mu, t, spks, cond, streaming=streaming)

    def __call__(self, tokens, n_tokens, embedding, x, t, cond, streaming: bool = False):
        """Touches every parameter once (used by `init`): returns the estimator output [B, 2N, 80]."""
        _, mu = self.embed(tokens, n_tokens)
        spks = self.speaker(embedding)
        mask = padding_mask(n_tokens * self.cfg.token_mel_ratio, mu.shape[1])
        return self.estimate(x, mask, mu, t, spks, cond, streaming)


def init_params(cfg: FlowCV3Config, key=None, n_tokens: int = 8, abstract: bool = False):
    """Random parameters with the converter's tree structure (or its shapes, with `abstract=True`)."""
    key = jax.random.PRNGKey(0) if key is None else key
    module = FlowCV3(cfg)
    T = n_tokens * cfg.token_mel_ratio
    args = (jnp.zeros((1, n_tokens), jnp.int32), jnp.full((1,), n_tokens, jnp.int32),
            jnp.zeros((1, cfg.spk_embed_dim)), jnp.zeros((1, T, cfg.mel_dim)), jnp.zeros((1,)),
            jnp.zeros((1, T, cfg.mel_dim)))
    init = lambda k: module.init(k, *args)["params"]  # noqa: E731
    return jax.eval_shape(init, key) if abstract else jax.jit(init)(key)


# kernels that run in the compute dtype; time MLP, AdaLN modulation and proj_out stay float32
_LOW_PRECISION_KERNELS = {("estimator", "blocks", n) for n in ("to_q", "to_k", "to_v", "to_out", "ff_in", "ff_out")} | {
    ("estimator", n) for n in ("input_proj", "conv_pos_1", "conv_pos_2")} | {
    ("pre_lookahead_layer", n) for n in ("conv1", "conv2")}


def cast_matmul_weights(params, dtype="bfloat16"):
    """Store the compute-dtype matmul/conv kernels in `dtype` (halves their memory traffic).

    Only kernels that `FlowCV3(dtype=...)` casts to `dtype` anyway are cast, so results equal running
    with float32 params; biases, embeddings and float32 layers are left alone.
    """
    dtype = jnp.dtype(dtype)

    def visit(tree, path):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = visit(v, path + (k,))
            else:
                out[k] = v.astype(dtype) if (k == "kernel" and path in _LOW_PRECISION_KERNELS) else v
        return out

    return visit(params, ())


@functools.partial(jax.jit, static_argnames=("cfg", "streaming", "n_timesteps", "dtype", "attention_impl",
                                             "return_trajectory"))
def flow_core(params, tokens, n_tokens, n_prompt, lookahead, cond, embedding, noise, *, cfg: FlowCV3Config,
              streaming: bool, n_timesteps: int = 10, dtype: str = "float32", attention_impl: str = "auto",
              return_trajectory: bool = False):
    """The jitted flow on packed, bucketed inputs.

    tokens [B, N] int32 (prompt ++ new, zero-padded), n_tokens [B] (valid tokens incl. the look-ahead
    context), n_prompt [B], lookahead [B] (0 when finalizing, else pre_lookahead_len), cond [B, 2N, 80]
    (prompt mel then zeros), embedding [B, 192], noise [B|1, 2N, 80].
    Returns a dict: mel [B, 2N, 80] (new frames first, zero after mel_len), mel_len [B], mu, cond,
    spks, mask (and `trajectory` when requested).
    """
    module = FlowCV3(cfg, jnp.dtype(dtype), attention_impl)
    variables = {"params": params}
    B, N = tokens.shape
    r = cfg.token_mel_ratio
    T = N * r
    _, mu = module.apply(variables, tokens, n_tokens, method=FlowCV3.embed)
    spks = module.apply(variables, embedding, method=FlowCV3.speaker)
    n_frames = (n_tokens - lookahead) * r
    mask = padding_mask(n_frames, T)
    noise = jnp.broadcast_to(noise.astype(jnp.float32), (B, T, cfg.mel_dim))

    def estimator_fn(x, m, mu_, t, s, c):
        return module.apply(variables, x, m, mu_, t, s, c, streaming, method=FlowCV3.estimate)

    out = solve_cfm(estimator_fn, mu, mask, spks, cond, noise, n_steps=n_timesteps,
                    cfg_rate=cfg.inference_cfg_rate, return_trajectory=return_trajectory,
                    t_scheduler=cfg.t_scheduler)
    feat, traj = out if return_trajectory else (out, None)
    prompt_frames = n_prompt * r
    mel_len = n_frames - prompt_frames
    idx = jnp.clip(prompt_frames[:, None] + jnp.arange(T)[None, :], 0, T - 1)
    mel = jnp.take_along_axis(feat, idx[:, :, None], axis=1)
    mel = jnp.where(padding_mask(mel_len, T)[:, :, None], mel, 0.0)
    res = {"mel": mel, "mel_len": mel_len, "mu": mu, "cond": cond, "spks": spks, "mask": mask, "feat": feat}
    if return_trajectory:
        res["trajectory"] = traj
    return res


def bucket_for(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """Smallest bucket >= n (token count)."""
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    raise FlowInputError(f"{n} tokens (prompt + new) exceed the largest bucket {max(buckets)}")


def _as_np(name, a, ndim, dtype_kind=None):
    a = np.asarray(a)
    if a.ndim != ndim:
        raise FlowInputError(f"{name} must have {ndim} dims, got shape {a.shape}")
    if dtype_kind == "i" and a.dtype.kind not in "iu":
        raise FlowInputError(f"{name} must be integer, got {a.dtype}")
    if dtype_kind == "f" and a.dtype.kind not in "fiu":
        raise FlowInputError(f"{name} must be numeric, got {a.dtype}")
    return a


def pack_inputs(cfg: FlowCV3Config, token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len,
                embedding, *, finalize: bool, noise=None, buckets: Sequence[int] = DEFAULT_BUCKETS):
    """Validate on the host and pack into the bucketed arrays `flow_core` takes (numpy)."""
    token = _as_np("token", token, 2, "i")
    prompt_token = _as_np("prompt_token", prompt_token, 2, "i")
    prompt_feat = _as_np("prompt_feat", prompt_feat, 3, "f")
    embedding = _as_np("embedding", embedding, 2, "f")
    B = token.shape[0]
    token_len = _as_np("token_len", token_len, 1, "i").astype(np.int64)
    prompt_token_len = _as_np("prompt_token_len", prompt_token_len, 1, "i").astype(np.int64)
    prompt_feat_len = _as_np("prompt_feat_len", prompt_feat_len, 1, "i").astype(np.int64)
    for name, a in (("token_len", token_len), ("prompt_token", prompt_token), ("prompt_token_len", prompt_token_len),
                    ("prompt_feat", prompt_feat), ("prompt_feat_len", prompt_feat_len), ("embedding", embedding)):
        if a.shape[0] != B:
            raise FlowInputError(f"{name} has batch size {a.shape[0]}, token has {B}")
    if prompt_feat.shape[2] != cfg.output_size:
        raise FlowInputError(f"prompt_feat must be [B, T, {cfg.output_size}] (time-major mel), got {prompt_feat.shape}")
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
    max_tokens = cfg.noise_frames // r
    if n_tokens.max() > max_tokens:
        raise FlowInputError(f"{int(n_tokens.max())} tokens (prompt + new) = {int(n_tokens.max()) * r} mel frames "
                             f"exceed upstream's fixed noise buffer of {cfg.noise_frames} frames")
    N = bucket_for(int(n_tokens.max()), buckets)
    T = N * r
    tokens = np.zeros((B, N), np.int32)
    cond = np.zeros((B, T, cfg.output_size), np.float32)
    for b in range(B):
        p, n = int(prompt_token_len[b]), int(token_len[b])
        tokens[b, :p] = prompt_token[b, :p]
        tokens[b, p:p + n] = token[b, :n]
        cond[b, :p * r] = prompt_feat[b, :p * r]
    lookahead = np.full((B,), 0 if finalize else L, np.int32)
    if noise is None:
        noise_arr = _seed0_noise(T, cfg.output_size)
    else:
        noise = _as_np("noise", noise, 3, "f").astype(np.float32)
        if noise.shape[0] not in (1, B) or noise.shape[2] != cfg.output_size:
            raise FlowInputError(f"noise must be [1 or B, T, {cfg.output_size}] (time-major), got {noise.shape}")
        need = int((n_tokens - lookahead).max()) * r  # frames that reach the output
        if noise.shape[1] < need:
            raise FlowInputError(f"noise has {noise.shape[1]} frames, need {need}")
        noise_arr = np.zeros((noise.shape[0], T, cfg.output_size), np.float32)
        w = min(T, noise.shape[1])
        noise_arr[:, :w] = noise[:, :w]
    return dict(tokens=tokens, n_tokens=n_tokens.astype(np.int32), n_prompt=prompt_token_len.astype(np.int32),
                lookahead=lookahead, cond=cond, embedding=embedding.astype(np.float32), noise=noise_arr)


@functools.lru_cache(maxsize=8)
def _seed0_noise_device(T: int, n_mels: int):
    return jnp.asarray(_seed0_noise_np(T, n_mels))


def _seed0_noise_np(T: int, n_mels: int) -> np.ndarray:
    from cosyjax.flow.noise import cfm_noise

    return np.ascontiguousarray(cfm_noise(T, n_mels)[0].T[None])  # [1, T, 80]


def _seed0_noise(T: int, n_mels: int):
    """Upstream's seed-0 `rand_noise[:, :, :T]` as [1, T, n_mels] (a cached device array)."""
    return _seed0_noise_device(T, n_mels)


def flow_inference(params, cfg: FlowCV3Config, token, token_len, prompt_token, prompt_token_len, prompt_feat,
                   prompt_feat_len, embedding, *, streaming: bool, finalize: bool, noise=None, n_timesteps: int = 10,
                   dtype: str = "float32", attention_impl: str = "auto", buckets: Sequence[int] = DEFAULT_BUCKETS,
                   trim: bool = True):
    """Speech tokens -> mel, prompt frames removed.

    token [B, Tt] int, token_len [B]; prompt_token [B, Tp], prompt_token_len [B]; prompt_feat [B, Tm, 80]
    (time-major log-mel), prompt_feat_len [B] (= 2 x prompt_token_len); embedding [B, 192].
    streaming: 50-frame block-causal attention (upstream `streaming=True`); finalize=False drops the
    frames of the last 3 tokens (right context only). noise: None = upstream's seed-0 buffer, else
    [1|B, >= total frames, 80]. Returns (mel [B, T_new, 80] float32, mel_len [B] int32): frames
    >= mel_len are zero; `trim=True` cuts the padded array to max(mel_len) frames (outside jit).
    Pass `params` as device arrays (`jax.device_put`) to avoid re-uploading them on each call.
    """
    packed = pack_inputs(cfg, token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len,
                         embedding, finalize=finalize, noise=noise, buckets=buckets)
    out = flow_core(params, packed["tokens"], packed["n_tokens"], packed["n_prompt"], packed["lookahead"],
                    packed["cond"], packed["embedding"], packed["noise"], cfg=cfg, streaming=bool(streaming),
                    n_timesteps=int(n_timesteps), dtype=str(jnp.dtype(dtype)), attention_impl=attention_impl)
    mel, mel_len = out["mel"], out["mel_len"]
    if trim:
        n = int((packed["n_tokens"] - packed["lookahead"] - packed["n_prompt"]).max()) * cfg.token_mel_ratio
        mel = mel[:, :n]
    return mel, mel_len
