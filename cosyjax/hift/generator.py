"""HiFT generator (upstream `hifigan/generator.py:HiFTGenerator` / `CausalHiFTGenerator`) as a flax module.

Parameter tree (what `convert/hift.py` produces; names follow upstream's modules):
  f0_predictor/{condnet_0..4, classifier}   m_source/l_linear   conv_pre   ups_{i}
  source_downs_{i}   source_resblocks_{i}/{convs1_j, convs2_j, activations1_j, activations2_j}
  resblocks_{3i+j}/...   conv_post
Methods are the pipeline's stages: `predict_f0` (mel -> f0), `m_source` (phase, f0, noise -> source),
`decode` (mel, source STFT -> conv_post output, pre exp/sin). `__call__` chains everything (used by
`init`); `cosyjax.hift.vocoder` runs the stages with the precision each needs.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cosyjax.nn.layers import length_mask

from cosyjax.hift.config import HiFTConfig, causal_padding
from cosyjax.hift.conv import CausalConvUpsample, Conv1d, ConvTranspose1d, masked
from cosyjax.hift.f0_predictor import F0Predictor
from cosyjax.hift.resblock import ResBlock
from cosyjax.hift.source import SourceModuleHnNSF, sine_phase
from cosyjax.hift.stft import stft

__all__ = ["HiFTGenerator", "time_mask"]


def time_mask(lengths, n_frames: int, per_frame: int = 1, extra: int = 0):
    """[B, n_frames, 1] bool: frame < lengths*per_frame + extra; None when lengths is None."""
    if lengths is None:
        return None
    return length_mask(lengths.astype(jnp.int32) * per_frame + extra, n_frames)[..., None]


class HiFTGenerator(nn.Module):
    """HiFT vocoder. `precision`/`dtype` apply to the generator convs (f0 predictor: 'highest', `f0_dtype`).

    `phase_dtype`: the SineGen2 cumsum accumulation type of `__call__` (float64 only under x64); the
    vocoder's f0 stage computes the phase itself with float64.
    """

    cfg: HiFTConfig
    precision: Any = None
    dtype: Any = None
    f0_dtype: Any = jnp.float32
    phase_dtype: Any = jnp.float32

    def setup(self):
        c = self.cfg
        conv = dict(precision=self.precision, dtype=self.dtype)
        self.f0_predictor = F0Predictor(c, dtype=self.f0_dtype)
        self.m_source = SourceModuleHnNSF(c)
        if c.causal:  # CausalConv1d(k = look_right + 1, causal_type='right')
            self.conv_pre = Conv1d(c.base_channels, c.conv_pre_look_right + 1,
                                   padding=(0, c.conv_pre_look_right), **conv)
        else:
            self.conv_pre = Conv1d(c.base_channels, 7, padding=(3, 3), **conv)
        ups = []
        for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)):
            if c.causal:
                ups.append(CausalConvUpsample(c.stage_channels(i), k, u, **conv))
            else:
                ups.append(ConvTranspose1d(c.stage_channels(i), k, u, padding=(k - u) // 2, **conv))
        self.ups = ups
        downs, src_blocks = [], []
        for i, (u, k, d) in enumerate(zip(c.source_down_rates, c.source_resblock_kernel_sizes,
                                           c.source_resblock_dilation_sizes)):
            ch = c.stage_channels(i)
            if u == 1:
                downs.append(Conv1d(ch, 1, **conv))
            elif c.causal:  # CausalConv1dDownSample: left pad stride-1
                downs.append(Conv1d(ch, 2 * u, stride=u, padding=(u - 1, 0), **conv))
            else:
                downs.append(Conv1d(ch, 2 * u, stride=u, padding=(u // 2, u // 2), **conv))
            src_blocks.append(ResBlock(ch, k, tuple(d), c.causal, **conv))
        self.source_downs = downs
        self.source_resblocks = src_blocks
        self.resblocks = [ResBlock(c.stage_channels(i), k, tuple(d), c.causal, **conv)
                          for i in range(c.num_upsamples)
                          for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes)]
        post_pad = (causal_padding(7, 1), 0) if c.causal else (3, 3)
        self.conv_post = Conv1d(c.n_fft + 2, 7, padding=post_pad, **conv)

    def predict_f0(self, mel, lengths=None):
        """mel [B, T, 80] -> f0 [B, T] (in `f0_dtype`). Frames past `lengths` must already be zero."""
        return self.f0_predictor(mel, time_mask(lengths, mel.shape[1]))

    def source(self, phase, f0, noise):
        """(phase [B, T*480, 9] from `sine_phase`, f0 [B, T], noise [B|1, T*480, 9]) -> source [B, T*480]."""
        return self.m_source(phase, f0, noise)

    def decode(self, mel, s_stft, lengths=None):
        """(mel [B, T, 80], source STFT [B, 120T+1, 18]) -> conv_post output [B, 120T+1, 18] (pre exp/sin).

        Non-causal (CV2) with `lengths`: every conv input is zeroed past the example's end, which
        reproduces upstream's zero padding at the true end of a right-padded (bucketed) input.
        The causal model looks only backwards after `conv_pre` (whose look-ahead reads the zeroed mel).
        """
        c = self.cfg
        need_mask = (not c.causal) and lengths is not None

        def mask(n, per_frame, extra=0):
            return time_mask(lengths, n, per_frame, extra) if need_mask else None

        n_frames = s_stft.shape[1]
        m_src = mask(n_frames, c.upsample_total, 1)
        x = self.conv_pre(masked(mel, mask(mel.shape[1], 1)))
        per_frame = 1
        for i in range(c.num_upsamples):
            x = nn.leaky_relu(x, c.lrelu_slope)
            x = self.ups[i](masked(x, mask(x.shape[1], per_frame)))
            per_frame *= c.upsample_rates[i]
            extra = 0
            if i == c.num_upsamples - 1:  # ReflectionPad1d((1, 0)): prepend x[1]
                x = jnp.concatenate([x[:, 1:2], x], axis=1)
                extra = 1
            m = mask(x.shape[1], per_frame, extra)
            si = self.source_downs[i](masked(s_stft, m_src))
            si = self.source_resblocks[i](si, m)
            if si.shape != x.shape:
                raise ValueError(f"stage {i}: source branch {si.shape} != generator {x.shape}")
            x = x + si
            xs = None
            for j in range(c.num_kernels):
                y = self.resblocks[i * c.num_kernels + j](x, m)
                xs = y if xs is None else xs + y
            x = xs / c.num_kernels
        x = nn.leaky_relu(x, 0.01)  # F.leaky_relu default slope
        return self.conv_post(masked(x, m_src))

    def __call__(self, mel, noise, lengths=None):
        """Whole pipeline in one trace: mel [B, T, 80], noise [B|1, T*480, 9] -> conv_post output."""
        c = self.cfg
        f0 = self.predict_f0(mel, lengths).astype(jnp.float32)
        s = self.source(sine_phase(f0, c, lengths, acc_dtype=self.phase_dtype), f0, noise)
        s_stft = stft(s, c.n_fft, c.hop_len, None if lengths is None else lengths * c.upsample_scale)
        return self.decode(mel, s_stft, lengths)
