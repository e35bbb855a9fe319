"""F0 predictors (upstream `hifigan/f0_predictor.py`): mel [B, T, 80] -> f0 [B, T] in Hz (>= 0).

CV2 `ConvRNNF0Predictor`: 5 x (Conv1d k=3 pad 1, ELU), Linear(C->1), abs.
CV3 `CausalConvRNNF0Predictor`: first conv k=4 with 3 frames of *right* (look-ahead) padding, then
4 x k=3 left-padded by 2; ELU after each; Linear; abs. Upstream runs the CV3 predictor in float64
("precision is crucial for causal inference"): build it with `dtype=jnp.float64` and call it inside
`x64_enabled()` (a local context; the library never enables x64 globally).
Convolutions are pinned to `precision='highest'` (TF32 would change f0 by ~1e-3, PITFALLS 3).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cosyjax.hift.config import HiFTConfig, causal_padding
from cosyjax.hift.conv import Conv1d, masked

__all__ = ["F0Predictor", "x64_enabled", "x64_active"]


def x64_enabled():
    """Context manager that enables 64-bit types locally (`jax.enable_x64`, or the experimental one)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older jax

    return enable_x64()


def x64_active() -> bool:
    return jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.dtype(jnp.float64)


class F0Predictor(nn.Module):
    """mel [B, T, C_mel] -> f0 [B, T] (dtype of the computation; the caller casts).

    `mask` ([B, T, 1] bool): frames past each example's length are zeroed before every conv that
    can see them (the causal model only needs the input mask: its later convs look backwards).
    """

    cfg: HiFTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, mel, mask=None):
        c = self.cfg
        x = mel.astype(self.dtype)
        for i in range(c.f0_num_layers):
            if c.causal:
                k = 4 if i == 0 else 3
                pad = (0, causal_padding(k, 1)) if i == 0 else (causal_padding(k, 1), 0)
            else:
                k, pad = 3, (1, 1)
            if i == 0 or not c.causal:
                x = masked(x, mask)
            x = Conv1d(c.f0_cond_channels, k, padding=pad, precision="highest", dtype=self.dtype,
                       param_dtype=self.dtype, as_matmul=self.dtype == jnp.float64, name=f"condnet_{i}")(x)
            x = nn.elu(x)
        x = nn.Dense(1, precision="highest", dtype=self.dtype, param_dtype=self.dtype, name="classifier")(x)
        return jnp.abs(x[..., 0])
