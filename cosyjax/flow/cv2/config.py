"""CosyVoice2 flow sizes (`CausalMaskedDiffWithXvec`), read from the model yaml.

Nothing here is a constant of the released model: every width comes from the yaml. Upstream's
`UpsampleConformerEncoder` hard-codes `PreLookaheadLayer(512, 512)` and `Upsample1D(512, 512)`;
those widths only work when they equal the encoder's `output_size`, so we take them from
`output_size`, unless the yaml replaces the layers with an `!apply:setattr [<encoder>,
pre_lookahead_layer | up_layer, !new:...]` entry (as the tiny golden yaml does), whose widths win.
"""
from __future__ import annotations
from cosyjax.errors import CosyJaxError

import dataclasses
from typing import Any

from cosyjax.io.hyperyaml import YamlCall

__all__ = ["EncoderCV2Config", "UNetConfig", "FlowCV2Config", "FlowConfigError"]


class FlowConfigError(CosyJaxError):
    """A flow section of the yaml that this port does not support or cannot read."""


@dataclasses.dataclass(frozen=True)
class EncoderCV2Config:
    """`UpsampleConformerEncoder` (linear embed, Espnet rel-pos MHA, pre-lookahead, x2 upsample)."""

    input_size: int  # width of the token embedding fed to `embed` (and of `up_embed`'s input)
    output_size: int  # d_model
    attention_heads: int
    linear_units: int  # FFN hidden width
    num_blocks: int  # conformer layers before the upsample
    num_up_blocks: int = 4  # hard-coded upstream
    pre_lookahead_len: int = 3
    pre_lookahead_channels: int = 512  # hidden width of the look-ahead conv (from output_size / yaml)
    upsample_channels: int = 512  # Upsample1D output width (from output_size / yaml)
    upsample_stride: int = 2
    static_chunk_size: int = 25  # tokens per streaming chunk (first stack); x stride after upsample
    embed_ln_eps: float = 1e-5
    layer_ln_eps: float = 1e-12
    after_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.output_size // self.attention_heads


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """`CausalConditionalDecoder` (Matcha U-Net with causal convs, single resolution level)."""

    in_channels: int  # 320 = x, mu, spks, cond stacked
    out_channels: int  # 80
    channels: tuple[int, ...]  # (256,) full size
    attention_head_dim: int
    n_blocks: int  # transformer blocks per level
    num_mid_blocks: int
    num_heads: int
    static_chunk_size: int = 50  # mel frames per streaming chunk
    time_scale: float = 1000.0
    ln_eps: float = 1e-5

    @property
    def time_embed_dim(self) -> int:
        return self.channels[0] * 4

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.attention_head_dim


@dataclasses.dataclass(frozen=True)
class FlowCV2Config:
    """Whole CosyVoice2 flow: token embedding, speaker projection, encoder, encoder_proj, U-Net, CFM."""

    vocab_size: int
    input_size: int  # token embedding width
    output_size: int  # mel bins (80)
    spk_embed_dim: int  # x-vector width (192)
    token_mel_ratio: int
    pre_lookahead_len: int
    encoder: EncoderCV2Config
    unet: UNetConfig
    inference_cfg_rate: float = 0.7
    t_scheduler: str = "cosine"
    n_timesteps: int = 10  # hard-coded in upstream `CausalMaskedDiffWithXvec.inference`
    noise_frames: int = 15000  # `rand_noise` buffer length (300 s of mel)
    version: str = "cosyvoice2"

    @classmethod
    def from_model_config(cls, cfg) -> "FlowCV2Config":
        """Build from a `cosyjax.config.ModelConfig` of a CosyVoice2 folder."""
        if cfg.version != "cosyvoice2":
            raise FlowConfigError(f"FlowCV2Config needs a cosyvoice2 model folder, got {cfg.version}")
        return cls.from_yaml(cfg.yaml, token_mel_ratio_default=cfg.token_mel_ratio)

    @classmethod
    def from_yaml(cls, y: dict, token_mel_ratio_default: int = 2) -> "FlowCV2Config":
        flow = y.get("flow")
        if not isinstance(flow, YamlCall) or flow.class_name != "CausalMaskedDiffWithXvec":
            raise FlowConfigError("yaml 'flow' is not a CausalMaskedDiffWithXvec")
        enc = _need_call(flow, "encoder", "UpsampleConformerEncoder")
        dec = _need_call(flow, "decoder", "CausalConditionalCFM")
        est = _need_call(dec, "estimator", "CausalConditionalDecoder")
        _check_encoder_options(enc)

        out = int(enc.get("output_size", 256))
        pre_ch, up_ch, up_stride = out, out, 2
        for layer, call in _encoder_layer_overrides(y, enc).items():
            if layer == "pre_lookahead_layer":
                if int(call.get("in_channels", out)) != out:
                    raise FlowConfigError(f"pre_lookahead_layer in_channels {call.get('in_channels')} "
                                          f"!= encoder output_size {out}")
                pre_ch = int(call.get("channels", out))
                if int(call.get("pre_lookahead_len", 1)) != int(flow.get("pre_lookahead_len", 3)):
                    raise FlowConfigError(f"encoder pre_lookahead_len {call.get('pre_lookahead_len', 1)} != flow "
                                          f"pre_lookahead_len {flow.get('pre_lookahead_len', 3)}")
            else:
                up_ch = int(call.get("out_channels", out))
                up_stride = int(call.get("stride", 2))
                if int(call.get("channels", out)) != out:
                    raise FlowConfigError(f"up_layer channels {call.get('channels')} != encoder output_size {out}")
        if up_ch != out:
            raise FlowConfigError(f"Upsample1D out_channels {up_ch} != encoder output_size {out}: upstream "
                                  "cannot run such a model either")
        encoder = EncoderCV2Config(
            input_size=int(enc.get("input_size")),
            output_size=out,
            attention_heads=int(enc.get("attention_heads", 4)),
            linear_units=int(enc.get("linear_units", 2048)),
            num_blocks=int(enc.get("num_blocks", 6)),
            pre_lookahead_len=int(flow.get("pre_lookahead_len", 3)),
            pre_lookahead_channels=pre_ch,
            upsample_channels=up_ch,
            upsample_stride=up_stride,
            static_chunk_size=int(enc.get("static_chunk_size", 0)),
        )
        if encoder.output_size % encoder.attention_heads:
            raise FlowConfigError(f"encoder output_size {out} not divisible by {encoder.attention_heads} heads")
        if encoder.input_size != encoder.output_size:
            raise FlowConfigError(f"encoder input_size {encoder.input_size} != output_size {out}: upstream's "
                                  "up_embed is fed output_size-wide features, so such a model cannot run")
        if int(flow.get("input_size")) != encoder.input_size:
            raise FlowConfigError(f"flow input_size {flow.get('input_size')} != encoder input_size "
                                  f"{encoder.input_size}")
        if encoder.num_blocks < 1:
            raise FlowConfigError(f"encoder num_blocks {encoder.num_blocks}: need at least one conformer layer")
        channels = tuple(int(c) for c in est.get("channels", (256, 256)))
        if len(channels) != 1:
            raise FlowConfigError(f"CausalConditionalDecoder channels {channels}: only a single level "
                                  "(no down/up-sampling, as in every CosyVoice2 release) is supported")
        act = est.get("act_fn", "snake")
        if act != "gelu":
            raise FlowConfigError(f"CausalConditionalDecoder act_fn {act!r}: only 'gelu' is supported")
        unet = UNetConfig(
            in_channels=int(est.get("in_channels")),
            out_channels=int(est.get("out_channels")),
            channels=channels,
            attention_head_dim=int(est.get("attention_head_dim", 64)),
            n_blocks=int(est.get("n_blocks", 1)),
            num_mid_blocks=int(est.get("num_mid_blocks", 2)),
            num_heads=int(est.get("num_heads", 4)),
            static_chunk_size=int(est.get("static_chunk_size", 50)),
        )
        if unet.n_blocks < 1 or unet.num_mid_blocks < 0:
            raise FlowConfigError(f"estimator n_blocks {unet.n_blocks} / num_mid_blocks {unet.num_mid_blocks}: need "
                                  "n_blocks >= 1 and num_mid_blocks >= 0")
        cfm = dec.get("cfm_params")
        cfm = dict(cfm.get("content", {})) if isinstance(cfm, YamlCall) else dict(cfm or {})
        output_size = int(flow.get("output_size", 80))
        spk_emb = int(dec.get("spk_emb_dim", output_size))
        if unet.in_channels != 3 * output_size + spk_emb:
            raise FlowConfigError(f"estimator in_channels {unet.in_channels} != x+mu+cond ({3 * output_size}) "
                                  f"+ spks ({spk_emb})")
        if unet.out_channels != output_size:
            raise FlowConfigError(f"estimator out_channels {unet.out_channels} != flow output_size {output_size}")
        scheduler = cfm.get("t_scheduler", "cosine")
        if scheduler != "cosine" or cfm.get("solver", "euler") != "euler":
            raise FlowConfigError(f"CFM solver {cfm.get('solver')!r} / t_scheduler {scheduler!r}: only "
                                  "euler + cosine is supported")
        token_mel_ratio = int(flow.get("token_mel_ratio", token_mel_ratio_default))
        if token_mel_ratio != encoder.upsample_stride:
            raise FlowConfigError(f"token_mel_ratio {token_mel_ratio} != encoder upsample stride "
                                  f"{encoder.upsample_stride}")
        return cls(
            vocab_size=int(flow.get("vocab_size")),
            input_size=int(flow.get("input_size")),
            output_size=output_size,
            spk_embed_dim=int(flow.get("spk_embed_dim", 192)),
            token_mel_ratio=token_mel_ratio,
            pre_lookahead_len=encoder.pre_lookahead_len,
            encoder=encoder,
            unet=unet,
            inference_cfg_rate=float(cfm.get("inference_cfg_rate", 0.7)),
            t_scheduler=scheduler,
        )


def _need_call(parent: YamlCall, key: str, class_name: str) -> YamlCall:
    node = parent.get(key)
    if not isinstance(node, YamlCall) or node.class_name != class_name:
        got = node.class_name if isinstance(node, YamlCall) else type(node).__name__
        raise FlowConfigError(f"flow {key}: expected {class_name}, got {got}")
    return node


def _check_encoder_options(enc: YamlCall) -> None:
    wanted = {"input_layer": "linear", "pos_enc_layer_type": "rel_pos_espnet",
              "selfattention_layer_type": "rel_selfattn", "normalize_before": True,
              "use_cnn_module": False, "macaron_style": False, "activation_type": "swish"}
    defaults = {"input_layer": "conv2d", "pos_enc_layer_type": "rel_pos", "selfattention_layer_type": "rel_selfattn",
                "normalize_before": True, "use_cnn_module": True, "macaron_style": True, "activation_type": "swish"}
    bad = [f"{k}={enc.get(k, defaults[k])!r}" for k, v in wanted.items() if enc.get(k, defaults[k]) != v]
    if enc.get("key_bias", True) is not True:
        bad.append(f"key_bias={enc.get('key_bias')!r}")
    if enc.get("global_cmvn") is not None:
        bad.append("global_cmvn")
    if bad:
        raise FlowConfigError("UpsampleConformerEncoder options not supported: " + ", ".join(bad))


def _encoder_layer_overrides(y: dict, enc: YamlCall) -> dict[str, Any]:
    """Top-level `!apply:setattr [<flow encoder>, pre_lookahead_layer|up_layer, !new:...]` entries."""
    found = {}
    for value in y.values():
        if not (isinstance(value, YamlCall) and value.kind == "apply" and value.class_name == "setattr"):
            continue
        if len(value.args) != 3 or value.args[0] != enc or value.args[1] not in ("pre_lookahead_layer", "up_layer"):
            continue
        layer, call = value.args[1], value.args[2]
        want = "PreLookaheadLayer" if layer == "pre_lookahead_layer" else "Upsample1D"
        if not isinstance(call, YamlCall) or call.class_name != want:
            raise FlowConfigError(f"setattr of encoder.{layer} to something other than {want}")
        found[layer] = call
    return found
