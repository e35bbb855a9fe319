"""Small layers every model shares (pure functions; flax modules wrap them where parameters are involved).

* `layer_norm(x, eps)`: LayerNorm over the last axis without affine, statistics in float32 (two-pass
  variance, like torch) — the DiT's norms; `LayerNormF32` adds the affine (Conformer / U-Net norms,
  flax `nn.LayerNorm`'s parameter names). Both reduce with `feature_mean`, whose bits do not depend
  on the number of rows (exact incremental streaming needs that).
* `mish(x)`: x * tanh(softplus(x)) in float32, returned in x's dtype (DiT conv-pos, U-Net blocks).
* `sinusoidal_embedding(t, dim, scale)`: [sin, cos] flow-time embedding (DiT 256-d, U-Net 320-d).
* `length_mask(lengths, T)`: [B, T] validity mask (True = valid), the one padding mask.
* `causal_pad(x, k, dilation)`: left zero padding of (k-1)*dilation frames along time ([B, T, C]).
* `RowStableConv`: a VALID (grouped) 1-D convolution with `nn.Conv`'s parameters whose output frames'
  bits do not depend on the sequence length (im2col + one plain dot per group), for the paths that
  exact incremental streaming compares (pre-lookahead, CV2 encoder upsample; CV3 DiT conv-pos and CV2 U-Net when
  streaming, through `valid_conv`, which is XLA's convolution elsewhere).
* `Linear`, `Embedding`, `RMSNorm`: the Qwen2 backbone's layers (explicit compute / output dtypes; RMSNorm
  statistics in float32); the flows use flax `nn.Dense` / `nn.Embed` with an explicit `dtype`.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["feature_mean", "layer_norm", "LayerNorm", "LayerNormF32", "mish", "sinusoidal_embedding", "length_mask", "causal_pad", "RowStableConv", "valid_conv",
           "Linear", "Embedding", "RMSNorm"]


def feature_mean(x):
    """x [..., C] -> [..., 1]: the mean over the last axis by pairwise halving (zero-padded to a power of 2).

    Slices and elementwise adds only, so a row's bits do not depend on how many rows there are: XLA's
    CPU row reductions change their accumulation order with the row count (55 vs 64 rows differ in the
    last bit), and exact incremental streaming computes the same frames among different numbers of
    rows (`cosyjax.flow.cv*.incremental`)."""
    C = x.shape[-1]
    width = 1 << max(C - 1, 0).bit_length()
    if width != C:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - C)])
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        x = x[..., :h] + x[..., h:]
    return x / jnp.asarray(C, x.dtype)


def layer_norm(x, eps: float = 1e-6):
    """x [..., C] -> float32 [..., C]: LayerNorm without affine, float32 two-pass statistics (row-stable)."""
    x = x.astype(jnp.float32)
    xc = x - feature_mean(x)
    return xc * jax.lax.rsqrt(feature_mean(xc * xc) + eps)


class LayerNorm(nn.Module):
    """LayerNorm with affine (flax `nn.LayerNorm`'s parameters `scale`, `bias`): float32 two-pass
    statistics (torch's) whatever the input dtype, row-stable (`feature_mean`); float32 out."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        C = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (C,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (C,), jnp.float32)
        x = x.astype(jnp.float32)
        xc = x - feature_mean(x)
        return xc * (jax.lax.rsqrt(feature_mean(xc * xc) + self.epsilon) * scale) + bias


def LayerNormF32(eps: float, name: str) -> LayerNorm:  # noqa: N802 - a module factory
    """`LayerNorm(eps)` named `name` (the Conformer / U-Net norms)."""
    return LayerNorm(eps, name=name)


def mish(x):
    """x -> x * tanh(softplus(x)) computed in float32, in x's dtype."""
    xf = x.astype(jnp.float32)
    return (xf * jnp.tanh(jax.nn.softplus(xf))).astype(x.dtype)


def sinusoidal_embedding(t, dim: int, scale: float = 1000.0):
    """t [B] -> float32 [B, dim] = [sin(scale t w), cos(scale t w)], w_i = exp(-i ln(1e4) / (dim/2 - 1)).

    (Matcha `SinusoidalPosEmb` / F5 `SinusPositionEmbedding`; the frequencies are float32 constants.)"""
    if dim % 2 or dim < 4:
        raise ValueError(f"sinusoidal embedding needs an even dim >= 4, got {dim}")
    half = dim // 2
    # float32 exponent, exp correctly rounded (torch's vectorised exp is ulp-accurate; numpy's float32 exp is not)
    expo = np.arange(half, dtype=np.float32) * np.float32(-math.log(10000) / (half - 1))
    freqs = np.exp(expo.astype(np.float64)).astype(np.float32)
    arg = (jnp.float32(scale) * jnp.asarray(t, jnp.float32).reshape(-1))[:, None] * jnp.asarray(freqs)[None, :]
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


def length_mask(lengths, T: int):
    """lengths [B] int -> bool [B, T], True for positions < length."""
    return jnp.arange(T)[None, :] < jnp.asarray(lengths).reshape(-1, 1)


def causal_pad(x, kernel_size: int, dilation: int = 1):
    """x [B, T, C] -> [B, T + (k-1)*d, C]: zeros on the left, so a VALID conv is causal."""
    return jnp.pad(x, ((0, 0), ((kernel_size - 1) * dilation, 0), (0, 0)))


class RowStableConv(nn.Module):
    """x [B, L, C] -> [B, L - k + 1, features]: `nn.Conv(features, (k,), padding='VALID',
    feature_group_count=groups, dtype=dtype)` with the same parameters (kernel [k, C/groups, features],
    bias), computed so that an output frame's bits depend only on its own k input frames.

    Why: XLA's CPU convolution changes its accumulation order with the length (on some CPUs frames of a
    200-frame call differ in the last bit from the same frames of a 1200-frame call), and exact
    incremental streaming computes the same frames among different numbers of frames. Here the k
    shifted copies of each group's input are stacked (im2col) and contracted by one plain 2-D dot per
    group, whose rows are independent of the row count (checked for >= 100 rows, as the DiT's CFG pair
    of >= 50-frame chunks always has; `tests/test_layers.py`). Costs k x the input in memory."""

    features: int
    kernel_size: int
    groups: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        B, L, C = x.shape
        k, G = self.kernel_size, self.groups
        if C % G or self.features % G:
            raise ValueError(f"RowStableConv: channels {C} and features {self.features} must divide by groups {G}")
        cin, og, T = C // G, self.features // G, L - k + 1
        if T < 1:
            raise ValueError(f"RowStableConv: {L} input frames are fewer than the kernel size {k}")
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, cin, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        dt = jnp.dtype(self.dtype)
        x = x.astype(dt)
        cols = jnp.stack([x[:, j:j + T] for j in range(k)], axis=2).reshape(B * T, k, G, cin)  # [BT, k, G, cin]
        w = kernel.astype(dt).reshape(k, cin, G, og)
        out = [jnp.dot(cols[:, :, g].reshape(B * T, k * cin), w[:, :, g].reshape(k * cin, og)) for g in range(G)]
        return (jnp.concatenate(out, axis=-1).reshape(B, T, self.features) + bias.astype(dt)).astype(dt)


_INIT = nn.initializers.normal(0.02)


class Linear(nn.Module):
    """x `[..., in]` -> `[..., out]`; kernel `[in, out]` (+ bias), inputs in `dtype`, result in
    `out_dtype` (default `dtype`; 'float32' accumulates and returns float32, e.g. for the logits)."""

    features: int
    use_bias: bool = True
    dtype: str = "float32"
    out_dtype: str | None = None

    @nn.compact
    def __call__(self, x):
        dt = jnp.dtype(self.dtype)
        ot = jnp.dtype(self.out_dtype or self.dtype)
        kernel = self.param("kernel", _INIT, (x.shape[-1], self.features), jnp.float32)
        y = jnp.dot(x.astype(dt), kernel.astype(dt), preferred_element_type=ot).astype(ot)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(ot)
        return y


class Embedding(nn.Module):
    """ids `[...]` -> `[..., dim]` rows of `embedding [num, dim]`, cast to `dtype`."""

    num: int
    dim: int
    dtype: str = "float32"

    @nn.compact
    def __call__(self, ids):
        table = self.param("embedding", _INIT, (self.num, self.dim), jnp.float32)
        return jnp.take(table, ids, axis=0).astype(jnp.dtype(self.dtype))


class RMSNorm(nn.Module):
    """HF Qwen2RMSNorm: statistics in float32, `scale * normed.astype(x.dtype)`."""

    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        xf = x.astype(jnp.float32)
        var = jnp.mean(xf * xf, axis=-1, keepdims=True)
        y = (xf * jax.lax.rsqrt(var + jnp.float32(self.eps))).astype(x.dtype)
        return scale.astype(x.dtype) * y


def valid_conv(features: int, kernel_size: int, groups: int = 1, dtype=jnp.float32, *, row_stable: bool,
               name: str) -> nn.Module:
    """The VALID 1-D convolution x [B, L, C] -> [B, L - k + 1, features] (one parameter layout): the
    row-stable form where exact incremental streaming compares frames computed among different numbers of
    frames (streaming chunks), XLA's convolution elsewhere (non-streaming passes: faster, and nearer
    upstream's non-streaming parity rows)."""
    if row_stable:
        return RowStableConv(features, kernel_size, groups, dtype, name=name)
    return nn.Conv(features, (kernel_size,), padding="VALID", feature_group_count=groups, dtype=dtype, name=name)
