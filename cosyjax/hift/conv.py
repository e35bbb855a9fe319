"""1-D convolutions in NWC layout with explicit padding (HiFT's only layer type).

Kernels are `[k, in, out]` (weight norm already folded by `convert/hift.py`). Every padding is an
explicit (left, right) pair of zeros, as upstream writes them; nothing relies on 'SAME'.
`dtype` is the convolution's input/kernel dtype; accumulation and the output stay float32.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

__all__ = ["Conv1d", "ConvTranspose1d", "CausalConvUpsample", "masked"]

_DN = ("NWC", "WIO", "NWC")


def masked(x, mask):
    """Zero the frames where `mask` ([B, T, 1] bool) is False; identity when mask is None."""
    return x if mask is None else jnp.where(mask, x, jnp.zeros((), x.dtype))


def _conv(x, kernel, *, stride=1, padding=(0, 0), lhs_dilation=1, rhs_dilation=1, precision=None, dtype=None):
    out_dtype = jnp.promote_types(x.dtype, jnp.float32)
    if dtype is not None:
        x = x.astype(dtype)
        kernel = kernel.astype(dtype)
    return lax.conv_general_dilated(
        x, kernel, window_strides=(stride,), padding=[tuple(padding)], lhs_dilation=(lhs_dilation,),
        rhs_dilation=(rhs_dilation,), dimension_numbers=_DN, precision=precision,
        preferred_element_type=out_dtype)


def _conv_as_matmul(x, kernel, *, stride=1, padding=(0, 0), dilation=1, precision=None):
    """The same convolution as one matmul over k shifted views (im2col). XLA's CPU float64 conv is a
    slow reference loop, its float64 dot is not; on GPU this is one DGEMM."""
    k = kernel.shape[0]
    xp = jnp.pad(x, ((0, 0), tuple(padding), (0, 0)))
    n_out = (xp.shape[1] - dilation * (k - 1) - 1) // stride + 1
    cols = jnp.stack([xp[:, i * dilation: i * dilation + (n_out - 1) * stride + 1: stride] for i in range(k)], axis=2)
    return jnp.einsum("btkc,kco->bto", cols, kernel.astype(cols.dtype), precision=precision)


class Conv1d(nn.Module):
    """torch `Conv1d` / upstream `CausalConv1d`: x [B, T, Cin] -> [B, T', features].

    T' = (T + left + right - dilation*(k-1) - 1) // stride + 1. `as_matmul`: compute it as an im2col
    matmul (used for the float64 f0 predictor).
    """

    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    as_matmul: bool = False

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (self.kernel_size, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        if self.as_matmul:
            dt = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
            y = _conv_as_matmul(x.astype(dt), kernel.astype(dt), stride=self.stride, padding=self.padding,
                                dilation=self.dilation, precision=self.precision)
        else:
            y = _conv(x, kernel, stride=self.stride, padding=self.padding, rhs_dilation=self.dilation,
                      precision=self.precision, dtype=self.dtype)
        return y + bias.astype(y.dtype)


class ConvTranspose1d(nn.Module):
    """torch `ConvTranspose1d(k, stride, padding p)`: x [B, T, Cin] -> [B, (T-1)*stride - 2p + k, features].

    The kernel is the *forward* kernel `[k, in, out]` (torch's `[in, out, k]` flipped along k, see
    `convert.common.StateDict.conv_transpose1d`), applied to the stride-dilated input padded by k-1-p.
    """

    features: int
    kernel_size: int
    stride: int
    padding: int = 0
    precision: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, p = self.kernel_size, self.padding
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        y = _conv(x, kernel, padding=(k - 1 - p, k - 1 - p), lhs_dilation=self.stride,
                  precision=self.precision, dtype=self.dtype)
        return y + bias.astype(y.dtype)


class CausalConvUpsample(nn.Module):
    """Upstream `CausalConv1dUpsample`: nearest x`stride`, left pad k-1, conv. [B, T, C] -> [B, T*stride, features]."""

    features: int
    kernel_size: int
    stride: int
    precision: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(x, self.stride, axis=1)
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (self.kernel_size, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        y = _conv(x, kernel, padding=(self.kernel_size - 1, 0), precision=self.precision, dtype=self.dtype)
        return y + bias.astype(y.dtype)
