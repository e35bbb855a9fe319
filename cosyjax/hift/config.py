"""`HiFTConfig`: the HiFT vocoder's hyper-parameters, read from the model yaml's `hift:` section.

CosyVoice2 builds `HiFTGenerator` (non-causal: ConvTranspose up-sampling, symmetric padding, SineGen2
with linear phase up-sampling and fresh Gaussian noise); CosyVoice3 builds `CausalHiFTGenerator`
(left-padded convs, nearest+conv up-sampling, look-ahead `conv_pre`, staircase SineGen2 phase and a
fixed uniform noise buffer). Missing yaml keys take upstream's constructor defaults.
"""
from __future__ import annotations
from cosyjax.errors import CosyJaxError

import dataclasses
import math
from typing import Any

__all__ = ["HiFTConfig", "HiFTConfigError"]

# Upstream constructor defaults (cosyvoice/hifigan/generator.py: HiFTGenerator.__init__).
_DEFAULTS = dict(
    in_channels=80, base_channels=512, nb_harmonics=8, sampling_rate=22050, nsf_alpha=0.1, nsf_sigma=0.003,
    nsf_voiced_threshold=10, upsample_rates=[8, 8], upsample_kernel_sizes=[16, 16],
    istft_params={"n_fft": 16, "hop_len": 4}, resblock_kernel_sizes=[3, 7, 11],
    resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]], source_resblock_kernel_sizes=[7, 11],
    source_resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]], lrelu_slope=0.1, audio_limit=0.99,
    conv_pre_look_right=4,
)
_F0_CLASSES = {"HiFTGenerator": "ConvRNNF0Predictor", "CausalHiFTGenerator": "CausalConvRNNF0Predictor"}


class HiFTConfigError(CosyJaxError):
    """A `hift:` yaml section this port cannot build (names the offending value)."""


def _tuple(x) -> tuple:
    return tuple(_tuple(v) if isinstance(v, (list, tuple)) else v for v in x)


@dataclasses.dataclass(frozen=True)
class HiFTConfig:
    """Static HiFT sizes. Hashable, so it can be a static argument of `jax.jit`."""

    causal: bool  # False: CosyVoice2 HiFTGenerator, True: CosyVoice3 CausalHiFTGenerator
    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    n_fft: int = 16
    hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    conv_pre_look_right: int = 4  # CV3 only (CV2's conv_pre is k=7, pad 3)
    f0_cond_channels: int = 512
    f0_num_layers: int = 5  # upstream hard-codes 5 conv+ELU layers

    # ---- derived sizes ------------------------------------------------------------------------
    @property
    def version(self) -> str:
        return "cosyvoice3" if self.causal else "cosyvoice2"

    @property
    def num_harmonics(self) -> int:
        """Sine components: fundamental + `nb_harmonics` overtones (9)."""
        return self.nb_harmonics + 1

    @property
    def n_bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def upsample_total(self) -> int:
        """Generator frames per mel frame (8*5*3 = 120)."""
        return math.prod(self.upsample_rates)

    @property
    def upsample_scale(self) -> int:
        """Samples per mel frame (120 * hop 4 = 480)."""
        return self.upsample_total * self.hop_len

    @property
    def num_upsamples(self) -> int:
        return len(self.upsample_rates)

    @property
    def num_kernels(self) -> int:
        return len(self.resblock_kernel_sizes)

    def stage_channels(self, i: int) -> int:
        """Channels after up-sampling stage i."""
        return self.base_channels // (2 ** (i + 1))

    @property
    def source_down_rates(self) -> tuple[int, ...]:
        """Stride of `source_downs[i]` (STFT frames -> stage-i frames): (15, 3, 1) for rates (8, 5, 3)."""
        rates = [1] + list(self.upsample_rates[::-1][:-1])
        cum = [math.prod(rates[: j + 1]) for j in range(len(rates))]
        return tuple(cum[::-1])

    @property
    def f0_lookahead(self) -> int:
        """Right look-ahead frames of the f0 predictor's first conv (CV3: k=4 'right' causal conv -> 3)."""
        return causal_padding(4, 1) if self.causal else 0

    @property
    def finalize_false_trim(self) -> int:
        """Mel frames a CV3 `finalize=False` call does not output: f0 look-ahead + conv_pre look-ahead + 1."""
        return self.f0_lookahead + self.conv_pre_look_right + 1

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_model_config(cls, model_cfg) -> "HiFTConfig":
        """Build from `ModelConfig` (its parsed yaml's `hift:` section)."""
        section = model_cfg.yaml.get("hift") if hasattr(model_cfg, "yaml") else None
        if section is None:
            raise HiFTConfigError(f"{getattr(model_cfg, 'model_dir', model_cfg)}: yaml has no 'hift:' section")
        return cls.from_yaml_section(section)

    @classmethod
    def from_yaml_section(cls, section) -> "HiFTConfig":
        name = section.class_name
        if name not in _F0_CLASSES:
            raise HiFTConfigError(f"hift: class {name!r} is not supported (expected HiFTGenerator or "
                                  "CausalHiFTGenerator)")
        kw: dict[str, Any] = dict(_DEFAULTS)
        kw.update({k: v for k, v in section.kwargs.items() if k != "f0_predictor"})
        f0 = section.get("f0_predictor")
        if f0 is None or getattr(f0, "class_name", None) != _F0_CLASSES[name]:
            raise HiFTConfigError(f"hift: {name} needs f0_predictor {_F0_CLASSES[name]}, got "
                                  f"{getattr(f0, 'class_name', f0)!r}")
        f0_kw = {"num_class": 1, "in_channels": 80, "cond_channels": 512, **f0.kwargs}
        if int(f0_kw["num_class"]) != 1:
            raise HiFTConfigError(f"hift.f0_predictor.num_class must be 1, got {f0_kw['num_class']}")
        if int(f0_kw["in_channels"]) != int(kw["in_channels"]):
            raise HiFTConfigError(f"hift.f0_predictor.in_channels {f0_kw['in_channels']} != hift.in_channels "
                                  f"{kw['in_channels']}")
        if int(kw["sampling_rate"]) == 22050:
            raise HiFTConfigError("hift.sampling_rate 22050 selects upstream's SineGen (CosyVoice-300M); only "
                                  "SineGen2 (CosyVoice2/3, 24 kHz) is implemented")
        istft = kw.pop("istft_params")
        cfg = cls(
            causal=name == "CausalHiFTGenerator",
            in_channels=int(kw["in_channels"]), base_channels=int(kw["base_channels"]),
            nb_harmonics=int(kw["nb_harmonics"]), sampling_rate=int(kw["sampling_rate"]),
            nsf_alpha=float(kw["nsf_alpha"]), nsf_sigma=float(kw["nsf_sigma"]),
            nsf_voiced_threshold=float(kw["nsf_voiced_threshold"]),
            upsample_rates=_tuple(kw["upsample_rates"]), upsample_kernel_sizes=_tuple(kw["upsample_kernel_sizes"]),
            n_fft=int(istft["n_fft"]), hop_len=int(istft["hop_len"]),
            resblock_kernel_sizes=_tuple(kw["resblock_kernel_sizes"]),
            resblock_dilation_sizes=_tuple(kw["resblock_dilation_sizes"]),
            source_resblock_kernel_sizes=_tuple(kw["source_resblock_kernel_sizes"]),
            source_resblock_dilation_sizes=_tuple(kw["source_resblock_dilation_sizes"]),
            lrelu_slope=float(kw["lrelu_slope"]), audio_limit=float(kw["audio_limit"]),
            conv_pre_look_right=int(kw["conv_pre_look_right"]),
            f0_cond_channels=int(f0_kw["cond_channels"]),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Reject sizes that upstream cannot run either (it would fail on a shape mismatch)."""
        n = self.num_upsamples
        if len(self.upsample_kernel_sizes) != n:
            raise HiFTConfigError(f"hift: {n} upsample_rates but {len(self.upsample_kernel_sizes)} kernel sizes")
        if len(self.source_resblock_kernel_sizes) != n or len(self.source_resblock_dilation_sizes) != n:
            raise HiFTConfigError(
                f"hift: source_resblock_kernel_sizes/dilation_sizes need one entry per up-sampling stage ({n}), got "
                f"{len(self.source_resblock_kernel_sizes)}/{len(self.source_resblock_dilation_sizes)}")
        if len(self.resblock_dilation_sizes) != len(self.resblock_kernel_sizes):
            raise HiFTConfigError("hift: resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        if self.base_channels % (2 ** n):
            raise HiFTConfigError(f"hift.base_channels {self.base_channels} is not divisible by 2**{n}")
        if self.n_fft % 2 or self.n_fft < 2 * self.hop_len:
            raise HiFTConfigError(f"hift.istft_params n_fft={self.n_fft} hop_len={self.hop_len} unsupported")
        if self.n_fft % self.hop_len:
            raise HiFTConfigError("hift.istft_params: n_fft must be a multiple of hop_len (overlap-add by reshape)")
        if not self.causal:
            for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes):
                if (k - u) % 2:
                    raise HiFTConfigError(f"hift: ConvTranspose1d(k={k}, stride={u}) with padding (k-u)//2 does not "
                                          "up-sample by exactly the stride")
        for t in (1, 2, 3):
            frames = t * self.upsample_total + 1
            for i, u in enumerate(self.source_down_rates):
                want = t * math.prod(self.upsample_rates[: i + 1]) + (1 if i == n - 1 else 0)
                if u == 1:
                    got = frames
                elif self.causal:
                    got = (frames + (u - 1) - 2 * u) // u + 1
                else:
                    got = (frames + 2 * (u // 2) - 2 * u) // u + 1
                if got != want:
                    raise HiFTConfigError(f"hift: source_downs[{i}] (stride {u}) gives {got} frames for {t} mel "
                                          f"frames, the generator has {want}; upstream cannot run these sizes")

def causal_padding(kernel_size: int, dilation: int) -> int:
    """Upstream `CausalConv1d.causal_padding` (transformer/convolution.py); (k-1)*d for odd k."""
    return int((kernel_size * dilation - dilation) / 2) * 2 + (kernel_size + 1) % 2
