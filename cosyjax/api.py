"""High-level API mirroring upstream's `CosyVoice2` / `CosyVoice3` classes (`cosyvoice/cli/cosyvoice.py`).

```python
from cosyjax.api import CosyVoice
tts = CosyVoice.from_pretrained("pretrained_models/Fun-CosyVoice3-0.5B")
for out in tts.inference_zero_shot("Hello there.", "You are a helpful assistant.<|endofprompt|>Prompt words.",
                                   "prompt.wav", stream=False):
    audio = out["tts_speech"]          # float32 [1, N] at tts.sample_rate (24 kHz)
```

Methods keep upstream's names and arguments (`inference_sft`, `inference_zero_shot`,
`inference_cross_lingual`, `inference_instruct2`, `inference_vc`, `add_zero_shot_spk`,
`list_available_spks`) and are generators yielding `{'tts_speech': [1, N]}` per text segment
(or per streaming chunk). Extra keyword `seed` (int) or `key` (jax key) sets the randomness of
LLM sampling and of the CosyVoice2 vocoder noise.

`prompt_wav` may be an audio path / `(samples, rate)`, a prompt-features `.npz` (see
`cosyjax.prompt.PrecomputedPrompt`), a `PrecomputedPrompt` or the frontend's `PromptFeatures`: model folders without the campplus /
speech-tokenizer ONNX models (e.g. the tiny demo folder) need the precomputed speech tokens and
speaker embedding.
"""
from __future__ import annotations
from cosyjax.errors import CosyJaxError

import collections.abc
import logging
import os
import sys
import time
from typing import Iterator, Optional, Sequence

import numpy as np

from cosyjax.config import ModelConfig, ModelFolderError
from cosyjax.prompt import PrecomputedPrompt, Prompt, PromptError, is_prompt_npz

__all__ = ["CosyVoice", "Prompt", "PrecomputedPrompt", "convert_model_dir", "describe_model_dir", "APIError"]

log = logging.getLogger("cosyjax")

_SPEECH_TOKENIZER = {"cosyvoice2": "speech_tokenizer_v2.onnx", "cosyvoice3": "speech_tokenizer_v3.onnx"}
_CAMPPLUS = "campplus.onnx"


class APIError(CosyJaxError):
    """A request the API cannot serve (missing files for a mode, bad arguments)."""


def _seed_key(seed=None, key=None):
    import jax

    if key is not None:
        return key
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    return jax.random.PRNGKey(int(seed))


class CosyVoice:
    """A loaded CosyVoice2 / CosyVoice3 model folder (parameters on the default JAX device)."""

    def __init__(self, model_config: ModelConfig, engine, frontend):
        self.model_config = model_config
        self.model_dir = model_config.model_dir
        self.version = model_config.version
        self.sample_rate = model_config.sample_rate
        self.engine = engine
        self.frontend = frontend

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_dir: str, dtype: str = "float32", attention: str = "auto", *,
                        cache_dir: Optional[str] = None, use_cache: bool = True, sampling: str = "ras",
                        text_engine: str = "auto", progress: bool = False, devices=None,
                        params=None) -> "CosyVoice":
        """Load a model folder; converts llm.pt / flow.pt / hift.pt on first use and caches the orbax
        checkpoint (`cache_dir`, default `$COSYJAX_CACHE` or `~/.cache/cosyjax`; keyed by the files'
        sizes and mtimes).

        dtype: 'float32' | 'bfloat16' for the LLM and flow (HiFT stays float32).
        attention: 'auto' | 'xla' | 'cudnn' | 'pallas' (optionally '@gpu' etc., see cosyjax.nn.attention). sampling: 'ras' (upstream) | 'greedy'.
        text_engine: text normaliser ('auto' | 'wetext' | 'ttsfrd' | 'none').
        devices: shard batches (`synthesize_batch`) over this many devices / this mesh ('data' axis).
        params: a `cosyjax finetune` output folder (its parameters replace the folder's, merged with LoRA).
        """
        from cosyjax.frontend.model_inputs import Frontend
        from cosyjax.model_cache import load_or_convert_params
        from cosyjax.pipeline import Engine, PipelineConfig

        from cosyjax.nn.numerics import Numerics

        Numerics(dtype=dtype, attention=attention)  # validates both with a clear error
        if sampling not in ("ras", "greedy"):
            raise APIError(f"sampling must be 'ras' or 'greedy', got {sampling!r}")
        if not os.path.isdir(model_dir):
            raise ModelFolderError(f"model folder not found: {model_dir} (cosyjax does not download models; "
                                   "fetch the CosyVoice2-0.5B / Fun-CosyVoice3-0.5B folder first)")
        say = (lambda s: print(s, file=sys.stderr)) if progress else log.info
        mc = ModelConfig.from_dir(model_dir)
        base, _ = load_or_convert_params(mc, cache_dir, use_cache=use_cache, log=say)
        if params is not None:
            from cosyjax.train.checkpoint import load_params

            if not os.path.isdir(os.fspath(params)):
                raise APIError(f"params: fine-tuned output folder not found: {params}")
            base = load_params(os.fspath(params), base)
        engine = Engine(base, PipelineConfig.from_model_config(mc, dtype=dtype, attention=attention,
                                                               sampling=sampling), devices=devices)
        return cls(mc, engine, Frontend.from_model_dir(mc.model_dir, text_frontend=text_engine))

    # ------------------------------------------------------------------------------------ frontend
    def _check_tokenizer(self):
        from cosyjax.frontend.tokenizer import TextTokenizer

        missing = TextTokenizer.required_files(os.path.join(self.model_dir, "CosyVoice-BlankEN"))
        if missing:
            raise APIError(f"{self.model_dir}/CosyVoice-BlankEN lacks the text tokenizer ({', '.join(missing)}): "
                           "text modes need it (cosyjax.demo.build_demo_model_dir makes a demo folder with one)")

    def text_normalize(self, text, split: bool = True, text_frontend: bool = True):
        """Upstream `frontend.text_normalize`: list of segments (split=True) or the normalised string.

        A generator of text pieces (bistream input) is passed through unnormalised as one segment, as upstream
        does; it is accepted only as the text to speak (split=True)."""
        if isinstance(text, collections.abc.Iterator):
            if not split:
                raise APIError("a text generator can only be the text to speak (tts_text), not a prompt or "
                               "instruct text: pass a str")
            log.info("tts_text is a generator: bistream input, text normalisation skipped (as upstream)")
            return [text]
        if not isinstance(text, str):
            raise APIError(f"text must be a str or a generator of str pieces, got {type(text).__name__}")
        self._check_tokenizer()
        return self.frontend.text_normalize(text, split=split, text_frontend=text_frontend)

    def _need_onnx(self, name: str, what: str):
        if not os.path.isfile(os.path.join(self.model_dir, name)):
            raise PromptError(
                f"{self.model_dir} has no {name}: {what} from audio needs it. Copy it from the released model "
                "folder, or pass precomputed features (a prompt .npz with speech_token / speech_feat / embedding, "
                "or --prompt-speech-tokens / --prompt-embedding)")

    def prompt_features(self, prompt_wav) -> Prompt:
        """The complete `Prompt` (tokens [P], mel [F, 80], embedding [192]; unaligned) of a prompt given as audio
        (path / `(samples, rate)`), a prompt `.npz` or a `Prompt` (`Frontend.prepare_prompt`)."""
        if prompt_wav is None:
            raise APIError("this mode needs a prompt (prompt_wav)")
        if isinstance(prompt_wav, collections.abc.Iterator):
            raise APIError("prompt_wav cannot be a generator: give a path, (samples, rate), a prompt .npz or a Prompt")
        return self.frontend.prepare_prompt(prompt_wav)

    def _source_tokens(self, source_wav) -> np.ndarray:
        if isinstance(source_wav, Prompt) or is_prompt_npz(source_wav):
            pre = source_wav if isinstance(source_wav, Prompt) else Prompt.load(source_wav)
            if pre.speech_token is None:
                raise PromptError("source features need speech_token")
            return pre.speech_token.reshape(1, -1)
        self._need_onnx(_SPEECH_TOKENIZER[self.version], "voice conversion (source speech tokens)")
        return self.frontend.extract_speech_token(source_wav, what="source")[0]

    # ------------------------------------------------------------------------------ model inputs
    def frontend_zero_shot(self, tts_text, prompt_text, prompt_wav, zero_shot_spk_id=""):
        self._check_tokenizer()
        prompt = None if zero_shot_spk_id else self.prompt_features(prompt_wav)
        return self.frontend.frontend_zero_shot(tts_text, prompt_text, prompt, self.sample_rate, zero_shot_spk_id)

    def frontend_cross_lingual(self, tts_text, prompt_wav, zero_shot_spk_id=""):
        self._check_tokenizer()
        prompt = None if zero_shot_spk_id else self.prompt_features(prompt_wav)
        return self.frontend.frontend_cross_lingual(tts_text, prompt, self.sample_rate, zero_shot_spk_id)

    def frontend_instruct2(self, tts_text, instruct_text, prompt_wav, zero_shot_spk_id=""):
        self._check_tokenizer()
        prompt = None if zero_shot_spk_id else self.prompt_features(prompt_wav)
        return self.frontend.frontend_instruct2(tts_text, instruct_text, prompt, self.sample_rate, zero_shot_spk_id)

    def frontend_sft(self, tts_text, spk_id):
        self._check_tokenizer()
        if spk_id not in self.frontend.spk2info:
            raise APIError(f"unknown speaker {spk_id!r}; available: {self.list_available_spks()}")
        return self.frontend.frontend_sft(tts_text, spk_id)

    def frontend_vc(self, source_wav, prompt_wav):
        prompt = self.prompt_features(prompt_wav)
        tok = self._source_tokens(source_wav)
        return {"source_speech_token": tok, "source_speech_token_len": np.array([tok.shape[1]], np.int32),
                "flow_prompt_speech_token": prompt.speech_token[None],
                "flow_prompt_speech_token_len": np.array([prompt.speech_token.shape[0]], np.int32),
                "prompt_speech_feat": prompt.speech_feat[None],
                "prompt_speech_feat_len": np.array([prompt.speech_feat.shape[0]], np.int32),
                "flow_embedding": prompt.embedding[None]}

    # ------------------------------------------------------------------------------------ speakers
    def list_available_spks(self) -> list[str]:
        return self.frontend.list_available_spks()

    def add_zero_shot_spk(self, prompt_text, prompt_wav, zero_shot_spk_id) -> bool:
        self._check_tokenizer()
        return self.frontend.add_zero_shot_spk(prompt_text, self.prompt_features(prompt_wav), zero_shot_spk_id)

    def save_spkinfo(self, path=None) -> str:
        return self.frontend.save_spkinfo(path)

    # ------------------------------------------------------------------------------------ synthesis
    def tts(self, model_input: dict, stream: bool = False, speed: float = 1.0, key=None,
            records: Optional[list] = None, incremental: bool = True,
            llm_kwargs: Optional[dict] = None) -> Iterator[dict]:
        """`CosyVoice2Model.tts`: one model_input -> yields {'tts_speech': float32 [1, N]} (streaming: per chunk,
        with 'work' = {'flow_frames', 'vocoder_frames'} computed for it). incremental=False streams by
        recomputing the prefix every chunk (upstream's algorithm; the reference). llm_kwargs: extra LLM
        arguments (min_len / max_len; for bistream text max_final_len, cache_len)."""
        if speed <= 0:
            raise APIError(f"speed must be > 0, got {speed}")
        yield from self.engine.generate(model_input, stream=stream, speed=speed, key=_seed_key(key=key),
                                        records=records, incremental=incremental, llm_kwargs=llm_kwargs)

    def _run(self, segments, build, stream, speed, seed, key, incremental=True, llm_kwargs=None):
        import jax

        from tqdm import tqdm

        key = _seed_key(seed, key)
        for i, seg in enumerate(tqdm(segments, disable=not log.isEnabledFor(logging.INFO), file=sys.stderr)):
            mi = build(seg)
            t0 = time.time()
            for out in self.tts(mi, stream=stream, speed=speed, key=jax.random.fold_in(key, i),
                                incremental=incremental, llm_kwargs=llm_kwargs):
                n = out["tts_speech"].shape[1] / self.sample_rate
                log.info("yield speech len %.2f s, rtf %.3f", n, (time.time() - t0) / max(n, 1e-9))
                yield out
                t0 = time.time()

    def inference_sft(self, tts_text, spk_id, stream=False, speed=1.0, text_frontend=True, *, seed=None, key=None,
                      incremental=True, llm_kwargs=None):
        segs = self.text_normalize(tts_text, split=True, text_frontend=text_frontend)
        yield from self._run(segs, lambda s: self.frontend_sft(s, spk_id), stream, speed, seed, key, incremental,
                             llm_kwargs)

    def inference_zero_shot(self, tts_text, prompt_text, prompt_wav, zero_shot_spk_id="", stream=False, speed=1.0,
                            text_frontend=True, *, seed=None, key=None,
                      incremental=True, llm_kwargs=None):
        prompt_text = self.text_normalize(prompt_text, split=False, text_frontend=text_frontend)
        segs = self.text_normalize(tts_text, split=True, text_frontend=text_frontend)
        if not zero_shot_spk_id:
            prompt_wav = self.prompt_features(prompt_wav)  # extract once for all segments
        for s in segs:
            if isinstance(s, str) and len(s) < 0.5 * len(prompt_text):
                log.warning("synthesis text %s too short than prompt text %s, this may lead to bad performance",
                            s, prompt_text)
        yield from self._run(segs, lambda s: self.frontend_zero_shot(s, prompt_text, prompt_wav, zero_shot_spk_id),
                             stream, speed, seed, key, incremental, llm_kwargs)

    def inference_cross_lingual(self, tts_text, prompt_wav, zero_shot_spk_id="", stream=False, speed=1.0,
                                text_frontend=True, *, seed=None, key=None,
                      incremental=True, llm_kwargs=None):
        segs = self.text_normalize(tts_text, split=True, text_frontend=text_frontend)
        if not zero_shot_spk_id:
            prompt_wav = self.prompt_features(prompt_wav)
        yield from self._run(segs, lambda s: self.frontend_cross_lingual(s, prompt_wav, zero_shot_spk_id),
                             stream, speed, seed, key, incremental, llm_kwargs)

    def inference_instruct2(self, tts_text, instruct_text, prompt_wav, zero_shot_spk_id="", stream=False, speed=1.0,
                            text_frontend=True, *, seed=None, key=None,
                      incremental=True, llm_kwargs=None):
        segs = self.text_normalize(tts_text, split=True, text_frontend=text_frontend)
        if not zero_shot_spk_id:
            prompt_wav = self.prompt_features(prompt_wav)
        yield from self._run(segs, lambda s: self.frontend_instruct2(s, instruct_text, prompt_wav, zero_shot_spk_id),
                             stream, speed, seed, key, incremental, llm_kwargs)

    def inference_vc(self, source_wav, prompt_wav, stream=False, speed=1.0, *, seed=None, key=None, incremental=True,
                     llm_kwargs=None):
        if isinstance(source_wav, collections.abc.Iterator):
            raise APIError("source_wav cannot be a generator: voice conversion needs the whole source audio")
        yield from self._run([None], lambda _: self.frontend_vc(source_wav, prompt_wav), stream, speed, seed, key,
                             incremental, llm_kwargs)

    def inference_instruct(self, *args, **kwargs):
        raise APIError("inference_instruct is only implemented for CosyVoice-300M; use inference_instruct2")

    # ------------------------------------------------------------------------------------ batched
    def synthesize_batch(self, requests: Sequence[tuple[str, dict]], seeds: Optional[Sequence[int]] = None,
                         speed: float = 1.0, text_frontend: bool = True, progress: bool = False) -> list[np.ndarray]:
        """Many requests through the jitted batched pipeline (`cosyjax.pipeline.synthesize`).

        requests: (mode, kwargs) with mode in zero_shot / cross_lingual / instruct2 and the kwargs of the
        matching `inference_*` method. Each request's text is split into segments as upstream; all
        segments of all requests run as one padded batch. Returns one float32 [N] array per request.
        """
        import jax

        builders = {"zero_shot": lambda kw, s: self.frontend_zero_shot(
                        s, self.text_normalize(kw["prompt_text"], split=False, text_frontend=text_frontend),
                        kw.get("prompt_wav"), kw.get("zero_shot_spk_id", "")),
                    "cross_lingual": lambda kw, s: self.frontend_cross_lingual(s, kw.get("prompt_wav"),
                                                                              kw.get("zero_shot_spk_id", "")),
                    "instruct2": lambda kw, s: self.frontend_instruct2(s, kw["instruct_text"], kw.get("prompt_wav"),
                                                                      kw.get("zero_shot_spk_id", ""))}
        inputs, owner = [], []
        for r, (mode, kw) in enumerate(requests):
            if mode not in builders:
                raise APIError(f"batched synthesis supports zero_shot, cross_lingual and instruct2, not {mode!r}")
            kw = dict(kw)
            if kw.get("prompt_wav") is not None and not kw.get("zero_shot_spk_id"):
                kw["prompt_wav"] = self.prompt_features(kw["prompt_wav"])
            if isinstance(kw.get("tts_text"), collections.abc.Iterator):
                raise APIError(f"request {r}: a text generator (bistream) cannot be batched; use inference_{mode}")
            for s in self.text_normalize(kw["tts_text"], split=True, text_frontend=text_frontend):
                inputs.append(builders[mode](kw, s))
                owner.append(r)
        seeds = list(seeds) if seeds is not None else list(range(len(requests)))
        keys = [jax.random.fold_in(jax.random.PRNGKey(int(seeds[o])), sum(1 for x in owner[:i] if x == o))
                for i, o in enumerate(owner)]
        t0 = time.time()
        audios = self.engine.synthesize_batch(inputs, keys, speed=speed)
        if progress:
            total = sum(a.shape[-1] for a in audios) / self.sample_rate
            print(f"batch of {len(inputs)} segments: {total:.2f} s of audio in {time.time() - t0:.2f} s",
                  file=sys.stderr)
        out = [[] for _ in requests]
        for o, a in zip(owner, audios):
            out[o].append(np.asarray(a).reshape(-1))
        return [np.concatenate(x) if x else np.zeros(0, np.float32) for x in out]


def convert_model_dir(model_dir: str, cache_dir: Optional[str] = None, out: Optional[str] = None,
                      force: bool = False) -> str:
    """Convert the folder's checkpoints and store them (cache or `out`); returns the checkpoint folder."""
    from cosyjax.model_cache import load_or_convert_params

    mc = ModelConfig.from_dir(model_dir)
    _, where = load_or_convert_params(mc, cache_dir, force=force or bool(out), out=out,
                                      log=lambda s: print(s, file=sys.stderr))
    return where


def describe_model_dir(model_dir: str) -> dict:
    """Version, sizes and which optional files are present (no weights are read)."""
    from cosyjax.model_cache import params_cache_dir

    mc = ModelConfig.from_dir(model_dir)
    q = mc.qwen
    files = {n: os.path.isfile(os.path.join(mc.model_dir, n))
             for n in ("llm.pt", "flow.pt", "hift.pt", _CAMPPLUS, _SPEECH_TOKENIZER[mc.version], "spk2info.pt")}
    blank = os.path.join(mc.model_dir, "CosyVoice-BlankEN")
    tok = all(os.path.isfile(os.path.join(blank, n)) for n in ("vocab.json", "merges.txt")) or \
        os.path.isfile(os.path.join(blank, "tokenizer.json"))
    cache = params_cache_dir(mc)
    modes = []
    if tok:
        modes += ["cross_lingual", "zero_shot", "instruct2"] + (["sft"] if files["spk2info.pt"] else [])
    modes += ["vc"]
    onnx_ok = files[_CAMPPLUS] and files[_SPEECH_TOKENIZER[mc.version]]
    return {
        "model_dir": mc.model_dir,
        "version": mc.version,
        "sample_rate": mc.sample_rate,
        "llm": f"Qwen2 hidden {q.hidden_size}, {q.num_hidden_layers} layers, text vocab {q.vocab_size}" if q else "?",
        "flow": mc.yaml["flow"].class_name,
        "hift": mc.yaml["hift"].class_name,
        "files": ", ".join(f"{n}{'' if ok else ' (missing)'}" for n, ok in files.items()),
        "text_tokenizer": "yes" if tok else "missing (CosyVoice-BlankEN/vocab.json, merges.txt)",
        "prompt_from_audio": "yes" if onnx_ok else
            f"no: needs {_CAMPPLUS} and {_SPEECH_TOKENIZER[mc.version]}; use precomputed prompt features (.npz)",
        "modes": ", ".join(modes),
        "converted_cache": cache if os.path.isdir(cache) else "not converted yet",
    }
