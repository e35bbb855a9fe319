"""Snake activation and the HiFi-GAN/BigVGAN residual block (upstream `hifigan/generator.py:ResBlock`)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cosyjax.hift.config import causal_padding
from cosyjax.hift.conv import Conv1d, masked

__all__ = ["ResBlock", "Snake"]


class Snake(nn.Module):
    """x + 1/(alpha + 1e-9) * sin(alpha*x)^2, alpha per channel (linear scale). [B, T, C] -> [B, T, C]."""

    @nn.compact
    def __call__(self, x):
        alpha = self.param("alpha", nn.initializers.ones, (x.shape[-1],), jnp.float32).astype(x.dtype)
        # operation order of cosyvoice/transformer/activation.py:Snake.forward
        return x + (1.0 / (alpha + 1e-9)) * jnp.square(jnp.sin(x * alpha))


class ResBlock(nn.Module):
    """For each dilation d: x += conv2(snake2(conv1_d(snake1(x)))). [B, T, C] -> [B, T, C].

    Non-causal (CV2): symmetric padding (k*d - d)//2. Causal (CV3): left padding (k-1)*d.
    `mask` ([B, T, 1] bool, optional) zeroes padded frames before every conv so that a bucketed
    (right-padded) input reproduces the unpadded result exactly.
    """

    channels: int
    kernel_size: int
    dilations: tuple[int, ...]
    causal: bool
    precision: Any = None
    dtype: Any = None

    def setup(self):
        def conv(d):
            if self.causal:
                pad = (causal_padding(self.kernel_size, d), 0)
            else:
                p = (self.kernel_size * d - d) // 2
                pad = (p, p)
            return Conv1d(self.channels, self.kernel_size, dilation=d, padding=pad,
                          precision=self.precision, dtype=self.dtype)

        self.convs1 = [conv(d) for d in self.dilations]
        self.convs2 = [conv(1) for _ in self.dilations]
        self.activations1 = [Snake() for _ in self.dilations]
        self.activations2 = [Snake() for _ in self.dilations]

    def __call__(self, x, mask=None):
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            xt = c1(masked(a1(x), mask))
            xt = c2(masked(a2(xt), mask))
            x = xt + x
        return x
