"""CV2 flow config + converter (cosyjax/flow/cv2/config.py, convert/flow_cv2.py): yaml sizes, golden round
trip, full-size shapes-only manifest, every bad key reported, unsupported configs rejected."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from convert.common import ConversionError, StateDict, compare_trees, shapes_only_state
from convert.registry import convert_state
from cosyjax.config import ModelConfig
from cosyjax.flow.cv2.config import FlowConfigError, FlowCV2Config
from cosyjax.flow.cv2.model import init_params
from cosyjax.io.hyperyaml import YamlCall
from cosyjax.io.torch_checkpoint import load_state_dict
from tests.conftest import FULLSIZE, model_dir

TINY = model_dir("cosyvoice2")
needs_tiny = pytest.mark.skipif(not os.path.exists(os.path.join(TINY, "flow.pt")), reason="golden model dir absent")


@pytest.fixture(scope="module")
def tiny():
    mc = ModelConfig.from_dir(TINY)
    return mc, FlowCV2Config.from_model_config(mc), load_state_dict(os.path.join(TINY, "flow.pt"))


@needs_tiny
def test_config_reads_yaml_sizes(tiny):
    _, cfg, _ = tiny
    e, u = cfg.encoder, cfg.unet
    assert cfg.version == "cosyvoice2"
    assert (e.input_size, e.output_size, e.attention_heads, e.linear_units, e.num_blocks) == (64, 64, 2, 128, 2)
    # the tiny yaml's setattr entries replace upstream's hard-coded 512-wide layers
    assert (e.pre_lookahead_channels, e.upsample_channels, e.pre_lookahead_len) == (64, 64, 3)
    assert (e.static_chunk_size, u.static_chunk_size) == (25, 50)
    assert (u.in_channels, u.out_channels, u.channels, u.attention_head_dim, u.n_blocks, u.num_mid_blocks,
            u.num_heads, u.time_embed_dim) == (320, 80, (64,), 32, 1, 2, 2, 256)
    assert cfg.inference_cfg_rate == 0.7 and cfg.t_scheduler == "cosine" and cfg.token_mel_ratio == 2
    hash(cfg)  # static jit argument


def test_fullsize_config():
    cfg = FlowCV2Config.from_model_config(ModelConfig.from_dir(os.path.join(FULLSIZE, "cosyvoice2")))
    e, u = cfg.encoder, cfg.unet
    assert (e.output_size, e.attention_heads, e.linear_units, e.num_blocks, e.num_up_blocks) == (512, 8, 2048, 6, 4)
    assert (e.pre_lookahead_channels, e.upsample_channels) == (512, 512)  # = output_size, no constant
    assert (u.channels, u.n_blocks, u.num_mid_blocks, u.num_heads, u.attention_head_dim) == ((256,), 4, 12, 8, 64)
    assert u.n_blocks * (2 + u.num_mid_blocks) == 56  # transformer blocks


@needs_tiny
def test_golden_round_trip(tiny):
    """Every checkpoint key is consumed, the tree equals the module's, values land where they belong."""
    mc, cfg, sd = tiny
    params = convert_state("flow", dict(sd), mc)
    assert compare_trees(params, init_params(cfg, abstract=True)) == []
    enc, est = params["encoder"], params["estimator"]
    np.testing.assert_array_equal(params["input_embedding"]["embedding"], sd["input_embedding.weight"])
    np.testing.assert_array_equal(params["encoder_proj"]["kernel"], sd["encoder_proj.weight"].T)
    np.testing.assert_array_equal(enc["embed"]["norm"]["scale"], sd["encoder.embed.out.1.weight"])
    np.testing.assert_array_equal(enc["up_encoders"]["self_attn"]["pos_bias_v"][3],
                                  sd["encoder.up_encoders.3.self_attn.pos_bias_v"])
    np.testing.assert_array_equal(enc["encoders"]["self_attn"]["linear_pos"]["kernel"][1],
                                  sd["encoder.encoders.1.self_attn.linear_pos.weight"].T)
    np.testing.assert_array_equal(enc["encoders"]["w_1"]["bias"][0], sd["encoder.encoders.0.feed_forward.w_1.bias"])
    np.testing.assert_array_equal(enc["up_layer"]["conv"]["kernel"],
                                  sd["encoder.up_layer.conv.weight"].transpose(2, 1, 0))
    np.testing.assert_array_equal(enc["pre_lookahead_layer"]["conv2"]["kernel"],
                                  sd["encoder.pre_lookahead_layer.conv2.weight"].transpose(2, 1, 0))
    p = "decoder.estimator"
    np.testing.assert_array_equal(est["mid_blocks"]["transformers"]["to_out"]["kernel"][1, 0],
                                  sd[f"{p}.mid_blocks.1.1.0.attn1.to_out.0.weight"].T)
    np.testing.assert_array_equal(est["mid_blocks"]["resnet"]["mlp"]["kernel"][0],
                                  sd[f"{p}.mid_blocks.0.0.mlp.1.weight"].T)
    np.testing.assert_array_equal(est["down_transformers"]["norm3"]["scale"][0],
                                  sd[f"{p}.down_blocks.0.1.0.norm3.weight"])
    np.testing.assert_array_equal(est["up_resnet"]["block1"]["conv"]["kernel"],
                                  sd[f"{p}.up_blocks.0.0.block1.block.0.weight"].transpose(2, 1, 0))
    np.testing.assert_array_equal(est["down_resnet"]["block2"]["norm"]["bias"],
                                  sd[f"{p}.down_blocks.0.0.block2.block.2.bias"])
    np.testing.assert_array_equal(est["final_proj"]["kernel"], sd[f"{p}.final_proj.weight"].transpose(2, 1, 0))
    for leaf in jax.tree_util.tree_leaves(params):
        assert leaf.dtype == np.float32


@needs_tiny
def test_missing_unknown_and_misshaped_keys_are_reported_together(tiny):
    mc, _, sd = tiny
    broken = dict(sd)
    del broken["decoder.estimator.final_proj.bias"]
    del broken["encoder.up_encoders.2.self_attn.pos_bias_u"]
    broken["encoder.encoders.0.self_attn.linear_q.weight"] = np.zeros((3, 3), np.float32)
    broken["encoder.global_cmvn.mean"] = np.zeros(1, np.float32)
    with pytest.raises(ConversionError) as e:
        convert_state("flow", broken, mc)
    msg = str(e.value)
    for key in ("final_proj.bias", "up_encoders.2.self_attn.pos_bias_u", "encoders.0.self_attn.linear_q.weight",
                "global_cmvn.mean"):
        assert key in msg


def test_fullsize_manifest_shapes_only():
    """The released CosyVoice2-0.5B flow.pt key set converts onto the full-size module exactly."""
    d = os.path.join(FULLSIZE, "cosyvoice2")
    cfg = FlowCV2Config.from_model_config(ModelConfig.from_dir(d))
    with open(os.path.join(d, "cosyvoice2_flow.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    import convert.flow_cv2 as conv

    sd = StateDict(shapes_only_state(manifest), source="manifest")
    params = conv.convert(sd, cfg)
    sd.finish("cosyvoice2 flow")  # no missing / mis-shaped / leftover key
    expected = init_params(cfg, abstract=True)
    assert compare_trees(params, expected) == []
    n = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(expected))
    assert n == manifest["numel_all_keys"] == manifest["n_parameters_module"]


def _replace_kwargs(call: YamlCall, **kw) -> YamlCall:
    return dataclasses.replace(call, kwargs={**call.kwargs, **kw})


def test_unsupported_configs_are_rejected():
    y = dict(ModelConfig.from_dir(os.path.join(FULLSIZE, "cosyvoice2")).yaml)
    flow = y["flow"]
    enc, dec = flow["encoder"], flow["decoder"]
    cases = {
        "macaron_style": _replace_kwargs(flow, encoder=_replace_kwargs(enc, macaron_style=True)),
        "use_cnn_module": _replace_kwargs(flow, encoder=_replace_kwargs(enc, use_cnn_module=True)),
        "input_size": _replace_kwargs(flow, encoder=_replace_kwargs(enc, input_size=256)),
        "single level": _replace_kwargs(flow, decoder=_replace_kwargs(
            dec, estimator=_replace_kwargs(dec["estimator"], channels=[256, 256]))),
        "act_fn": _replace_kwargs(flow, decoder=_replace_kwargs(
            dec, estimator=_replace_kwargs(dec["estimator"], act_fn="snakebeta"))),
    }
    for match, bad_flow in cases.items():
        with pytest.raises(FlowConfigError, match=match):
            FlowCV2Config.from_yaml({**y, "flow": bad_flow})
