"""CosyVoice3 flow estimator: DiT (upstream `cosyvoice/flow/DiT/dit.py:DiT`, `DiT/modules.py`).

`DiT(cfg)(x, mask, mu, t, spks, cond, streaming=...) -> v [B, T, mel_dim]` (float32), with x, mu,
cond `[B, T, 80]`, mask `[B, T]` bool (True = valid frame) or None (no masking at all), t `[B]`
flow time in [0, 1], spks `[B, 80]`.

Layout (time-major, `D = dim`):
1. temb = Linear(D) . SiLU . Linear(D) (sinusoid_256(1000 t))                       [B, D]
2. e = Linear(D)([x, cond, mu, spks])  (this concat order; PITFALLS 7); e += convpos(e), where
   convpos = 2 x (left-pad k-1, grouped Conv1d(k=31, groups=16), Mish)              [B, T, D]
3. depth x DiTBlock (AdaLN-zero; shift/scale/gate x 2 from Linear(6D)(SiLU(temb))):
   x += gate_msa * Attn(LN(x)(1 + scale_msa) + shift_msa)
   x += gate_mlp * FF(LN(x)(1 + scale_mlp) + shift_mlp),  FF = Linear . tanh-GELU . Linear
   Attn: q/k/v Linear (bias), RoPE on the first `dim_head` channels of the flattened q/k only,
   i.e. head 0 (x-transformers partial rotary, interleaved pairs), softmax(qk^T / sqrt(dh)),
   Linear out; rows of padded frames are zeroed after the output projection.
4. final AdaLN with (scale, shift) order, LN eps 1e-6 without affine, Linear(D -> 80).
   The output is NOT multiplied by the mask (upstream does not).

Precision: `dtype` is the matmul/conv compute dtype (float32 or bfloat16); the residual stream,
LayerNorms, AdaLN modulation, time embedding, RoPE tables, softmax and the output projection
stay float32. Blocks are stacked with `nn.scan` (parameters carry a leading `depth` axis).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.flow.cv3.config import FlowCV3Config
from cosyjax.flow.masks import attention_mask, fix_empty_rows
from cosyjax.nn.attention import attention

__all__ = ["DiT", "DiTBlock", "rope_inv_freq", "rope_tables", "apply_rope_interleaved", "timestep_sinusoid",
           "layer_norm", "mish"]

LN_EPS = 1e-6


def layer_norm(x, eps: float = LN_EPS):
    """LayerNorm over the last axis without affine, in float32 (two-pass variance, like torch)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mean
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    return xc * jax.lax.rsqrt(var + eps)


def mish(x):
    """x * tanh(softplus(x)) in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    return (xf * jnp.tanh(jax.nn.softplus(xf))).astype(x.dtype)


def timestep_sinusoid(t, dim: int, scale: float = 1000.0):
    """t [B] -> [B, dim] float32: [sin, cos] of scale*t*exp(-i ln(1e4)/(dim/2 - 1)) (`SinusPositionEmbedding`)."""
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float32) * np.float32(-math.log(10000) / (half - 1))).astype(np.float32)
    arg = (jnp.float32(scale) * t.astype(jnp.float32))[:, None] * jnp.asarray(freqs)[None, :]
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


def rope_inv_freq(dim_head: int, base: float = 10000.0) -> np.ndarray:
    """x-transformers `RotaryEmbedding.inv_freq` = 1 / base^(arange(0, d, 2) / d) -> float32 [d/2]."""
    exps = (np.arange(0, dim_head, 2, dtype=np.float32) / np.float32(dim_head)).astype(np.float32)
    return (np.float32(1.0) / np.power(np.float32(base), exps, dtype=np.float32)).astype(np.float32)


def rope_tables(T: int, dim_head: int, base: float = 10000.0):
    """(cos, sin) float32 [T, dim_head] with interleaved duplicated angles [n w0, n w0, n w1, n w1, ...]."""
    inv = jnp.asarray(rope_inv_freq(dim_head, base))
    ang = jnp.arange(T, dtype=jnp.float32)[:, None] * inv[None, :]
    ang = jnp.repeat(ang, 2, axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope_interleaved(x, cos, sin):
    """x [B, T, d] rotated in GPT-J pairs (2m, 2m+1) in float32; cos/sin [T, d]; returns x's dtype."""
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(xf.shape[:-1] + (-1, 2))
    rot = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
    return (xf * cos + rot * sin).astype(x.dtype)


class DiTBlock(nn.Module):
    """One AdaLN-zero transformer block: (x [B,T,D] f32, ctx) -> (x, None) for `nn.scan`."""

    dim: int
    heads: int
    dim_head: int
    ff_mult: int
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, ctx):
        temb, cos, sin, attn_mask, row_keep = ctx
        B, T, _ = x.shape
        H, dh = self.heads, self.dim_head
        inner = H * dh
        mod = nn.Dense(6 * self.dim, name="attn_norm")(nn.silu(temb))  # f32, [B, 6D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod[:, None, :], 6, axis=-1)

        h = layer_norm(x) * (1 + scale_msa) + shift_msa
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)  # noqa: E731
        q = dense(inner, "to_q")(h)
        k = dense(inner, "to_k")(h)
        v = dense(inner, "to_v")(h)
        # x-transformers rotates only the first rot_dim = dim_head channels of the flattened
        # projection, i.e. head 0 (upstream `DiT/modules.py:AttnProcessor`; PITFALLS 5).
        q = jnp.concatenate([apply_rope_interleaved(q[..., :dh], cos, sin), q[..., dh:]], axis=-1)
        k = jnp.concatenate([apply_rope_interleaved(k[..., :dh], cos, sin), k[..., dh:]], axis=-1)
        a = attention(q.reshape(B, T, H, dh), k.reshape(B, T, H, dh), v.reshape(B, T, H, dh), attn_mask,
                      implementation=self.attention_impl)
        a = dense(self.dim, "to_out")(a.reshape(B, T, inner)).astype(jnp.float32)
        if row_keep is not None:
            a = jnp.where(row_keep[:, :, None], a, 0.0)  # upstream masked_fill(~mask[:, 0, -1], 0)
        x = x + gate_msa * a

        h = layer_norm(x) * (1 + scale_mlp) + shift_mlp
        f = dense(self.dim * self.ff_mult, "ff_in")(h)
        f = jax.nn.gelu(f.astype(jnp.float32), approximate=True).astype(self.dtype)
        f = dense(self.dim, "ff_out")(f).astype(jnp.float32)
        return x + gate_mlp * f, None


class DiT(nn.Module):
    """DiT velocity estimator; see the module docstring for shapes."""

    cfg: FlowCV3Config
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, mask, mu, t, spks, cond, streaming: bool = False):
        c = self.cfg
        B, T, _ = x.shape
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (B,))
        temb = timestep_sinusoid(t, c.time_freq_dim)
        temb = nn.Dense(c.dim, name="time_mlp_0")(temb)
        temb = nn.Dense(c.dim, name="time_mlp_2")(nn.silu(temb))

        feats = [x, cond, mu]
        if c.spk_dim > 0:
            feats.append(jnp.broadcast_to(spks[:, None, :], (B, T, spks.shape[-1])))
        feats = [f.astype(jnp.float32) for f in feats]
        e = nn.Dense(c.dim, dtype=self.dtype, name="input_proj")(jnp.concatenate(feats, axis=-1))
        e = e.astype(jnp.float32)
        k = c.conv_pos_kernel
        p = e
        for name in ("conv_pos_1", "conv_pos_2"):
            p = jnp.pad(p, ((0, 0), (k - 1, 0), (0, 0)))
            p = nn.Conv(c.dim, (k,), padding="VALID", feature_group_count=c.conv_pos_groups, dtype=self.dtype,
                        name=name)(p)
            p = mish(p.astype(jnp.float32))
        h = e + p

        cos, sin = rope_tables(T, c.dim_head, c.rope_base)
        if mask is None:
            attn_mask = None
            row_keep = None
            if streaming:
                attn_mask = attention_mask(jnp.ones((B, T), jnp.bool_), c.static_chunk_size)
        else:
            mask = jnp.asarray(mask, jnp.bool_)
            attn_mask = attention_mask(mask, c.static_chunk_size if streaming else 0)
            row_keep = fix_empty_rows(mask)  # = upstream's mask[:, 0, -1] (last query row)

        blocks = nn.scan(DiTBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=nn.broadcast, length=c.depth)
        h, _ = blocks(c.dim, c.heads, c.dim_head, c.ff_mult, self.dtype, self.attention_impl,
                      name="blocks")(h, (temb, cos, sin, attn_mask, row_keep))

        mod = nn.Dense(2 * c.dim, name="norm_out")(nn.silu(temb))
        scale, shift = jnp.split(mod[:, None, :], 2, axis=-1)  # (scale, shift) order (PITFALLS 6)
        h = layer_norm(h) * (1 + scale) + shift
        return nn.Dense(c.mel_dim, name="proj_out")(h).astype(jnp.float32)
