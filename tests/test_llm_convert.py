"""llm.pt converter: golden round trip, tied lm_head, key errors, full-size manifest shapes (both versions)."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from convert.common import ConversionError, compare_trees, shapes_only_state
from convert.registry import convert_component, convert_state
from cosyjax.config import ModelConfig
from cosyjax.io.torch_checkpoint import load_state_dict
from cosyjax.llm.config import LLMConfig
from cosyjax.llm.speech_lm import abstract_params

from .conftest import FULLSIZE, model_dir

VERSIONS = ["cosyvoice2", "cosyvoice3"]


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_round_trip(version):
    mc = ModelConfig.from_dir(model_dir(version))
    cfg = LLMConfig.from_model_config(mc)
    params = convert_component("llm", mc)
    assert compare_trees(params, abstract_params(cfg)) == []
    sd = load_state_dict(mc.path("llm.pt"))
    q = "llm.model.model.layers.1.self_attn"
    attn = params["llm"]["layers_1"]["self_attn"]
    np.testing.assert_array_equal(attn["k_proj"]["kernel"], sd[f"{q}.k_proj.weight"].T)
    np.testing.assert_array_equal(attn["k_proj"]["bias"], sd[f"{q}.k_proj.bias"])
    np.testing.assert_array_equal(params["llm"]["embed_tokens"]["embedding"], sd["llm.model.model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["llm"]["norm"]["scale"], sd["llm.model.model.norm.weight"])
    np.testing.assert_array_equal(params["llm_decoder"]["kernel"], sd["llm_decoder.weight"].T)
    np.testing.assert_array_equal(params["speech_embedding"]["embedding"], sd["speech_embedding.weight"])
    if version == "cosyvoice2":
        np.testing.assert_array_equal(params["llm_decoder"]["bias"], sd["llm_decoder.bias"])
        np.testing.assert_array_equal(params["llm_embedding"]["embedding"], sd["llm_embedding.weight"])
    else:
        assert "bias" not in params["llm_decoder"] and "llm_embedding" not in params


def test_key_problems_are_all_listed():
    mc = ModelConfig.from_dir(model_dir("cosyvoice2"))
    sd = load_state_dict(mc.path("llm.pt"))
    sd.pop("llm.model.model.layers.0.mlp.up_proj.weight")
    sd.pop("llm_embedding.weight")
    sd["llm_decoder.bias"] = sd["llm_decoder.bias"][:10]
    sd["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as e:
        convert_state("llm", sd, mc)
    msg = str(e.value)
    for key in ("layers.0.mlp.up_proj.weight", "llm_embedding.weight", "llm_decoder.bias", "extra.weight"):
        assert key in msg


def test_untied_lm_head_is_rejected_and_absent_one_accepted():
    mc = ModelConfig.from_dir(model_dir("cosyvoice2"))
    sd = load_state_dict(mc.path("llm.pt"))
    bad = dict(sd)
    bad["llm.model.lm_head.weight"] = sd["llm.model.lm_head.weight"] + 1
    with pytest.raises(ConversionError, match="lm_head"):
        convert_state("llm", bad, mc)
    no_head = {k: v for k, v in sd.items() if k != "llm.model.lm_head.weight"}
    convert_state("llm", no_head, mc)


@pytest.mark.parametrize("version", VERSIONS)
def test_full_size_manifest_shapes(version):
    mc = ModelConfig.from_dir(os.path.join(FULLSIZE, version))
    cfg = LLMConfig.from_model_config(mc)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (896, 24, 14, 2, 64)
    with open(os.path.join(FULLSIZE, version, f"{version}_llm.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    converted = convert_state("llm", shapes_only_state(manifest), mc)  # raises on any unknown/missing key
    expected = abstract_params(cfg)
    assert compare_trees(converted, expected) == []
    n = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(expected))
    assert n == manifest["n_parameters_module"]
