"""CV3 flow converter (convert/flow_cv3.py): golden round trip, full-size shapes-only manifest, key errors."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from convert.common import ConversionError, StateDict, compare_trees, shapes_only_state
from convert.registry import convert_state
from cosyjax.config import ModelConfig
from cosyjax.flow.cv3.config import FlowCV3Config
from cosyjax.flow.cv3.model import init_params
from cosyjax.io.torch_checkpoint import load_state_dict
from tests.conftest import FULLSIZE, model_dir

TINY = model_dir("cosyvoice3")
needs_tiny = pytest.mark.skipif(not os.path.exists(os.path.join(TINY, "flow.pt")), reason="golden model dir absent")


@pytest.fixture(scope="module")
def tiny():
    mc = ModelConfig.from_dir(TINY)
    return mc, FlowCV3Config.from_model_config(mc), load_state_dict(os.path.join(TINY, "flow.pt"))


@needs_tiny
def test_config_reads_yaml_sizes(tiny):
    _, cfg, _ = tiny
    assert cfg.version == "cosyvoice3"
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.dim_head, cfg.ff_mult) == (64, 2, 2, 32, 2)
    assert cfg.pre_lookahead_channels == 64 and cfg.static_chunk_size == 50
    assert cfg.inference_cfg_rate == 0.7 and cfg.t_scheduler == "cosine"
    hash(cfg)  # static jit argument


@needs_tiny
def test_golden_round_trip(tiny):
    """Every checkpoint key is consumed, the tree equals the module's, values land in the right place."""
    mc, cfg, sd = tiny
    params = convert_state("flow", dict(sd), mc)
    assert compare_trees(params, init_params(cfg, abstract=True)) == []
    est = "decoder.estimator"
    np.testing.assert_array_equal(params["input_embedding"]["embedding"], sd["input_embedding.weight"])
    np.testing.assert_array_equal(params["spk_embed_affine_layer"]["kernel"], sd["spk_embed_affine_layer.weight"].T)
    np.testing.assert_array_equal(params["pre_lookahead_layer"]["conv1"]["kernel"],
                                  sd["pre_lookahead_layer.conv1.weight"].transpose(2, 1, 0))
    for i in range(cfg.depth):
        np.testing.assert_array_equal(params["estimator"]["blocks"]["to_q"]["kernel"][i],
                                      sd[f"{est}.transformer_blocks.{i}.attn.to_q.weight"].T)
        np.testing.assert_array_equal(params["estimator"]["blocks"]["ff_out"]["bias"][i],
                                      sd[f"{est}.transformer_blocks.{i}.ff.ff.2.bias"])
    w = sd[f"{est}.input_embed.conv_pos_embed.conv1.0.weight"]  # [out, in/g, k]
    np.testing.assert_array_equal(params["estimator"]["conv_pos_1"]["kernel"], w.transpose(2, 1, 0))
    for leaf in jax.tree_util.tree_leaves(params):
        assert leaf.dtype == np.float32


@needs_tiny
def test_missing_unknown_and_bad_rope_keys_are_reported(tiny):
    mc, cfg, sd = tiny
    broken = dict(sd)
    del broken["decoder.estimator.proj_out.bias"]
    broken["decoder.estimator.transformer_blocks.0.attn.to_q.weight"] = np.zeros((3, 3), np.float32)
    broken["decoder.estimator.extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(ConversionError) as e:
        convert_state("flow", broken, mc)
    msg = str(e.value)
    assert "proj_out.bias" in msg and "to_q.weight" in msg and "extra.weight" in msg
    bad_rope = dict(sd)
    bad_rope["decoder.estimator.rotary_embed.inv_freq"] = sd["decoder.estimator.rotary_embed.inv_freq"] * 2
    with pytest.raises(ConversionError, match="inv_freq"):
        convert_state("flow", bad_rope, mc)
    no_rope = dict(sd)
    del no_rope["decoder.estimator.rotary_embed.inv_freq"]
    with pytest.raises(ConversionError, match="inv_freq"):
        convert_state("flow", no_rope, mc)


def test_fullsize_manifest_shapes_only():
    """The released Fun-CosyVoice3-0.5B flow.pt key set converts onto the full-size module exactly."""
    d = os.path.join(FULLSIZE, "cosyvoice3")
    mc = ModelConfig.from_dir(d)
    cfg = FlowCV3Config.from_model_config(mc)
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.dim_head, cfg.pre_lookahead_channels) == (1024, 22, 16, 64, 1024)
    with open(os.path.join(d, "cosyvoice3_flow.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    state = shapes_only_state(manifest)
    import convert.flow_cv3 as conv

    sd = StateDict(state, source="manifest")
    params = conv.convert(sd, cfg)
    sd.finish("cosyvoice3 flow")  # no missing / mis-shaped / leftover keys
    expected = init_params(cfg, abstract=True)
    assert compare_trees(params, expected) == []
    n = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(expected))
    assert n == manifest["numel_all_keys"] - cfg.dim_head // 2  # everything but the inv_freq buffer
