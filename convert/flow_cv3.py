"""CosyVoice3 `flow.pt` (`CausalMaskedDiffWithDiT`, SPEC §8.4) -> `FlowCV3` parameter tree.

Per-block DiT weights are stacked along a leading `depth` axis (the model scans its blocks).
`decoder.estimator.rotary_embed.inv_freq` is a persistent buffer, not a parameter: it is consumed
and checked against the base-10000 table the model computes (a mismatch is a conversion error).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from convert.common import ConversionError, StateDict
from cosyjax.flow.cv3.config import FlowCV3Config
from cosyjax.flow.cv3.dit import rope_inv_freq

CHECKPOINT = "flow.pt"
PREFIX_ALIASES = ()
EST = "decoder.estimator"


def config_from(model_cfg) -> FlowCV3Config:
    return FlowCV3Config.from_model_config(model_cfg)


def _stack(leaves):
    if all(isinstance(a, np.ndarray) for a in leaves):
        return np.stack(leaves)
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(leaves[0].shape), jnp.dtype(leaves[0].dtype))


def _stack_trees(trees):
    return jax.tree_util.tree_map(lambda *xs: _stack(list(xs)), *trees)


def _block(sd: StateDict, i: int, c: FlowCV3Config) -> dict:
    p = f"{EST}.transformer_blocks.{i}"
    D, inner = c.dim, c.inner_dim
    return {
        "attn_norm": sd.linear(f"{p}.attn_norm.linear", D, 6 * D),
        "to_q": sd.linear(f"{p}.attn.to_q", D, inner),
        "to_k": sd.linear(f"{p}.attn.to_k", D, inner),
        "to_v": sd.linear(f"{p}.attn.to_v", D, inner),
        "to_out": sd.linear(f"{p}.attn.to_out.0", inner, D),
        "ff_in": sd.linear(f"{p}.ff.ff.0.0", D, D * c.ff_mult),
        "ff_out": sd.linear(f"{p}.ff.ff.2", D * c.ff_mult, D),
    }


def _check_rope(sd: StateDict, c: FlowCV3Config) -> None:
    key = f"{EST}.rotary_embed.inv_freq"
    got = sd.take(key, (c.dim_head // 2,))
    if isinstance(got, np.ndarray) and got.size and key not in sd.missing:
        want = rope_inv_freq(c.dim_head, c.rope_base)
        if not np.allclose(got.astype(np.float64), want.astype(np.float64), rtol=1e-6, atol=0.0):
            raise ConversionError(
                f"{sd.source}: {key} does not match the base-{c.rope_base:g} rotary table the model computes "
                f"(max abs diff {np.max(np.abs(got - want)):.3e}); a non-default RotaryEmbedding is not supported")


def convert(sd: StateDict, c: FlowCV3Config) -> dict:
    D, k, g = c.dim, c.conv_pos_kernel, c.conv_pos_groups
    in_feats = c.mel_dim * 2 + c.mu_dim + c.spk_dim
    _check_rope(sd, c)
    estimator = {
        "time_mlp_0": sd.linear(f"{EST}.time_embed.time_mlp.0", c.time_freq_dim, D),
        "time_mlp_2": sd.linear(f"{EST}.time_embed.time_mlp.2", D, D),
        "input_proj": sd.linear(f"{EST}.input_embed.proj", in_feats, D),
        "conv_pos_1": sd.conv1d(f"{EST}.input_embed.conv_pos_embed.conv1.0", D, D, k, groups=g),
        "conv_pos_2": sd.conv1d(f"{EST}.input_embed.conv_pos_embed.conv2.0", D, D, k, groups=g),
        "blocks": _stack_trees([_block(sd, i, c) for i in range(c.depth)]),
        "norm_out": sd.linear(f"{EST}.norm_out.linear", D, 2 * D),
        "proj_out": sd.linear(f"{EST}.proj_out", D, c.mel_dim),
    }
    return {
        "input_embedding": sd.embedding("input_embedding", c.vocab_size, c.input_size),
        "spk_embed_affine_layer": sd.linear("spk_embed_affine_layer", c.spk_embed_dim, c.output_size),
        "pre_lookahead_layer": {
            "conv1": sd.conv1d("pre_lookahead_layer.conv1", c.input_size, c.pre_lookahead_channels,
                               c.pre_lookahead_len + 1),
            "conv2": sd.conv1d("pre_lookahead_layer.conv2", c.pre_lookahead_channels, c.input_size, 3),
        },
        "estimator": estimator,
    }
