"""`hift.pt` -> HiFT parameter tree (`cosyjax.hift.generator.HiFTGenerator`).

Weight norm (`<m>.parametrizations.weight.original0/1` or legacy `<m>.weight_g/_v`) is folded in
float64; Conv1d `[out, in, k]` -> `[k, in, out]`; CV2's ConvTranspose1d `ups.i` `[in, out, k]` ->
flipped forward kernel `[k, in, out]` (weight-norm gain on the *input* axis). Key prefix
`generator.` (a HiFiGan training export) is accepted. CV3's f0 predictor stays float64 (upstream runs
it in float64; see `cosyjax.hift.f0_predictor`); everything else is float32.
Torch `f0_predictor.condnet.{0,2,4,6,8}` (ELUs in between) map to `condnet_{0..4}`.
"""
from __future__ import annotations

import numpy as np

from convert.common import ConversionError, StateDict
from cosyjax.hift.config import HiFTConfig

__all__ = ["CHECKPOINT", "PREFIX_ALIASES", "config_from", "convert"]

CHECKPOINT = "hift.pt"
PREFIX_ALIASES = ("generator.",)


def config_from(model_cfg) -> HiFTConfig:
    return HiFTConfig.from_model_config(model_cfg)


def _resblock(sd: StateDict, prefix: str, ch: int, k: int, dilations) -> dict:
    p = {}
    for j in range(len(dilations)):
        p[f"convs1_{j}"] = sd.conv1d(f"{prefix}.convs1.{j}", ch, ch, k, weight_norm=True)
        p[f"convs2_{j}"] = sd.conv1d(f"{prefix}.convs2.{j}", ch, ch, k, weight_norm=True)
        p[f"activations1_{j}"] = {"alpha": sd.raw(f"{prefix}.activations1.{j}.alpha", (ch,))}
        p[f"activations2_{j}"] = {"alpha": sd.raw(f"{prefix}.activations2.{j}.alpha", (ch,))}
    return p


def _layout_hint(sd: StateDict, cfg: HiFTConfig) -> str:
    """Name the likely cause when the checkpoint is the other CosyVoice version's vocoder."""
    key = next((k for k in ("conv_pre.parametrizations.weight.original1", "conv_pre.weight_v")
                if sd.has(k)), None)
    if key is None:
        return ""
    kernel = tuple(sd.state[key].shape)[-1]
    looks_causal = kernel == cfg.conv_pre_look_right + 1 and kernel != 7
    if looks_causal == cfg.causal:
        return ""
    have, want = ("CosyVoice3 CausalHiFTGenerator", "CosyVoice2 HiFTGenerator") if looks_causal else (
        "CosyVoice2 HiFTGenerator", "CosyVoice3 CausalHiFTGenerator")
    return (f"\n  hint: this hift.pt looks like a {have} checkpoint (conv_pre kernel {kernel}), but the yaml "
            f"builds a {want}: the model folder mixes CosyVoice2 and CosyVoice3 files")


def convert(sd: StateDict, cfg: HiFTConfig) -> dict:
    """Consume every hift.pt key; raise `ConversionError` naming all problems at once."""
    c = cfg
    f0_dtype = np.float64 if c.causal else np.float32
    f0 = {}
    ch_in = c.in_channels
    for i in range(c.f0_num_layers):
        k = (4 if c.causal else 3) if i == 0 else 3
        f0[f"condnet_{i}"] = sd.conv1d(f"f0_predictor.condnet.{2 * i}", ch_in, c.f0_cond_channels, k,
                                       weight_norm=True, dtype=f0_dtype)
        ch_in = c.f0_cond_channels
    f0["classifier"] = sd.linear("f0_predictor.classifier", c.f0_cond_channels, 1, dtype=f0_dtype)

    p: dict = {"f0_predictor": f0,
               "m_source": {"l_linear": sd.linear("m_source.l_linear", c.num_harmonics, 1)}}
    p["conv_pre"] = sd.conv1d("conv_pre", c.in_channels, c.base_channels,
                              c.conv_pre_look_right + 1 if c.causal else 7, weight_norm=True)
    ch = c.base_channels
    for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)):
        out = c.stage_channels(i)
        if c.causal:
            p[f"ups_{i}"] = sd.conv1d(f"ups.{i}", ch, out, k, weight_norm=True)
        else:
            p[f"ups_{i}"] = sd.conv_transpose1d(f"ups.{i}", ch, out, k, weight_norm=True)
        ch = out
    for i, (u, k, d) in enumerate(zip(c.source_down_rates, c.source_resblock_kernel_sizes,
                                       c.source_resblock_dilation_sizes)):
        out = c.stage_channels(i)
        p[f"source_downs_{i}"] = sd.conv1d(f"source_downs.{i}", c.n_fft + 2, out, 1 if u == 1 else 2 * u)
        p[f"source_resblocks_{i}"] = _resblock(sd, f"source_resblocks.{i}", out, k, d)
    n = 0
    for i in range(c.num_upsamples):
        for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes):
            p[f"resblocks_{n}"] = _resblock(sd, f"resblocks.{n}", c.stage_channels(i), k, d)
            n += 1
    p["conv_post"] = sd.conv1d("conv_post", c.stage_channels(c.num_upsamples - 1), c.n_fft + 2, 7,
                               weight_norm=True)
    try:
        sd.finish(f"{c.version} hift model")
    except ConversionError as e:
        raise ConversionError(str(e) + _layout_hint(sd, c)) from None
    return p
