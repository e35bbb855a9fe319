"""Bistream text through the API: `inference_zero_shot(text=<generator>)` on the demo folder, as upstream.

Upstream (`cosyvoice/cli/cosyvoice.py`) passes a generator tts_text through `text_normalize` unchanged, the
frontend turns it into a generator of [1, 1] ids, and `llm_job` runs `inference_bistream`. A generator where
it cannot go (prompt text, voice-conversion source, a batch) is a one-line error.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from cosyjax.errors import CosyJaxError

PROMPT_TEXT = "You are a helpful assistant.<|endofprompt|>Hello, this is the prompt voice."


@pytest.fixture(scope="module")
def tts(tmp_path_factory):
    from cosyjax.api import CosyVoice
    from cosyjax.demo import build_demo_model_dir

    work = tmp_path_factory.mktemp("bistream")
    model_dir = build_demo_model_dir("cosyvoice3", str(work / "demo"))
    return CosyVoice.from_pretrained(model_dir, cache_dir=str(work / "cache"), sampling="greedy")


def _prompt(tts):
    return os.path.join(tts.model_dir, "demo_prompt.npz")


def _pieces():
    return (t for t in ["Hello", " there."])


def test_bistream_generator_through_inference_zero_shot(tts):
    from cosyjax.llm.bistream import generate_bistream

    # the tiny random LLM never samples eos: cap the final decode so the test is short
    outs = list(tts.inference_zero_shot(_pieces(), PROMPT_TEXT, _prompt(tts), seed=0,
                                        llm_kwargs={"max_final_len": 30}))
    assert len(outs) == 1
    audio = outs[0]["tts_speech"]
    assert audio.dtype == np.float32 and audio.ndim == 2 and audio.shape[1] > 0
    assert np.all(np.isfinite(audio)) and audio.shape[1] % 480 == 0
    # the tokens the flow got are the bistream LLM's tokens: compare against the LLM alone
    mi = tts.frontend_zero_shot(_pieces(), PROMPT_TEXT, _prompt(tts))
    eng = tts.engine
    toks = list(generate_bistream(eng.params["llm"], eng.config.llm, mi["text"], mi["prompt_text"],
                                  mi["llm_prompt_speech_token"], sampling="greedy", max_final_len=30))
    assert audio.shape[1] == len(toks) * 2 * 480  # CV3 silent filter aside (greedy tiny model: none here)
    # streaming works with a generator too, and yields the same number of samples
    chunks = list(tts.inference_zero_shot(_pieces(), PROMPT_TEXT, _prompt(tts), seed=0, stream=True,
                                          llm_kwargs={"max_final_len": 30}))
    assert sum(c["tts_speech"].shape[1] for c in chunks) == audio.shape[1]


def test_generator_where_it_cannot_go(tts):
    with pytest.raises(CosyJaxError, match="only be the text to speak"):
        list(tts.inference_zero_shot("Hello.", (t for t in ["a", "b"]), _prompt(tts)))
    with pytest.raises(CosyJaxError, match="cannot be a generator"):
        list(tts.inference_vc((t for t in ["x"]), _prompt(tts)))
    with pytest.raises(CosyJaxError, match="cannot be batched"):
        tts.synthesize_batch([("zero_shot", dict(tts_text=_pieces(), prompt_text=PROMPT_TEXT,
                                                 prompt_wav=_prompt(tts)))])
