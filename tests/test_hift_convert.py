"""HiFT converter: golden hift.pt in all three key layouts, full-size manifests (shapes only), key errors."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.common import ConversionError, compare_trees, shapes_only_state
from convert.registry import convert_component, convert_state
from cosyjax.config import ModelConfig
from cosyjax.hift.config import HiFTConfig, HiFTConfigError
from cosyjax.hift.generator import HiFTGenerator
from cosyjax.io.hyperyaml import YamlCall
from cosyjax.io.torch_checkpoint import load_state_dict
from tests.conftest import FULLSIZE, GOLDEN, model_dir

VERSIONS = ("cosyvoice2", "cosyvoice3")


def _init_shapes(cfg: HiFTConfig):
    """Abstract `init` params of the flax module (no compilation)."""
    mel = jax.ShapeDtypeStruct((1, 4, cfg.in_channels), jnp.float32)
    noise = jax.ShapeDtypeStruct((1, 4 * cfg.upsample_scale, cfg.num_harmonics), jnp.float32)
    return jax.eval_shape(lambda m, n: HiFTGenerator(cfg).init(jax.random.key(0), m, n), mel, noise)["params"]


def _flat(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module", params=VERSIONS)
def golden(request):
    v = request.param
    mc = ModelConfig.from_dir(model_dir(v))
    return v, mc, HiFTConfig.from_model_config(mc), load_state_dict(os.path.join(model_dir(v), "hift.pt"))


def test_golden_three_key_layouts_give_identical_params(golden):
    v, mc, cfg, _ = golden
    ref = _flat(convert_component("hift", mc))
    for name in ("hift.generator_prefix.pt", "hift.legacy_weight_norm.pt"):
        path = os.path.join(GOLDEN, "hift_key_variants", v, name)
        other = _flat(convert_state("hift", load_state_dict(path), mc, source=path))
        assert other.keys() == ref.keys()
        for k in ref:
            np.testing.assert_array_equal(other[k], ref[k], err_msg=f"{name}: {k}")
            assert other[k].dtype == ref[k].dtype


def test_golden_tree_equals_module_init(golden):
    v, mc, cfg, _ = golden
    params = convert_component("hift", mc)
    assert compare_trees(params, _init_shapes(cfg)) == []
    for k, a in _flat(params).items():  # CV3 f0 predictor stays float64 (upstream runs it in float64)
        want = np.float64 if (cfg.causal and k.startswith("['f0_predictor']")) else np.float32
        assert a.dtype == want, k


def test_weight_norm_fold_and_layouts(golden):
    v, mc, cfg, sd = golden
    p = convert_component("hift", mc)

    def fold(prefix):
        g = sd[f"{prefix}.parametrizations.weight.original0"].astype(np.float64)
        w = sd[f"{prefix}.parametrizations.weight.original1"].astype(np.float64)
        return g * w / np.sqrt(np.sum(w * w, axis=(1, 2), keepdims=True))

    np.testing.assert_allclose(p["conv_pre"]["kernel"], fold("conv_pre").transpose(2, 1, 0), rtol=1e-6)
    np.testing.assert_allclose(p["resblocks_4"]["convs1_2"]["kernel"],
                               fold("resblocks.4.convs1.2").transpose(2, 1, 0), rtol=1e-6)
    ups = fold("ups.0")
    if cfg.causal:  # Conv1d [out, in, k] -> [k, in, out]
        np.testing.assert_allclose(p["ups_0"]["kernel"], ups.transpose(2, 1, 0), rtol=1e-6)
    else:  # ConvTranspose1d [in, out, k] (gain on the input axis) -> flipped forward kernel [k, in, out]
        assert sd["ups.0.parametrizations.weight.original0"].shape[0] == cfg.base_channels
        np.testing.assert_allclose(p["ups_0"]["kernel"], ups.transpose(2, 0, 1)[::-1], rtol=1e-6)
    f0w = p["f0_predictor"]["condnet_0"]["kernel"]
    np.testing.assert_allclose(f0w, fold("f0_predictor.condnet.0").transpose(2, 1, 0), rtol=1e-12 if cfg.causal else 1e-6)
    np.testing.assert_array_equal(p["resblocks_0"]["activations2_1"]["alpha"], sd["resblocks.0.activations2.1.alpha"])
    np.testing.assert_array_equal(p["m_source"]["l_linear"]["kernel"], sd["m_source.l_linear.weight"].T)


@pytest.mark.parametrize("version", VERSIONS)
def test_fullsize_manifest_maps_onto_fullsize_tree(version):
    d = os.path.join(FULLSIZE, version)
    mc = ModelConfig.from_dir(d)
    cfg = HiFTConfig.from_model_config(mc)
    assert cfg.base_channels == 512 and cfg.f0_cond_channels == 512
    with open(os.path.join(d, f"{version}_hift.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    state = shapes_only_state(manifest)
    expected = _init_shapes(cfg)
    # convert_state raises ConversionError on any leftover / missing / mis-shaped key
    assert compare_trees(convert_state("hift", state, mc), expected) == []
    # the other two key layouts of the same manifest
    legacy = {k.replace("parametrizations.weight.original0", "weight_g")
               .replace("parametrizations.weight.original1", "weight_v"): s for k, s in state.items()}
    prefixed = {"generator." + k: s for k, s in state.items()}
    for variant in (legacy, prefixed):
        assert compare_trees(convert_state("hift", variant, mc), expected) == []


def _mutated(golden, drop=(), add=None):
    v, mc, cfg, sd = golden
    state = {k: a for k, a in sd.items() if k not in drop}
    state.update(add or {})
    return mc, state


def test_missing_and_extra_keys_are_all_named(golden):
    drop = ("conv_post.bias", "resblocks.3.activations1.0.alpha")
    mc, state = _mutated(golden, drop=drop, add={"discriminator.foo": np.zeros(3, np.float32),
                                                 "ups.9.bias": np.zeros(2, np.float32)})
    with pytest.raises(ConversionError) as e:
        convert_state("hift", state, mc)
    msg = str(e.value)
    for k in drop + ("discriminator.foo", "ups.9.bias"):
        assert k in msg
    assert "missing (2)" in msg and "unknown (2)" in msg


def test_misshaped_key_is_named(golden):
    v, mc, cfg, sd = golden
    bad = {"source_downs.1.weight": np.zeros((3, 18, 6), np.float32)}
    with pytest.raises(ConversionError, match=r"source_downs\.1\.weight: checkpoint \(3, 18, 6\)"):
        convert_state("hift", {**sd, **bad}, mc)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # zero placeholders of mis-shaped weight-norm keys
@pytest.mark.parametrize("ckpt_version,yaml_version", [("cosyvoice2", "cosyvoice3"), ("cosyvoice3", "cosyvoice2")])
def test_other_versions_weights_are_rejected_with_a_hint(ckpt_version, yaml_version):
    mc = ModelConfig.from_dir(model_dir(yaml_version))
    state = load_state_dict(os.path.join(model_dir(ckpt_version), "hift.pt"))
    with pytest.raises(ConversionError) as e:
        convert_state("hift", state, mc)
    msg = str(e.value)
    assert "mis-shaped" in msg and "conv_pre.parametrizations.weight.original1" in msg and "ups.0" in msg
    names = {"cosyvoice2": "CosyVoice2 HiFTGenerator", "cosyvoice3": "CosyVoice3 CausalHiFTGenerator"}
    assert f"looks like a {names[ckpt_version]} checkpoint" in msg
    assert f"builds a {names[yaml_version]}" in msg


def _section(cls="CausalHiFTGenerator", f0="CausalConvRNNF0Predictor", **kw):
    f0_call = YamlCall("new", f"cosyvoice.hifigan.f0_predictor.{f0}", (), {"cond_channels": 8})
    base = dict(sampling_rate=24000, upsample_rates=[8, 5, 3], upsample_kernel_sizes=[16, 11, 7],
                source_resblock_kernel_sizes=[7, 7, 11],
                source_resblock_dilation_sizes=[[1, 3, 5]] * 3, base_channels=16, f0_predictor=f0_call)
    base.update(kw)
    return YamlCall("new", f"cosyvoice.hifigan.generator.{cls}", (), base)


def test_config_from_yaml_and_rejections():
    cfg = HiFTConfig.from_yaml_section(_section())
    assert cfg.causal and cfg.upsample_scale == 480 and cfg.source_down_rates == (15, 3, 1)
    assert cfg.f0_lookahead == 3 and cfg.finalize_false_trim == 8
    assert not HiFTConfig.from_yaml_section(_section("HiFTGenerator", "ConvRNNF0Predictor")).causal
    with pytest.raises(HiFTConfigError, match="needs f0_predictor CausalConvRNNF0Predictor"):
        HiFTConfig.from_yaml_section(_section(f0="ConvRNNF0Predictor"))
    with pytest.raises(HiFTConfigError, match="22050"):
        HiFTConfig.from_yaml_section(_section(sampling_rate=22050))
    with pytest.raises(HiFTConfigError, match="one entry per up-sampling stage"):
        HiFTConfig.from_yaml_section(_section(source_resblock_kernel_sizes=[7, 11]))
    with pytest.raises(HiFTConfigError, match="not supported"):
        HiFTConfig.from_yaml_section(_section(cls="HiFiGan"))
