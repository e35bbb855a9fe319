"""CosyVoice2 `flow.pt` (`CausalMaskedDiffWithXvec`) -> `cosyjax.flow.cv2.model.FlowCV2` parameters.

Key layout: SPEC §8.3. Repeated layers are stacked along a leading axis (the model `nn.scan`s them):
`encoder.encoders` / `encoder.up_encoders` [n_layers, ...], `estimator.down_transformers` /
`up_transformers` [n_blocks, ...], `estimator.mid_blocks` [num_mid, ...] (its `transformers`
[num_mid, n_blocks, ...]). Every width comes from the config (itself from the yaml), so the same code
converts the tiny golden checkpoint and the released 0.5B one; `StateDict.finish()` (run by the
registry) lists every unknown / missing / mis-shaped key at once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from convert.common import StateDict
from cosyjax.flow.cv2.config import EncoderCV2Config, FlowCV2Config, UNetConfig

CHECKPOINT = "flow.pt"

__all__ = ["CHECKPOINT", "config_from", "convert", "convert_encoder", "convert_estimator"]


def config_from(model_cfg) -> FlowCV2Config:
    return FlowCV2Config.from_model_config(model_cfg)


def _stack(leaves):
    if all(isinstance(a, np.ndarray) for a in leaves):
        return np.stack(leaves)
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(leaves[0].shape), jnp.dtype(leaves[0].dtype))


def _stack_trees(trees: list) -> dict:
    """Per-layer trees -> one tree with a leading layer axis (the model `nn.scan`s its layers)."""
    if not trees:
        raise ValueError("cannot stack zero layers")
    return jax.tree_util.tree_map(lambda *xs: _stack(list(xs)), *trees)


def _raw(sd: StateDict, key: str, shape: tuple):
    return sd.raw(key, shape, np.float32)


def _linear_embed(sd: StateDict, prefix: str, d_in: int, d: int) -> dict:
    return {"linear": sd.linear(f"{prefix}.out.0", d_in, d), "norm": sd.norm(f"{prefix}.out.1", d)}


def _conformer_layer(sd: StateDict, prefix: str, c: EncoderCV2Config) -> dict:
    d, H = c.output_size, c.attention_heads
    a = f"{prefix}.self_attn"
    attn = {name: sd.linear(f"{a}.{name}", d, d) for name in ("linear_q", "linear_k", "linear_v", "linear_out")}
    attn["linear_pos"] = sd.linear(f"{a}.linear_pos", d, d, bias=False)
    attn["pos_bias_u"] = _raw(sd, f"{a}.pos_bias_u", (H, c.head_dim))
    attn["pos_bias_v"] = _raw(sd, f"{a}.pos_bias_v", (H, c.head_dim))
    return {
        "norm_mha": sd.norm(f"{prefix}.norm_mha", d),
        "self_attn": attn,
        "norm_ff": sd.norm(f"{prefix}.norm_ff", d),
        "w_1": sd.linear(f"{prefix}.feed_forward.w_1", d, c.linear_units),
        "w_2": sd.linear(f"{prefix}.feed_forward.w_2", c.linear_units, d),
    }


def convert_encoder(sd: StateDict, c: EncoderCV2Config, prefix: str = "encoder") -> dict:
    d = c.output_size
    p = {
        "embed": _linear_embed(sd, f"{prefix}.embed", c.input_size, d),
        "pre_lookahead_layer": {
            "conv1": sd.conv1d(f"{prefix}.pre_lookahead_layer.conv1", d, c.pre_lookahead_channels,
                               c.pre_lookahead_len + 1),
            "conv2": sd.conv1d(f"{prefix}.pre_lookahead_layer.conv2", c.pre_lookahead_channels, d, 3),
        },
        "up_layer": {"conv": sd.conv1d(f"{prefix}.up_layer.conv", d, c.upsample_channels,
                                       2 * c.upsample_stride + 1)},
        "up_embed": _linear_embed(sd, f"{prefix}.up_embed", c.input_size, d),
        "after_norm": sd.norm(f"{prefix}.after_norm", d),
    }
    p["encoders"] = _stack_trees([_conformer_layer(sd, f"{prefix}.encoders.{i}", c) for i in range(c.num_blocks)])
    p["up_encoders"] = _stack_trees([_conformer_layer(sd, f"{prefix}.up_encoders.{i}", c)
                                     for i in range(c.num_up_blocks)])
    return p


def _causal_block(sd: StateDict, prefix: str, din: int, dout: int) -> dict:
    return {"conv": sd.conv1d(f"{prefix}.block.0", din, dout, 3), "norm": sd.norm(f"{prefix}.block.2", dout)}


def _resnet(sd: StateDict, prefix: str, din: int, dout: int, temb: int) -> dict:
    return {
        "block1": _causal_block(sd, f"{prefix}.block1", din, dout),
        "mlp": sd.linear(f"{prefix}.mlp.1", temb, dout),
        "block2": _causal_block(sd, f"{prefix}.block2", dout, dout),
        "res_conv": sd.conv1d(f"{prefix}.res_conv", din, dout, 1),
    }


def _transformer(sd: StateDict, prefix: str, u: UNetConfig) -> dict:
    C, inner = u.channels[0], u.inner_dim
    return {
        "norm1": sd.norm(f"{prefix}.norm1", C),
        "to_q": sd.linear(f"{prefix}.attn1.to_q", C, inner, bias=False),
        "to_k": sd.linear(f"{prefix}.attn1.to_k", C, inner, bias=False),
        "to_v": sd.linear(f"{prefix}.attn1.to_v", C, inner, bias=False),
        "to_out": sd.linear(f"{prefix}.attn1.to_out.0", inner, C),
        "norm3": sd.norm(f"{prefix}.norm3", C),
        "ff_proj": sd.linear(f"{prefix}.ff.net.0.proj", C, 4 * C),
        "ff_out": sd.linear(f"{prefix}.ff.net.2", 4 * C, C),
    }


def convert_estimator(sd: StateDict, u: UNetConfig, prefix: str = "decoder.estimator") -> dict:
    C, E = u.channels[0], u.time_embed_dim
    p = {
        "time_mlp_linear_1": sd.linear(f"{prefix}.time_mlp.linear_1", u.in_channels, E),
        "time_mlp_linear_2": sd.linear(f"{prefix}.time_mlp.linear_2", E, E),
        "down_resnet": _resnet(sd, f"{prefix}.down_blocks.0.0", u.in_channels, C, E),
        "down_conv": sd.conv1d(f"{prefix}.down_blocks.0.2", C, C, 3),
        "up_resnet": _resnet(sd, f"{prefix}.up_blocks.0.0", 2 * C, C, E),
        "up_conv": sd.conv1d(f"{prefix}.up_blocks.0.2", C, C, 3),
        "final_block": _causal_block(sd, f"{prefix}.final_block", C, C),
        "final_proj": sd.conv1d(f"{prefix}.final_proj", C, u.out_channels, 1),
    }
    stack = lambda block: _stack_trees([_transformer(sd, f"{block}.{i}", u) for i in range(u.n_blocks)])  # noqa: E731
    p["down_transformers"] = stack(f"{prefix}.down_blocks.0.1")
    p["up_transformers"] = stack(f"{prefix}.up_blocks.0.1")
    if u.num_mid_blocks:
        p["mid_blocks"] = _stack_trees([{"resnet": _resnet(sd, f"{prefix}.mid_blocks.{j}.0", C, C, E),
                                         "transformers": stack(f"{prefix}.mid_blocks.{j}.1")}
                                        for j in range(u.num_mid_blocks)])
    return p


def convert(sd: StateDict, cfg: FlowCV2Config) -> dict:
    """All of `flow.pt` -> `{'params'-tree of FlowCV2}` (plain nested dict)."""
    c = cfg.encoder
    return {
        "input_embedding": sd.embedding("input_embedding", cfg.vocab_size, cfg.input_size),
        "spk_embed_affine_layer": sd.linear("spk_embed_affine_layer", cfg.spk_embed_dim, cfg.output_size),
        "encoder": convert_encoder(sd, c),
        "encoder_proj": sd.linear("encoder_proj", c.output_size, cfg.output_size),
        "estimator": convert_estimator(sd, cfg.unet),
    }
