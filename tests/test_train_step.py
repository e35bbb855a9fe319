"""Train step, resume and LoRA on the tiny golden models (CPU): overfitting 4 utterances, an interrupted run
resumed from its checkpoint, adapters that change nothing else and merge exactly."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import model_dir


def utterances(n=4, seed=0, vocab=64):
    """Learnable toy data: mel frames are a fixed function of the tokens."""
    from cosyjax.train.data import Utterance

    rng = np.random.default_rng(seed)
    proj = rng.normal(size=(vocab, 80)).astype(np.float32)
    out = []
    for i in range(n):
        tok = rng.integers(0, vocab, int(rng.integers(10, 20))).astype(np.int32)
        out.append(Utterance(f"u{i}", "x", tok, rng.normal(size=192).astype(np.float32),
                             np.repeat(proj[tok], 2, axis=0) - 4.0,
                             text_token=rng.integers(0, 1000, int(rng.integers(3, 7))).astype(np.int32),
                             instruct_token=np.array([5, 151646], np.int32)))
    return out


def _setup(component, **train):
    from convert.registry import convert_component
    from cosyjax.config import ModelConfig
    from cosyjax.train.step import TrainConfig, make_task

    mc = ModelConfig.from_dir(model_dir("cosyvoice3"))
    return make_task(component, mc, TrainConfig(**train)), convert_component(component, mc)


@pytest.mark.parametrize("component,lr,factor", [("flow", 1e-3, 0.5), ("llm", 3e-3, 2 / 3)])
def test_overfit_100_steps(component, lr, factor):
    from cosyjax.train.data import Batcher
    from cosyjax.train.loop import fit

    task, params = _setup(component, learning_rate=lr)
    _, _, losses = fit(task, params, Batcher(utterances(), task, 2, streaming=False), 100)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last <= factor * first, (component, first, last)


def test_resume_follows_the_uninterrupted_curve(tmp_path):
    from cosyjax.train.data import Batcher
    from cosyjax.train.loop import fit

    task, params = _setup("llm", learning_rate=3e-3, warmup_steps=2, accum_steps=2)
    batcher = Batcher(utterances(), task, 2)
    _, _, full = fit(task, params, batcher, 8)
    fit(task, params, batcher, 4, out_dir=str(tmp_path), save_every=4)  # "interrupted" after 4 steps
    state, _, rest = fit(task, params, batcher, 8, out_dir=str(tmp_path), resume=True)
    assert int(state.step) == 8 and len(rest) == 4
    np.testing.assert_array_equal(np.asarray(rest), np.asarray(full[4:]))


def test_lora_changes_only_adapters_and_merges(tmp_path):
    from cosyjax.train import lora
    from cosyjax.train.checkpoint import load_params, save_output
    from cosyjax.train.data import Batcher
    from cosyjax.train.loop import fit
    from cosyjax.train.step import inference_params, task_loss

    task, params = _setup("flow", learning_rate=1e-2, lora_rank=2, lora_alpha=4.0)
    state, base, _ = fit(task, params, Batcher(utterances(), task, 2, streaming=False), 3)
    # the frozen base is untouched; only target kernels differ in the merged tree
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), base, params)
    targets = set(lora.target_paths(params, task.lora_targets))
    assert targets and all("estimator/blocks/to_" in p for p in targets)
    merged = inference_params(task, state.trainable, base)
    flat_m = dict(jax.tree_util.tree_flatten_with_path(merged)[0])
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        changed = not np.array_equal(np.asarray(flat_m[kp]), np.asarray(leaf))
        assert changed == (lora._path(kp) in targets), lora._path(kp)
    # merged kernel == adapter applied to activations, for a stacked [depth, in, out] kernel
    w = params["estimator"]["blocks"]["to_q"]["kernel"]
    ab = state.trainable["estimator"]["blocks"]["to_q"]["kernel"]
    x = jax.random.normal(jax.random.PRNGKey(1), (w.shape[0], 5, w.shape[1]))
    want = lora.lora_dense(x, w, ab["a"], ab["b"], 4.0, 2)
    np.testing.assert_allclose(x @ merged["estimator"]["blocks"]["to_q"]["kernel"], want, rtol=1e-5, atol=1e-5)
    # the saved output (adapters only) merges back to the same tree and the same loss
    save_output(str(tmp_path), task, state.trainable, model_dir=model_dir("cosyvoice3"), steps=3)
    loaded = load_params(str(tmp_path), params)
    batch, _ = Batcher(utterances(), task, 2, streaming=False)(0)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    key = jax.random.PRNGKey(3)
    l_adapt, _ = task_loss(task, state.trainable, base, batch, key)
    full_task = type(task)(task.component, task.version, task.model_cfg, task.loss_cfg,
                           type(task.train)(learning_rate=1e-2))
    l_merged, _ = task_loss(full_task, jax.tree_util.tree_map(jnp.asarray, loaded), None, batch, key)
    np.testing.assert_allclose(float(l_merged), float(l_adapt), rtol=1e-6)


def test_freeze_keeps_frozen_parameters():
    from cosyjax.train.data import Batcher
    from cosyjax.train.loop import fit

    task, params = _setup("llm", learning_rate=1e-2, freeze=(r"^llm/",))
    state, _, _ = fit(task, params, Batcher(utterances(), task, 2), 2)
    np.testing.assert_array_equal(np.asarray(state.trainable["llm"]["norm"]["scale"]),
                                  np.asarray(params["llm"]["norm"]["scale"]))
    assert not np.array_equal(np.asarray(state.trainable["llm_decoder"]["kernel"]),
                              np.asarray(params["llm_decoder"]["kernel"]))


def test_bad_train_config():
    from cosyjax.errors import CosyJaxError
    from cosyjax.train.step import TrainConfig

    with pytest.raises(CosyJaxError, match="optimizer"):
        TrainConfig(optimizer="sgd")
