"""`cosyjax finetune` on a generated parquet list (flow) and a JSONL manifest (LLM, LoRA), then synthesis
with the fine-tuned parameters through `cosyjax.train.checkpoint.load_params` + the pipeline."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.test_train_data import make_rows, write_list, write_manifest

pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from cosyjax.demo import build_demo_model_dir

    return build_demo_model_dir("cosyvoice3", out_dir=str(tmp_path_factory.mktemp("demo") / "cv3"))


def _synth(model_dir, params, cache):
    from cosyjax.api import CosyVoice
    from cosyjax.demo import DEMO_PROMPT, DEMO_PROMPT_TEXT
    from cosyjax.pipeline import Engine

    cv = CosyVoice.from_pretrained(model_dir, cache_dir=cache)
    if params is not None:
        cv.engine = Engine(params, cv.engine.config)
    out = list(cv.inference_zero_shot("Hello there, fine tuned.", "You are a helpful assistant.<|endofprompt|>"
                                      + DEMO_PROMPT_TEXT, os.path.join(model_dir, DEMO_PROMPT), seed=0,
                                      llm_kwargs={"max_len": 30}))
    return np.concatenate([o["tts_speech"] for o in out], axis=1)


def _base_params(model_dir, cache):
    from cosyjax.config import ModelConfig
    from cosyjax.model_cache import load_or_convert_params

    return load_or_convert_params(ModelConfig.from_dir(model_dir), cache)[0]


@pytest.mark.parametrize("component,source", [("flow", "parquet"), ("llm", "jsonl")])
def test_finetune_then_synthesize(tmp_path, demo_dir, component, source):
    from cosyjax.cli import main
    from cosyjax.train.checkpoint import latest_step, load_params, read_meta

    data = write_list(tmp_path, make_rows()) if source == "parquet" else write_manifest(tmp_path)
    out = str(tmp_path / "out")
    argv = ["finetune", "--model-dir", demo_dir, "--data", data, "--component", component, "--steps", "3",
            "--out", out, "--save-every", "2", "--lr", "1e-2", "--no-progress"]
    if component == "llm":
        argv += ["--lora-rank", "2"]
    assert main(argv) == 0
    meta = read_meta(out)
    assert meta["component"] == component and meta["steps"] == 3 and bool(meta["lora"]) == (component == "llm")
    assert latest_step(out) == 3  # step 2 and the final step
    cache = str(tmp_path / "cache")
    base = _base_params(demo_dir, cache)
    tuned = load_params(out, base)
    assert set(tuned) == set(base)
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                   zip(jax_leaves(tuned[component]), jax_leaves(base[component])))
    wav = _synth(demo_dir, tuned, cache)
    assert wav.shape[1] > 0 and np.all(np.isfinite(wav))
    if component == "flow":  # same LLM tokens, new mel: the audio must change
        before = _synth(demo_dir, None, cache)
        assert before.shape == wav.shape and not np.allclose(before, wav)


def test_finetune_bad_data_is_a_clean_error(tmp_path, demo_dir, capsys):
    from cosyjax.cli import main

    rows = make_rows()
    rows[0]["speech_token"][0] = -5
    rc = main(["finetune", "--model-dir", demo_dir, "--data", write_list(tmp_path, rows), "--component", "flow",
               "--steps", "1", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc != 0 and "utterance 0 (utt0): speech_token ids [-5]" in capsys.readouterr().err


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def test_resume_flag_continues(tmp_path, demo_dir):
    from cosyjax.cli import main
    from cosyjax.train.checkpoint import read_meta

    data = write_list(tmp_path, make_rows())
    out = str(tmp_path / "out")
    base = ["finetune", "--model-dir", demo_dir, "--data", data, "--component", "flow", "--out", out,
            "--save-every", "1", "--no-progress"]
    assert main(base + ["--steps", "1"]) == 0
    assert main(base + ["--steps", "2", "--resume"]) == 0
    assert read_meta(out)["steps"] == 2
    assert json.load(open(os.path.join(out, "finetune.json")))["train"]["seed"] == 0
