"""Bad LLM inputs give clear `LLMInputError`s (a ValueError) before anything is compiled."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from convert.registry import convert_component
from cosyjax.config import ModelConfig
from cosyjax.llm import generate as G
from cosyjax.llm.config import LLMConfig, LLMConfigError
from cosyjax.llm.speech_lm import LLMInputError, filter_silent_tokens

from .conftest import model_dir


@functools.lru_cache(maxsize=None)
def _model(version):
    mc = ModelConfig.from_dir(model_dir(version))
    return convert_component("llm", mc), LLMConfig.from_model_config(mc)


KEY = jax.random.PRNGKey(0)


def test_cv3_needs_endofprompt():
    params, cfg = _model("cosyvoice3")
    with pytest.raises(LLMInputError, match="endofprompt"):
        G.generate(params, cfg, np.array([[11, 12, 13]]), prompt_text=np.array([[1, 2]]), key=KEY)
    # present in the prompt text or in the text is enough
    G.prepare(cfg, np.array([[11, 12]]), prompt_text=np.array([[1, 151646]]), key=KEY)
    G.prepare(cfg, np.array([[151646, 11, 12]]), key=KEY)


def test_empty_text():
    params, cfg = _model("cosyvoice2")
    with pytest.raises(LLMInputError, match="empty"):
        G.generate(params, cfg, np.zeros((1, 0), np.int32), key=KEY)
    with pytest.raises(LLMInputError, match="empty"):
        G.generate(params, cfg, np.array([[5, 6], [7, 8]]), text_len=np.array([2, 0]), key=KEY)


@pytest.mark.parametrize("field,value,match", [
    ("text", np.array([[5, 2048]]), "text row 0"),  # tiny cv2 text vocab is 2048
    ("text", np.array([[-1, 5]]), "text row 0"),
    ("prompt_text", np.array([[3, 99999]]), "prompt_text"),
    ("prompt_speech_token", np.array([[1, 6561]]), r"prompt_speech_token.*\[0, 6561\)"),
])
def test_ids_out_of_range(field, value, match):
    params, cfg = _model("cosyvoice2")
    kw = {"text": np.array([[5, 6, 7]])}
    kw[field] = value
    with pytest.raises(LLMInputError, match=match):
        G.generate(params, cfg, key=KEY, **kw)


def test_shapes_lengths_and_dtypes():
    params, cfg = _model("cosyvoice2")
    with pytest.raises(LLMInputError, match=r"\[B, T\]"):
        G.generate(params, cfg, np.zeros((1, 2, 3), np.int32), key=KEY)
    with pytest.raises(LLMInputError, match="integer"):
        G.generate(params, cfg, np.array([[1.5, 2.0]]), key=KEY)
    with pytest.raises(LLMInputError, match="lengths"):
        G.generate(params, cfg, np.array([[1, 2]]), text_len=np.array([3]), key=KEY)
    with pytest.raises(LLMInputError, match="batch"):
        G.generate(params, cfg, np.array([[1, 2]]), prompt_text=np.array([[1], [2]]), key=KEY)


def test_prompt_longer_than_cache():
    params, cfg = _model("cosyvoice2")
    speech = np.arange(100)[None] % 6561
    with pytest.raises(LLMInputError, match="cache_len"):
        G.generate(params, cfg, np.array([[1, 2, 3]]), prompt_speech_token=speech, key=KEY, cache_len=64)
    with pytest.raises(LLMInputError, match="cache_len"):  # prompt fits, prompt + max_len does not
        G.generate(params, cfg, np.array([[1, 2, 3]]), prompt_speech_token=speech[:, :50], key=KEY, cache_len=64)
    with pytest.raises(LLMInputError, match="max_position_embeddings"):
        G.generate(params, cfg.replace(max_position_embeddings=64), np.array([[1, 2, 3]]),
                   prompt_speech_token=speech, key=KEY)


def test_sampling_arguments():
    params, cfg = _model("cosyvoice2")
    text = np.array([[1, 2]])
    with pytest.raises(LLMInputError, match="key"):
        G.generate(params, cfg, text)  # ras without key or uniforms
    with pytest.raises(LLMInputError, match="sampling"):
        G.generate(params, cfg, text, sampling="beam", key=KEY)
    with pytest.raises(LLMInputError, match="uniforms cover"):
        G.generate(params, cfg, text, uniforms=np.full((10, 2), 0.5))  # max_len = 40 calls
    with pytest.raises(LLMInputError, match=r"\[0, 1\)"):
        G.generate(params, cfg, text, uniforms=np.full((40, 2), 1.0))
    with pytest.raises(LLMInputError, match="rows"):
        G.generate(params, cfg, text, key=jax.random.split(KEY, 3))
    with pytest.raises(LLMInputError, match="min_len"):
        G.generate(params, cfg, text, key=KEY, min_len=-1)
    with pytest.raises(LLMInputError, match="hop"):
        next(G.generate_stream(params, cfg, text, key=KEY, hop=0))


def test_params_of_the_other_version():
    params2, _ = _model("cosyvoice2")
    _, cfg3 = _model("cosyvoice3")
    with pytest.raises(LLMInputError, match="speech_embedding"):
        G.generate(params2, cfg3, np.array([[151646, 3]]), key=KEY)


def test_config_errors():
    _, cfg = _model("cosyvoice2")
    with pytest.raises(LLMConfigError, match="min_len_mask"):
        cfg.replace(min_len_mask="eos")
    with pytest.raises(LLMConfigError, match="version"):
        cfg.replace(version="cosyvoice1")


def test_silent_token_filter():
    _, cfg3 = _model("cosyvoice3")
    _, cfg2 = _model("cosyvoice2")
    toks = [5] + [1] * 8 + [7, 2, 2]
    assert filter_silent_tokens(cfg3, toks) == [5] + [1] * 5 + [7, 2, 2]
    assert filter_silent_tokens(cfg2, toks) == toks
