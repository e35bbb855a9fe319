"""Text tokens -> speech: LLM -> (silent filter) -> flow -> HiFT.

Two ways to run it:

* `synthesize(params, inputs, key, config) -> (wav [B, S], wav_len [B])`: the pure, jittable batched
  core (static shapes; lengths as masks). `inputs` come from `prepare_inputs` (host side: prompt
  layout, buckets) and every row gets the audio it would get alone. Usable under `jax.jit` and
  `jax.vmap`.
* `Engine`: the host-side driver used by the API: per-request non-streaming and streaming synthesis
  with upstream's schedule (`cosyjax.streaming`), exact (unpadded) lengths for each component call,
  and `synthesize_batch` over the jitted core.

Randomness: one key per request, split into (LLM sampling, vocoder noise); CosyVoice2's HiFT draws
fresh noise at every call (key folded with the call index), CosyVoice3's uses a fixed buffer.
"""
from __future__ import annotations
from cosyjax.errors import CosyJaxError

import dataclasses
import functools
import importlib
from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.pipeline_ops import filter_silent_batch, length_mask, resize_linear
from cosyjax.streaming import MAX_SILENT_RUN, StreamConfig, make_token2wav, run_tts

__all__ = ["PipelineConfig", "Engine", "prepare_inputs", "synthesize", "synthesize_rows", "PipelineInputError"]


class PipelineInputError(CosyJaxError):
    """A model_input the pipeline cannot run (missing keys, bad shapes)."""


def _flow_module(version: str):
    return importlib.import_module("cosyjax.flow.cv2.model" if version == "cosyvoice2" else "cosyjax.flow.cv3.model")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Static configuration (hashable: a `jax.jit` static argument)."""

    version: str
    llm: Any  # LLMConfig
    flow: Any  # FlowCV2Config | FlowCV3Config
    hift: Any  # HiFTConfig
    sampling: str = "ras"
    dtype: str = "float32"
    attention: str = "auto"
    stream: StreamConfig = StreamConfig()
    # static sizes of one compiled `synthesize` program (filled in by `prepare_inputs`)
    max_new: int = 0  # LLM output slots
    capacity: int = 0  # LLM KV-cache capacity
    flow_tokens: int = 0  # flow bucket (prompt + new tokens)
    speed: float = 1.0

    @property
    def silent_tokens(self) -> tuple[int, ...]:
        return tuple(self.llm.silent_tokens)

    @property
    def samples_per_frame(self) -> int:
        return self.hift.upsample_scale

    @classmethod
    def from_model_config(cls, mc, dtype: str = "float32", attention: str = "auto", sampling: str = "ras"):
        from convert.registry import component_module
        from cosyjax.llm.config import LLMConfig

        llm = LLMConfig.from_model_config(mc, dtype=dtype, attention_impl=attention)
        flow = component_module("flow").config_from(mc)
        hift = component_module("hift").config_from(mc)
        return cls(version=mc.version, llm=llm, flow=flow, hift=hift, sampling=sampling, dtype=dtype,
                   attention=attention,
                   stream=StreamConfig(token_mel_ratio=mc.token_mel_ratio, samples_per_frame=hift.upsample_scale,
                                       pre_lookahead_len=int(flow.pre_lookahead_len)))


def _prepare_params(params: dict, config: PipelineConfig) -> dict:
    from cosyjax.llm.speech_lm import cast_params

    llm = params["llm"]
    if config.dtype != "float32":
        llm = cast_params(llm, config.dtype)
    return jax.device_put({"llm": llm, "flow": params["flow"], "hift": params["hift"]})


# =============================================================================================
# vocoder adapter (cosyjax.hift.vocoder)

def _vocoder():
    return importlib.import_module("cosyjax.hift.vocoder")


def vocode_core(hift_params, cfg, mel, mel_len, key):
    """Traceable HiFT on a padded batch: mel [B, T, 80], mel_len [B] -> wav [B, T*480] (zero past the end).

    `cosyjax.hift.vocoder.vocode_padded` (traceable; its f0 stage runs under a local x64 context,
    CosyVoice3's f0 predictor being float64 upstream). Noise comes from `key` (CosyVoice2: Gaussian
    per call; CosyVoice3: the fixed buffer, key unused).
    """
    lengths = jnp.maximum(mel_len, 1).astype(jnp.int32)
    wav, _ = _vocoder().vocode_padded(hift_params, cfg, mel, lengths, finalize=True,
                                      key=None if cfg.causal else key)
    return wav


# =============================================================================================
# the jittable batched core

def prepare_inputs(config: PipelineConfig, model_inputs: Sequence[dict], keys=None, *, speed: float = 1.0,
                   max_len=None, min_len=None) -> tuple[dict, PipelineConfig]:
    """Host side: pack upstream-style model_input dicts into the padded arrays `synthesize` takes.

    Returns (inputs, config with the static sizes of this batch). keys: one jax key per row (only
    the LLM rows' sampling keys are derived from them here; `synthesize` takes its own key too).
    """
    from cosyjax.flow.inputs import seed0_noise_np
    from cosyjax.llm.generate import prepare

    B = len(model_inputs)
    if B == 0:
        raise PipelineInputError("no inputs")
    text, ptext, pspeech = [], [], []
    ftok, ffeat, femb = [], [], []
    for i, mi in enumerate(model_inputs):
        if "text" not in mi:
            raise PipelineInputError(f"input {i}: batched synthesis needs text (voice conversion is not batched)")
        text.append(_row(mi["text"]))
        ptext.append(_row(mi.get("prompt_text")))
        pspeech.append(_row(mi.get("llm_prompt_speech_token")))
        ftok.append(_row(mi.get("flow_prompt_speech_token")))
        feat = np.asarray(mi.get("prompt_speech_feat", np.zeros((1, 0, 80), np.float32)), np.float32)
        ffeat.append(feat.reshape(-1, feat.shape[-1]))
        emb = mi.get("flow_embedding")
        if emb is None or np.asarray(emb).size == 0:
            raise PipelineInputError(f"input {i}: flow_embedding (speaker embedding) is required")
        femb.append(np.asarray(emb, np.float32).reshape(-1))
    pad = lambda rows, dt: _pad_rows(rows, dt)  # noqa: E731
    text_a, text_l = pad(text, np.int32)
    pt_a, pt_l = pad(ptext, np.int32)
    ps_a, ps_l = pad(pspeech, np.int32)
    p = prepare(config.llm, text_a, text_l, pt_a, pt_l, ps_a, ps_l, key=jax.random.PRNGKey(0),
                sampling=config.sampling, max_len=max_len, min_len=min_len)
    # flow bucket: prompt + every token the LLM may produce
    flow_mod = _flow_module(config.version)
    P = np.array([len(r) for r in ftok])
    for i, (r, f) in enumerate(zip(ftok, ffeat)):
        if f.shape[0] != 2 * len(r):
            raise PipelineInputError(f"input {i}: prompt_speech_feat has {f.shape[0]} frames, flow prompt has "
                                     f"{len(r)} tokens (need 2 frames per token)")
    N = flow_mod.bucket_for(int((P + p.max_len).max()))
    T = N * config.flow.token_mel_ratio
    ftok_a = np.zeros((B, N), np.int32)
    cond = np.zeros((B, T, 80), np.float32)
    for b in range(B):
        ftok_a[b, :P[b]] = ftok[b]
        cond[b, :2 * P[b]] = ffeat[b]
    inputs = dict(llm_ids=p.ids, llm_kind=p.kind, llm_start=p.start, llm_min_len=p.min_len, llm_max_len=p.max_len,
                  flow_prompt_token=ftok_a, flow_prompt_len=P.astype(np.int32), flow_cond=cond,
                  flow_embedding=np.stack(femb), flow_noise=seed0_noise_np(T, 80))
    cfg = dataclasses.replace(config, max_new=p.max_new, capacity=p.capacity, flow_tokens=N, speed=float(speed))
    return inputs, cfg


def _row(x) -> np.ndarray:
    if x is None:
        return np.zeros(0, np.int32)
    a = np.asarray(x)
    if a.ndim == 2:
        if a.shape[0] != 1:
            raise PipelineInputError(f"expected one row, got shape {a.shape}")
        a = a[0]
    return a.astype(np.int32).reshape(-1)


def _pad_rows(rows, dtype):
    W = max(1, max(len(r) for r in rows))
    out = np.zeros((len(rows), W), dtype)
    for b, r in enumerate(rows):
        out[b, :len(r)] = r
    return out, np.array([len(r) for r in rows], np.int32)


def _llm_draws(config: PipelineConfig, key, B: int):
    """Sampling uniforms [B, max_new, 2] for the LLM program (greedy: unused placeholder)."""
    from cosyjax.llm.sampling import uniforms_from_keys

    if config.sampling == "greedy":
        return jnp.zeros((B, 1, 2), jnp.float32)
    return uniforms_from_keys(jax.random.split(key, B), config.max_new)


def synthesize(params, inputs: dict, key, config: PipelineConfig):
    """The whole pipeline on a padded batch -> (wav [B, S] float32 (zero past wav_len), wav_len [B] int32).

    params: {'llm', 'flow', 'hift'} trees; inputs / config: from `prepare_inputs`; key: one jax key
    (split into per-row LLM keys and the vocoder noise key). S = flow bucket frames x 480 / speed.
    Pure and traceable: wrap it in `jax.jit(..., static_argnames='config')` and/or `jax.vmap` (vmap
    the plain function, as `synthesize_rows` does: CosyVoice3's f0 stage is traced in a local x64
    context, which a vmap applied to an already-jitted wrapper would re-trace outside that context).
    """
    from cosyjax.llm.generate import generate_traced

    B = inputs["llm_ids"].shape[0]
    k_llm, k_voc = jax.random.split(key)
    k_voc = jax.random.fold_in(k_voc, 0)  # = the Engine's first (and only) vocoder call of a request
    tokens, n_tok = generate_traced(
        params["llm"], config.llm, inputs["llm_ids"], inputs["llm_kind"], inputs["llm_start"], inputs["llm_min_len"],
        inputs["llm_max_len"], _llm_draws(config, k_llm, B), method=config.sampling, max_new=config.max_new,
        capacity=config.capacity)
    tokens = jnp.maximum(tokens, 0)
    tokens, n_tok = filter_silent_batch(tokens, n_tok, config.silent_tokens, MAX_SILENT_RUN)
    # flow input: prompt tokens ++ generated tokens per row
    N = config.flow_tokens
    P = inputs["flow_prompt_len"]
    pos = jnp.arange(N)[None, :]
    gen_idx = jnp.clip(pos - P[:, None], 0, tokens.shape[1] - 1)
    gen = jnp.take_along_axis(tokens, gen_idx, axis=1)
    flow_tok = jnp.where(pos < P[:, None], inputs["flow_prompt_token"], gen)
    n_flow = P + n_tok
    flow_tok = jnp.where(pos < n_flow[:, None], flow_tok, 0)
    flow_mod = _flow_module(config.version)
    out = flow_mod.flow_core(params["flow"], flow_tok, n_flow, P, jnp.zeros_like(P), inputs["flow_cond"],
                             inputs["flow_embedding"], inputs["flow_noise"], cfg=config.flow, streaming=False,
                             dtype=config.dtype, attention_impl=config.attention)
    mel, mel_len = out["mel"], out["mel_len"]
    if config.speed != 1.0:
        T_out = int(np.ceil(mel.shape[1] / config.speed))
        new_len = jnp.floor(mel_len.astype(jnp.float32) / config.speed).astype(jnp.int32)
        mel = resize_linear(mel, mel_len, new_len, T_out)
        mel_len = new_len
    wav = vocode_core(params["hift"], config.hift, mel, mel_len, k_voc)
    wav_len = mel_len * config.samples_per_frame
    wav = jnp.where(length_mask(wav_len, wav.shape[1]), wav, 0.0)
    return wav, wav_len


# =============================================================================================
# host-side engine (exact lengths per call, streaming)

class Engine:
    """Runs model_input dicts through the components (one request at a time, or batched)."""

    def __init__(self, params: dict, config: PipelineConfig):
        self.config = config
        self.params = _prepare_params(params, config)
        # eager vocoder path: the CosyVoice3 f0 predictor as float64 on the device (upstream precision)
        self.hift_params = _vocoder().device_params(params["hift"], config.hift)
        self.flow_module = _flow_module(config.version)

    # ---- LLM -------------------------------------------------------------------------------
    def llm_inputs(self, mi: dict) -> dict:
        """The LLM inputs of one model_input as `cosyjax.llm.generate` keyword arguments:
        text, prompt_text, prompt_speech_token (int32 [1, n] each, empty rows where absent)."""
        return dict(text=_row(mi["text"])[None], prompt_text=_row(mi.get("prompt_text"))[None],
                    prompt_speech_token=_row(mi.get("llm_prompt_speech_token"))[None])

    def llm_tokens(self, mi: dict, key, **kw) -> np.ndarray:
        """All speech tokens of one request (before the silent filter) -> int32 [n]."""
        from cosyjax.llm.generate import generate

        toks, n = generate(self.params["llm"], self.config.llm, **self.llm_inputs(mi), key=key,
                           sampling=self.config.sampling, **kw)
        return np.asarray(toks)[0, :int(n[0])]

    def llm_generation(self, mi: dict, key, **kw):
        """`cosyjax.llm.generate.generate_detailed` for one request -> `Generation` (batch of 1).

        kw: its keyword arguments, e.g. record_topk, forced_tokens={step: token}, min_len / max_len,
        sampling (default: the engine's)."""
        from cosyjax.llm.generate import generate_detailed

        kw.setdefault("sampling", self.config.sampling)
        return generate_detailed(self.params["llm"], self.config.llm, **self.llm_inputs(mi), key=key, **kw)

    def llm_stream(self, mi: dict, key, hop: int = 16, **kw) -> Iterator[np.ndarray]:
        from cosyjax.llm.generate import generate_stream

        for rows in generate_stream(self.params["llm"], self.config.llm, **self.llm_inputs(mi), key=key,
                                    sampling=self.config.sampling, hop=hop, **kw):
            yield rows[0]

    # ---- flow --------------------------------------------------------------------------------
    def flow_fn(self, mi: dict):
        """FlowFn for `cosyjax.streaming`: (tokens [1, n], streaming, finalize) -> mel [1, T, 80] numpy."""
        ptok = _row(mi.get("flow_prompt_speech_token"))[None]
        feat = np.asarray(mi.get("prompt_speech_feat", np.zeros((1, 0, 80), np.float32)), np.float32)
        feat = feat.reshape(1, -1, feat.shape[-1])
        emb = np.asarray(mi["flow_embedding"], np.float32).reshape(1, -1)
        cfg, params = self.config, self.params["flow"]

        def flow(tokens, streaming, finalize):
            tokens = np.asarray(tokens, np.int32).reshape(1, -1)
            if tokens.shape[1] == 0:
                return np.zeros((1, 0, 80), np.float32)
            mel, _ = self.flow_module.flow_inference(
                params, cfg.flow, tokens, np.array([tokens.shape[1]]), ptok, np.array([ptok.shape[1]]), feat,
                np.array([feat.shape[1]]), emb, streaming=bool(streaming), finalize=bool(finalize),
                dtype=cfg.dtype, attention_impl=cfg.attention)
            return np.asarray(mel)

        return flow

    # ---- vocoder -----------------------------------------------------------------------------
    def vocoder_fn(self, key, noise_provider=None):
        """Vocoder callable for `CV2Token2Wav` / `CV3Token2Wav`.

        noise_provider(call_index, n_frames) -> dict of hift_inference keyword arguments (injected
        noise for parity); default: noise from `key` (CV2: folded with the call index).
        """
        voc = _vocoder()
        cfg, params = self.config, self.hift_params
        calls = [0]

        def extra(n_frames):
            i = calls[0]
            calls[0] += 1
            if noise_provider is not None:
                return noise_provider(i, n_frames)
            return {"key": jax.random.fold_in(key, i)} if not cfg.hift.causal else {}

        if cfg.version == "cosyvoice2":
            def vocoder(mel, cache_source):
                mel = np.asarray(mel, np.float32)
                if mel.shape[1] == 0:
                    return np.zeros((1, 0), np.float32), np.zeros((1, 0), np.float32)
                cs = np.asarray(cache_source, np.float32).reshape(1, -1)
                wav, source = voc.vocode(params, cfg.hift, mel, cache_source=cs if cs.size else None,
                                                 **extra(mel.shape[1]))
                return np.asarray(wav), np.asarray(source)
        else:
            def vocoder(mel, finalize):
                mel = np.asarray(mel, np.float32)
                if mel.shape[1] == 0:
                    return np.zeros((1, 0), np.float32)
                wav, _ = voc.vocode(params, cfg.hift, mel, finalize=bool(finalize), **extra(mel.shape[1]))
                return np.asarray(wav)
        return vocoder

    # ---- one request ---------------------------------------------------------------------------
    def tts(self, mi: dict, *, stream: bool = False, speed: float = 1.0, key=None, records: Optional[list] = None,
            tokens=None, noise_provider=None, llm_hop: int = 16, llm_kwargs: Optional[dict] = None
            ) -> Iterator[np.ndarray]:
        """`CosyVoice2Model.tts` for one model_input: yields float32 audio chunks [1, N].

        tokens: LLM tokens to use instead of running the LLM (an array, or an iterable delivering ints /
        int arrays over time); the silent-token filter still applies.
        llm_kwargs: extra `generate` arguments (e.g. min_len / max_len).
        """
        if key is None:
            key = jax.random.PRNGKey(0)
        k_llm, k_voc = jax.random.split(key)
        vc = "source_speech_token" in mi and _row(mi["source_speech_token"]).size > 0
        if "flow_embedding" not in mi:
            raise PipelineInputError("model_input lacks flow_embedding")
        if vc:
            token_iter = [_row(mi["source_speech_token"])]
            silent = ()
        else:
            if "text" not in mi:
                raise PipelineInputError("model_input lacks text")
            silent = self.config.silent_tokens
            if tokens is not None:  # an array, or any iterable of ints / int arrays (e.g. a recording LLM stream)
                token_iter = [np.asarray(tokens).reshape(-1)] if isinstance(tokens, (np.ndarray, jax.Array)) else tokens
            elif stream:
                token_iter = self.llm_stream(mi, k_llm, hop=llm_hop, **(llm_kwargs or {}))
            else:
                token_iter = [self.llm_tokens(mi, k_llm, **(llm_kwargs or {}))]
        t2w = make_token2wav(self.config.version, self.flow_fn(mi), self.vocoder_fn(k_voc, noise_provider),
                             self.config.stream)
        P = _row(mi.get("flow_prompt_speech_token")).size
        yield from run_tts(token_iter, t2w, P, stream=stream, speed=speed, silent_tokens=silent,
                           config=self.config.stream, records=records)

    # ---- batch -----------------------------------------------------------------------------------
    def synthesize_batch(self, model_inputs: Sequence[dict], keys, speed: float = 1.0,
                         max_len=None, min_len=None) -> list[np.ndarray]:
        """Non-streaming synthesis of many model_inputs with the jitted core -> list of float32 [1, N].

        Each row uses `keys[i]`: rows give the audio they would give alone in a batch of one.
        """
        inputs, cfg = prepare_inputs(self.config, model_inputs, speed=speed, max_len=max_len, min_len=min_len)
        wav, wav_len = synthesize_rows(self.params, inputs, jnp.stack([jnp.asarray(k) for k in keys]), cfg)
        wav, wav_len = np.asarray(wav), np.asarray(wav_len)
        outs = []
        for b in range(len(model_inputs)):
            outs.append(wav[b:b + 1, :int(wav_len[b])])
        return outs


_SHARED_INPUTS = frozenset({"flow_noise"})


@functools.partial(jax.jit, static_argnames=("config",))
def synthesize_rows(params, inputs: dict, keys, config: PipelineConfig):
    """`synthesize` with one key per row (`keys [B]`), vmapped over rows: every row gets exactly what it
    would get in a batch of one with its key -> (wav [B, S], wav_len [B])."""
    rows = {k: (v if k in _SHARED_INPUTS else jnp.asarray(v)[:, None]) for k, v in inputs.items()}
    axes = {k: (None if k in _SHARED_INPUTS else 0) for k in inputs}
    one = functools.partial(synthesize, config=config)
    wav, wav_len = jax.vmap(lambda p, x, k: one(p, x, k), in_axes=(None, axes, 0))(params, rows, keys)
    return wav[:, 0], wav_len[:, 0]
