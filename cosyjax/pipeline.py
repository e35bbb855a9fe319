"""The one inference engine: text tokens -> LLM -> (silent filter) -> flow -> HiFT, on jitted stages only.

* `synthesize(params, inputs, key, config, shapes) -> (wav [B, S], wav_len [B])` is the pure, traceable,
  batched non-streaming core (static shapes from `StaticShapes`; lengths as masks). `prepare_inputs`
  packs `ModelInput`s into its arrays on the host. It serves one request (B = 1) as well as a batch:
  every row gets the audio it would get alone with its key (`synthesize_rows`, vmapped per-row keys).
  `speed` is a traced per-row input (not a recompile); voice conversion and replayed tokens skip the LLM.
* Streaming is `cosyjax.streaming`'s scheduler driving the same jitted stages: the LLM's one decode loop
  in chunks, the flow and the vocoder incrementally (`incremental=True`: cached K/V and conv state, cost
  grows with the chunk) or by recomputing the prefix as upstream does (`incremental=False`, the reference).
* `Engine` holds the prepared parameters (cast once) and is what the API, CLI and server call.

Randomness: one key per request, split into (LLM sampling, vocoder noise); CosyVoice2's HiFT draws fresh
noise at every vocoder call (the vocoder key folded with the call index), CosyVoice3's reads a fixed buffer.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.errors import CosyJaxError
from cosyjax.model_input import ModelInput
from cosyjax.nn.numerics import Numerics
from cosyjax.pipeline_ops import filter_silent_batch, length_mask, resize_linear
from cosyjax.stage_batch import CompileOnce, run_alone
from cosyjax.streaming import MAX_SILENT_RUN, StreamConfig

__all__ = ["PipelineConfig", "StaticShapes", "Engine", "make_mesh", "prepare_inputs", "prepare_params",
           "speech_token_rows", "speech_tokens", "synthesize", "synthesize_rows", "token2wav_lengths",
           "PipelineInputError"]


class PipelineInputError(CosyJaxError):
    """A model input the pipeline cannot run (missing parts, bad shapes, a batch it cannot form)."""


def _flow_module(version: str):
    return importlib.import_module("cosyjax.flow.cv2.model" if version == "cosyvoice2" else "cosyjax.flow.cv3.model")


def _vocoder():
    return importlib.import_module("cosyjax.hift.vocoder")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The model: component configs, sampling, numerics and the streaming constants (hashable, static)."""

    version: str
    llm: Any  # LLMConfig
    flow: Any  # FlowCV2Config | FlowCV3Config
    hift: Any  # HiFTConfig
    sampling: str = "ras"
    numerics: Numerics = Numerics()
    stream: StreamConfig = StreamConfig()

    @property
    def silent_tokens(self) -> tuple[int, ...]:
        return tuple(self.llm.silent_tokens)

    @property
    def samples_per_frame(self) -> int:
        return self.hift.upsample_scale

    @property
    def dtype(self) -> str:
        return self.numerics.dtype

    @property
    def attention(self) -> str:
        return self.numerics.attention

    @classmethod
    def from_model_config(cls, mc, dtype: str = "float32", attention: str = "auto", sampling: str = "ras",
                          hift_precision: Optional[str] = "highest") -> "PipelineConfig":
        from convert.registry import component_module
        from cosyjax.llm.config import LLMConfig

        numerics = Numerics(dtype=dtype, attention=attention, hift_precision=hift_precision)
        llm = LLMConfig.from_model_config(mc, dtype=numerics.dtype, attention_impl=numerics.attention)
        flow = component_module("flow").config_from(mc)
        hift = component_module("hift").config_from(mc)
        return cls(version=mc.version, llm=llm, flow=flow, hift=hift, sampling=sampling, numerics=numerics,
                   stream=StreamConfig(token_mel_ratio=mc.token_mel_ratio, samples_per_frame=hift.upsample_scale,
                                       pre_lookahead_len=int(flow.pre_lookahead_len)))


@dataclasses.dataclass(frozen=True)
class StaticShapes:
    """The compiled sizes of one `synthesize` program (hashable, static), apart from the model config.

    A new input whose lengths fall in the same buckets reuses the program; `speed` is a traced input.
    """

    batch: int
    tokens: str  # 'llm' (the LLM generates) | 'given' (voice conversion / replayed tokens)
    filter_silent: bool  # apply CosyVoice3's silent-token filter (llm_job); off for voice conversion
    max_new: int  # LLM output slots, or the given-token width (= flow_tokens)
    capacity: int  # LLM KV-cache slots (0 without the LLM)
    flow_tokens: int  # flow bucket: prompt + new tokens
    mel_frames: int  # vocoder frames: a bucket >= the longest row's new frames (more when a row's speed < 1)


def prepare_params(params: dict, config: PipelineConfig) -> dict:
    """Place the parameters once, cast as the numerics say (matmul weights in the compute dtype; the
    CosyVoice3 f0 predictor float64 via `hift.vocoder.device_params`)."""
    from cosyjax.llm.speech_lm import cast_params

    dtype = config.numerics.dtype
    llm, flow = params["llm"], params["flow"]
    if dtype != "float32":
        llm = cast_params(llm, dtype)
        flow = _flow_module(config.version).cast_matmul_weights(flow, dtype)
    placed = jax.device_put({"llm": llm, "flow": flow})
    placed["hift"] = _vocoder().device_params(params["hift"], config.hift)
    return placed


# =============================================================================================
# host side: ModelInputs -> padded arrays + static shapes

def _pad_rows(rows: Sequence[np.ndarray], width: int, dtype) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype)
    for b, r in enumerate(rows):
        out[b, :len(r)] = r
    return out


def prepare_inputs(config: PipelineConfig, model_inputs: Sequence, *, speed=1.0, max_len=None, min_len=None,
                   tokens: Optional[Sequence] = None, hift_noise=None) -> tuple[dict, StaticShapes]:
    """Pack model inputs (`ModelInput` or upstream dicts) into the arrays `synthesize` takes.

    speed: float or one per row (> 0). tokens: per-row speech tokens to use instead of the LLM (the
    silent filter still applies; voice-conversion inputs bring their own and are not filtered).
    hift_noise: injected vocoder noise [B|1, >= frames*480, 9] (parity), else drawn from the key.
    Returns (inputs, shapes).
    """
    from cosyjax.flow.inputs import bucket_for, seed0_noise_np
    from cosyjax.hift.vocoder import bucket_length as hift_bucket
    from cosyjax.llm.generate import prepare

    B = len(model_inputs)
    if B == 0:
        raise PipelineInputError("no model inputs to synthesise")
    r = config.flow.token_mel_ratio
    mis = [ModelInput.from_dict(m, r) for m in model_inputs]
    kinds = {m.kind for m in mis}
    if "bistream" in kinds and tokens is None:  # with given tokens the text (stream) is not needed any more
        raise PipelineInputError("a text generator (bistream) cannot be batched: stream it through Engine.generate "
                                 "or CosyVoice.inference_* one request at a time")
    if len(kinds) > 1 or (tokens is not None and "tokens" in kinds):
        raise PipelineInputError("a batch cannot mix voice conversion (source_speech_token) with text rows")
    speeds = np.broadcast_to(np.asarray(speed, np.float64), (B,)).astype(np.float32)
    if not np.all(np.isfinite(speeds)) or np.any(speeds <= 0):
        raise PipelineInputError(f"speed must be > 0, got {np.asarray(speed).tolist()}")
    inputs: dict[str, Any] = {}
    vc = kinds == {"tokens"}
    if vc or tokens is not None:
        given = [m.source_speech_token for m in mis] if vc else [np.asarray(t, np.int32).reshape(-1) for t in tokens]
        if len(given) != B:
            raise PipelineInputError(f"tokens has {len(given)} rows for {B} model inputs")
        for b, g in enumerate(given):
            if g.size and (g.min() < 0 or g.max() >= config.flow.vocab_size):
                raise PipelineInputError(f"row {b}: speech tokens outside [0, {config.flow.vocab_size})")
        inputs["given_len"] = np.array([len(g) for g in given], np.int32)
        capacity, source = 0, "given"
        gen_len = np.array([len(g) for g in given], np.int64)
    else:
        p = prepare(config.llm, _pad_rows([m.text for m in mis], max(len(m.text) for m in mis), np.int32),
                    np.array([len(m.text) for m in mis]),
                    _pad_rows([m.prompt_text for m in mis], max(1, max(len(m.prompt_text) for m in mis)), np.int32),
                    np.array([len(m.prompt_text) for m in mis]),
                    _pad_rows([m.llm_prompt_speech_token for m in mis],
                              max(1, max(len(m.llm_prompt_speech_token) for m in mis)), np.int32),
                    np.array([len(m.llm_prompt_speech_token) for m in mis]),
                    key=jax.random.PRNGKey(0), sampling=config.sampling, max_len=max_len, min_len=min_len)
        inputs.update(llm_ids=p.ids, llm_kind=p.kind, llm_start=p.start, llm_min_len=p.min_len,
                      llm_max_len=p.max_len)
        n_new, capacity, source = p.max_new, p.capacity, "llm"
        gen_len = np.full((B,), n_new, np.int64)
    P = np.array([m.prompt_len for m in mis], np.int32)
    # the flow bucket holds every row's prompt + new tokens; the vocoder only the new frames (the flow's
    # output has the prompt removed), so neither computes padding a longer row of the batch does not need
    N = bucket_for(int((P + gen_len).max()))
    T = N * r
    if source == "given":  # padded to the flow bucket: no shape of its own (N >= every row's tokens)
        inputs["given_tokens"] = _pad_rows(given, N, np.int32)
        n_new = N
    ftok = np.zeros((B, N), np.int32)
    cond = np.zeros((B, T, 80), np.float32)
    for b, m in enumerate(mis):
        ftok[b, :P[b]] = m.flow_prompt_speech_token
        cond[b, :r * P[b]] = m.prompt_speech_feat
    T_out = hift_bucket(int(np.ceil(max(1, int(gen_len.max()) * r) / min(1.0, float(speeds.min())))))
    inputs.update(flow_prompt_token=ftok, flow_prompt_len=P, flow_cond=cond,
                  flow_embedding=np.stack([m.flow_embedding for m in mis]), flow_noise=seed0_noise_np(T, 80),
                  speed=speeds)
    if hift_noise is not None:
        n = np.asarray(hift_noise, np.float32)
        S = T_out * config.samples_per_frame
        if n.ndim != 3 or n.shape[0] not in (1, B) or n.shape[2] != config.hift.num_harmonics:
            raise PipelineInputError(f"hift_noise must be [1 or {B}, samples, {config.hift.num_harmonics}], "
                                     f"got {n.shape}")
        pad = np.zeros((B, S, n.shape[2]), np.float32)
        w = min(S, n.shape[1])
        pad[:, :w] = n[:, :w]
        inputs["hift_noise"] = pad
    shapes = StaticShapes(batch=B, tokens=source, filter_silent=not vc and bool(config.silent_tokens),
                          max_new=n_new, capacity=capacity, flow_tokens=N, mel_frames=T_out)
    return inputs, shapes


def token2wav_lengths(config: PipelineConfig, model_input, max_tokens: Optional[int] = None) -> list[int]:
    """One generated-token count per distinct flow + vocoder program (`StaticShapes`) that `model_input`
    can reach with 0..max_tokens tokens (default: its LLM's output slots) -> sorted counts. A server warms
    these up so that no answer length compiles on first use."""
    if max_tokens is None:
        max_tokens = prepare_inputs(config, [model_input])[1].max_new
    first: dict = {}
    for n in range(int(max_tokens) + 1):
        _, sh = prepare_inputs(config, [model_input], tokens=[np.zeros(n, np.int32)])
        first.setdefault(sh, n)
    return sorted(first.values())


def _llm_draws(config: PipelineConfig, key, B: int, max_new: int):
    """Sampling uniforms [B, max_new, 2] for the LLM program (greedy: unused placeholder)."""
    from cosyjax.llm.sampling import uniforms_from_keys

    if config.sampling == "greedy":
        return jnp.zeros((B, 1, 2), jnp.float32)
    return uniforms_from_keys(jax.random.split(key, B), max_new)


# =============================================================================================
# the jittable batched core

def speech_tokens(params, inputs: dict, key, config: PipelineConfig, shapes: StaticShapes):
    """The LLM stage of `synthesize` (shapes.tokens == 'llm') -> (tokens [B, max_new] int32 (0 past n_tok),
    n_tok [B] int32), before the silent filter. key: `synthesize`'s key (its first split draws the LLM)."""
    from cosyjax.llm.generate import generate_traced

    B = inputs["llm_ids"].shape[0]
    k_llm, _ = jax.random.split(key)
    tokens, n_tok = generate_traced(
        params["llm"], config.llm, inputs["llm_ids"], inputs["llm_kind"], inputs["llm_start"],
        inputs["llm_min_len"], inputs["llm_max_len"], _llm_draws(config, k_llm, B, shapes.max_new),
        method=config.sampling, max_new=shapes.max_new, capacity=shapes.capacity)
    return jnp.maximum(tokens, 0), n_tok


def synthesize(params, inputs: dict, key, config: PipelineConfig, shapes: StaticShapes):
    """The whole pipeline on a padded batch -> (wav [B, S] float32 (zero past wav_len), wav_len [B] int32).

    params: `prepare_params` output; inputs / shapes: from `prepare_inputs`; key: one jax key (split into
    per-row LLM keys and the vocoder key). S = shapes.mel_frames x 480. Pure and traceable: wrap it in
    `jax.jit(..., static_argnames=('config', 'shapes'))` and/or `jax.vmap` (vmap the plain function, as
    `synthesize_rows` does).
    """
    _, k_voc = jax.random.split(key)
    k_voc = jax.random.fold_in(k_voc, 0)  # = the first (and only) vocoder call of a request
    if shapes.tokens == "llm":
        tokens, n_tok = speech_tokens(params, inputs, key, config, shapes)
    else:
        tokens, n_tok = inputs["given_tokens"], inputs["given_len"]
    if shapes.filter_silent:
        tokens, n_tok = filter_silent_batch(tokens, n_tok, config.silent_tokens, MAX_SILENT_RUN)
    # flow input: prompt tokens ++ generated tokens per row
    N = shapes.flow_tokens
    P = inputs["flow_prompt_len"]
    pos = jnp.arange(N)[None, :]
    gen = jnp.take_along_axis(tokens, jnp.clip(pos - P[:, None], 0, tokens.shape[1] - 1), axis=1)
    n_flow = P + n_tok
    flow_tok = jnp.where(pos < P[:, None], inputs["flow_prompt_token"], gen)
    flow_tok = jnp.where(pos < n_flow[:, None], flow_tok, 0)
    num = config.numerics
    out = _flow_module(config.version).flow_core(
        params["flow"], flow_tok, n_flow, P, jnp.zeros_like(P), inputs["flow_cond"], inputs["flow_embedding"],
        inputs["flow_noise"], cfg=config.flow, streaming=False, dtype=num.dtype, attention_impl=num.attention)
    mel, mel_len = out["mel"], out["mel_len"]
    # speed (upstream: F.interpolate(mel, size=int(T / speed), mode='linear') before HiFT); exact identity at 1
    new_len = jnp.floor(mel_len.astype(jnp.float32) / inputs["speed"]).astype(jnp.int32)
    mel = resize_linear(mel, mel_len, new_len, shapes.mel_frames)
    lengths = jnp.maximum(new_len, 1)
    noise = inputs.get("hift_noise")
    wav, _ = _vocoder().vocode_padded(params["hift"], config.hift, mel, lengths, finalize=True,
                                      key=None if (config.hift.causal or noise is not None) else k_voc, noise=noise,
                                      precision=num.hift_precision)
    wav_len = new_len * config.samples_per_frame
    return jnp.where(length_mask(wav_len, wav.shape[1]), wav, 0.0), wav_len


_SHARED_INPUTS = frozenset({"flow_noise"})
_LLM_INPUTS = ("llm_ids", "llm_kind", "llm_start", "llm_min_len", "llm_max_len")


@functools.partial(jax.jit, static_argnames=("config", "shapes"))
def speech_token_rows(params, inputs: dict, keys, config: PipelineConfig, shapes: StaticShapes):
    """`speech_tokens` with one key per row, vmapped as `synthesize_rows` (the same tokens it generates)
    -> (tokens [B, max_new], n_tok [B]). inputs: `prepare_inputs`' LLM arrays (others are ignored)."""
    rows = {k: jnp.asarray(inputs[k])[:, None] for k in _LLM_INPUTS}
    one_shapes = dataclasses.replace(shapes, batch=1)
    tokens, n_tok = jax.vmap(lambda p, x, k: speech_tokens(p, x, k, config, one_shapes),
                             in_axes=(None, 0, 0))(params, rows, keys)
    return tokens[:, 0], n_tok[:, 0]


@functools.partial(jax.jit, static_argnames=("config", "shapes"))
def synthesize_rows(params, inputs: dict, keys, config: PipelineConfig, shapes: StaticShapes):
    """`synthesize` with one key per row (`keys [B]`), vmapped over rows: every row gets exactly what it
    would get in a batch of one with its key -> (wav [B, S], wav_len [B])."""
    rows = {k: (v if k in _SHARED_INPUTS else jnp.asarray(v)[:, None]) for k, v in inputs.items()}
    axes = {k: (None if k in _SHARED_INPUTS else 0) for k in inputs}
    one_shapes = dataclasses.replace(shapes, batch=1)
    wav, wav_len = jax.vmap(lambda p, x, k: synthesize(p, x, k, config, one_shapes),
                            in_axes=(None, axes, 0))(params, rows, keys)
    return wav[:, 0], wav_len[:, 0]


# =============================================================================================
# the engine

NoiseProvider = Callable[[int, int], dict]  # (vocoder call index, mel frames) -> {'noise': array}


def make_mesh(devices=None):
    """A 1-D `jax.sharding.Mesh` with axis 'data' over `devices` (an int: the first n devices; a list; a Mesh).

    Multi-host: call `jax.distributed.initialize()` in every process first; `jax.devices()` then lists every
    host's devices and the same code shards a batch over all of them (each process feeds the same inputs)."""
    from jax.sharding import Mesh

    if isinstance(devices, Mesh):
        if devices.axis_names != ("data",):
            raise PipelineInputError(f"the mesh must have one axis named 'data', got {devices.axis_names}")
        return devices
    all_devices = jax.devices()
    if devices is None or isinstance(devices, int):
        n = len(all_devices) if devices is None else int(devices)
        if not 1 <= n <= len(all_devices):
            raise PipelineInputError(f"devices={n}: this process sees {len(all_devices)} device(s) "
                                     f"({all_devices[0].platform})")
        devices = all_devices[:n]
    return Mesh(np.asarray(list(devices)), ("data",))


def _replicate(params: dict, mesh) -> dict:
    """Parameters replicated over the mesh (the CosyVoice3 f0 weights stay float64: placed under x64)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from cosyjax.hift.f0_predictor import x64_enabled

    repl = NamedSharding(mesh, PartitionSpec())
    out = {k: jax.device_put(v, repl) for k, v in params.items() if k != "hift"}
    with x64_enabled():
        out["hift"] = jax.device_put(params["hift"], repl)
    return out


class Engine:
    """Prepared parameters + config; runs model inputs through `synthesize` or the streaming scheduler.

    devices: None (the default device), or an int / device list / `Mesh` to shard batches of
    `synthesize_batch` over a 'data' axis (parameters replicated; see `make_mesh`)."""

    def __init__(self, params: dict, config: PipelineConfig, *, prepared: bool = False, devices=None):
        self.config = config
        self.params = params if prepared else prepare_params(params, config)
        self.mesh = None if devices is None else make_mesh(devices)
        if self.mesh is not None:
            self.params = _replicate(self.params, self.mesh)

    # ---- LLM (parity / research entry points over the one decode loop) -------------------------
    def llm_inputs(self, mi) -> dict:
        """The LLM inputs of one model input as `cosyjax.llm.generate` keyword arguments."""
        m = ModelInput.from_dict(mi, self.config.flow.token_mel_ratio)
        return dict(text=m.text[None], prompt_text=m.prompt_text[None],
                    prompt_speech_token=m.llm_prompt_speech_token[None])

    def llm_generation(self, mi, key, **kw):
        """`cosyjax.llm.generate.generate_detailed` for one request -> `Generation` (batch of 1)."""
        from cosyjax.llm.generate import generate_detailed

        kw.setdefault("sampling", self.config.sampling)
        return generate_detailed(self.params["llm"], self.config.llm, **self.llm_inputs(mi), key=key, **kw)

    def _llm_token_stream(self, m: ModelInput, key, hop: int, llm_kwargs: dict) -> Iterator:
        """Speech tokens of one request as they are decoded (int arrays / ints)."""
        from cosyjax.llm.generate import generate_stream

        if m.kind == "bistream":
            from cosyjax.llm.bistream import generate_bistream

            return generate_bistream(self.params["llm"], self.config.llm, m.text_stream, m.prompt_text,
                                     m.llm_prompt_speech_token, key=key, sampling=self.config.sampling, **llm_kwargs)
        return (rows[0] for rows in generate_stream(
            self.params["llm"], self.config.llm, m.text[None], prompt_text=m.prompt_text[None],
            prompt_speech_token=m.llm_prompt_speech_token[None], key=key, sampling=self.config.sampling, hop=hop,
            **llm_kwargs))

    # ---- non-streaming: the jitted core ----------------------------------------------------------
    def synthesize_batch(self, model_inputs: Sequence, keys, speed=1.0, max_len=None, min_len=None,
                         tokens: Optional[Sequence] = None, hift_noise=None) -> list[np.ndarray]:
        """Non-streaming synthesis of many model inputs with the jitted core -> list of float32 [1, N].

        Each row uses `keys[i]`: rows give the audio they would give alone in a batch of one."""
        keys = jnp.stack([jnp.asarray(k) for k in keys])
        if keys.shape[0] != len(model_inputs):
            raise PipelineInputError(f"{keys.shape[0]} keys for {len(model_inputs)} model inputs")
        wav, wav_len = self._rows(model_inputs, keys, speed=speed, max_len=max_len, min_len=min_len, tokens=tokens,
                                  hift_noise=hift_noise)
        return [wav[b:b + 1, :int(wav_len[b])] for b in range(len(model_inputs))]

    def _rows(self, model_inputs: Sequence, keys, *, speed, tokens, hift_noise, shard: bool = True, **llm_len):
        """`synthesize_rows` in two device calls -> (wav [B, S], wav_len [B]) numpy: the LLM first
        (`speech_token_rows`), then flow + vocoder on its tokens as given tokens, so that the flow and
        vocoder buckets fit the tokens generated, not the LLM's output slots (the same keys: the same
        audio as the one-program `synthesize_rows`)."""
        cfg = self.config
        inputs, shapes = prepare_inputs(cfg, model_inputs, speed=speed, tokens=tokens, hift_noise=hift_noise,
                                        **llm_len)
        B, shard = shapes.batch, shard and self.mesh is not None
        if shapes.tokens == "llm":
            llm_in = {k: inputs[k] for k in _LLM_INPUTS}  # only these go to the device for the LLM stage
            ins, ks, sh = self._shard(llm_in, keys, shapes) if shard else (llm_in, keys, shapes)
            toks, n_tok = speech_token_rows(self.params, ins, ks, cfg, sh)
            toks, n_tok = np.asarray(toks), np.asarray(n_tok)  # one transfer between the stages
            given = [toks[b, :int(n_tok[b])] for b in range(B)]
            inputs, shapes = prepare_inputs(cfg, model_inputs, speed=speed, tokens=given, hift_noise=hift_noise)
        if shard:
            inputs, keys, shapes = self._shard(inputs, keys, shapes)
        wav, wav_len = synthesize_rows(self.params, inputs, keys, cfg, shapes)
        return np.asarray(wav)[:B], np.asarray(wav_len)[:B]

    def _shard(self, inputs: dict, keys, shapes: StaticShapes):
        """Pad the batch to a multiple of the mesh size (repeating the last row) and place rows on 'data'."""
        from jax.sharding import NamedSharding, PartitionSpec

        n = self.mesh.size
        pad = (-shapes.batch) % n
        grow = lambda a: np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) if pad else a  # noqa: E731
        rows = NamedSharding(self.mesh, PartitionSpec("data"))
        repl = NamedSharding(self.mesh, PartitionSpec())
        placed = {k: jax.device_put(v, repl) if k in _SHARED_INPUTS else jax.device_put(grow(np.asarray(v)), rows)
                  for k, v in inputs.items()}
        keys = jax.device_put(grow(np.asarray(keys)), rows)
        return placed, keys, dataclasses.replace(shapes, batch=shapes.batch + pad)

    # ---- one request -----------------------------------------------------------------------------
    def generate(self, mi, *, stream: bool = False, speed: float = 1.0, key=None, records: Optional[list] = None,
                 tokens: Optional[Iterable] = None, noise_provider: Optional[NoiseProvider] = None,
                 incremental: bool = True, llm_hop: int = 16, llm_kwargs: Optional[dict] = None,
                 stage_runner: Optional[Callable] = None) -> Iterator[dict]:
        """`CosyVoice2Model.tts` for one model input: yields {'tts_speech': float32 [1, N]} (streaming: one per
        chunk, plus 'work' = {'flow_frames', 'vocoder_frames'} the chunk computed).

        tokens: speech tokens to use instead of the LLM (an array, or any iterable of ints / int arrays, e.g.
        a recorded LLM stream); the silent filter still applies. incremental: streaming with cached flow and
        vocoder state (False: recompute the prefix every chunk, upstream's algorithm, the reference).
        noise_provider(call, frames) -> {'noise': ...}: injected vocoder noise (parity).
        stage_runner: runs the incremental stages' device calls (`cosyjax.stage_batch`; default: alone), e.g.
        a `StageGang` shared by concurrent streams.
        """
        key = jax.random.PRNGKey(0) if key is None else key
        cfg = self.config
        m = ModelInput.from_dict(mi, cfg.flow.token_mel_ratio)
        if speed <= 0:
            raise PipelineInputError(f"speed must be > 0, got {speed}")
        if stream and speed != 1.0:
            raise PipelineInputError("speed change is only supported in non-streaming inference (stream=False)")
        k_llm, k_voc = jax.random.split(key)
        llm_kwargs = dict(llm_kwargs or {})
        if tokens is not None and m.kind == "tokens":
            raise PipelineInputError("tokens= replaces the LLM; a voice-conversion input already has its tokens")
        if not stream:
            given = None
            if tokens is not None:
                given = [np.concatenate([np.asarray(t, np.int32).reshape(-1) for t in tokens] or
                                        [np.zeros(0, np.int32)]) if not isinstance(tokens, np.ndarray)
                         else tokens.astype(np.int32).reshape(-1)]
            elif m.kind == "bistream":
                given = [np.asarray(list(self._llm_token_stream(m, k_llm, llm_hop, llm_kwargs)), np.int32)]
            noise = noise_provider(0, 0)["noise"] if noise_provider is not None else None
            wav, wav_len = self._rows([m], key[None], speed=speed, tokens=given, hift_noise=noise, shard=False,
                                      **{k: v for k, v in llm_kwargs.items() if k in ("max_len", "min_len")})
            yield {"tts_speech": wav[:, :int(wav_len[0])]}
            return
        from cosyjax import streaming

        if m.kind == "tokens":
            token_iter, silent = [m.source_speech_token], ()
        elif tokens is not None:
            token_iter = [tokens.reshape(-1)] if isinstance(tokens, (np.ndarray, jax.Array)) else tokens
            silent = cfg.silent_tokens
        else:
            token_iter, silent = self._llm_token_stream(m, k_llm, llm_hop, llm_kwargs), cfg.silent_tokens
        # a stream whose tokens are all here (an array, a list / tuple of them) allocates the flow's cache
        # once for its length: growing it mid-stream copies the whole cache in one chunk (full-size CV3 on
        # this CPU: +3 s at 400 -> 800 frames, +10 s at 800 -> 1600). An LLM's or any other iterator's
        # stream has no length yet: its cache doubles as it fills (`warm_streams` warms that path).
        known = sum(int(np.size(t)) for t in token_iter) if isinstance(token_iter, (list, tuple)) else 0
        run = stage_runner or run_alone
        t2w = streaming.make_token2wav(cfg.version, self.flow_stage(m, incremental, run, max_tokens=known or None),
                                       self.vocoder_stage(k_voc, noise_provider, incremental, run), cfg.stream)
        yield from streaming.run_stream(token_iter, t2w, m.prompt_len, silent_tokens=silent, config=cfg.stream,
                                        records=records)

    def tts(self, mi, **kw) -> Iterator[np.ndarray]:
        """`generate` yielding only the audio arrays float32 [1, N]."""
        for out in self.generate(mi, **kw):
            yield out["tts_speech"]

    def warm_streams(self, mi, key=None, max_tokens: Optional[int] = None) -> int:
        """Compile the streaming flow + vocoder programs of every answer length 1..max_tokens (default: the
        LLM's output slots for `mi`) -> the number of distinct stage programs. Each length streams given
        tokens through a `CompileOnce` runner, so a program already run is not run again; after this, a
        stream of `mi`'s prompt with any such length compiles nothing (the LLM's programs are not warmed)."""
        m = ModelInput.from_dict(mi, self.config.flow.token_mel_ratio)
        if m.kind == "tokens":
            raise PipelineInputError("warm_streams needs a text input (a voice-conversion input has its tokens)")
        if max_tokens is None:
            max_tokens = prepare_inputs(self.config, [m])[1].max_new
        key = jax.random.PRNGKey(0) if key is None else key
        run = CompileOnce()
        for n in range(1, int(max_tokens) + 1):
            # an iterator, as the server's LLM streams: the length is not known up front, the cache grows
            for _ in self.generate(m, stream=True, key=key, tokens=iter([np.zeros(n, np.int32)]), stage_runner=run):
                pass
        return run.programs

    # ---- streaming stages --------------------------------------------------------------------------
    def flow_stage(self, m, incremental: bool, run: Callable = run_alone, max_tokens: Optional[int] = None):
        """The streaming flow stage of one model input (`ModelInput` or upstream dict): `chunk()` / `final()`.
        max_tokens: the stream's token count when known (incremental: its cache is allocated once)."""
        from cosyjax.streaming import RecomputeFlow

        m = ModelInput.from_dict(m, self.config.flow.token_mel_ratio)

        num = self.config.numerics
        args = (self.params["flow"], self.config.flow, m.flow_prompt_speech_token, m.prompt_speech_feat,
                m.flow_embedding)
        if not incremental:
            return RecomputeFlow(_flow_module(self.config.version).flow_inference, *args, dtype=num.dtype,
                                 attention_impl=num.attention)
        if self.config.version == "cosyvoice2":
            from cosyjax.flow.cv2.incremental import IncrementalFlowCV2

            return IncrementalFlowCV2(*args, dtype=num.dtype, attention_impl=num.attention, run=run,
                                      max_tokens=max_tokens)
        from cosyjax.flow.cv3.incremental import IncrementalFlowCV3

        return IncrementalFlowCV3(*args, dtype=num.dtype, attention_impl=num.attention, run=run,
                                  max_tokens=max_tokens)

    def vocoder_stage(self, key, noise_provider: Optional[NoiseProvider], incremental: bool,
                      run: Callable = run_alone):
        """CosyVoice2: `vocoder(mel, cache_source) -> (speech, source)` (new frames + the 8-frame cache, noise
        per call); CosyVoice3: a stage with `push(mel_new, finalize) -> (speech, frames)`."""
        voc = _vocoder()
        cfg, params = self.config, self.params["hift"]
        prec = cfg.numerics.hift_precision
        calls = [0]

        def extra(n_frames: int) -> dict:
            i = calls[0]
            calls[0] += 1
            if noise_provider is not None:
                return noise_provider(i, n_frames)
            return {"key": jax.random.fold_in(key, i)} if not cfg.hift.causal else {}

        if cfg.version == "cosyvoice2":
            def vocoder(mel, cache_source):
                cs = np.asarray(cache_source, np.float32).reshape(1, -1)
                wav, source = voc.vocode(params, cfg.hift, mel, cache_source=cs if cs.size else None,
                                         precision=prec, run=run, **extra(mel.shape[1]))
                return np.asarray(wav), np.asarray(source)
            return vocoder
        noise = extra(0).get("noise")
        if incremental:
            from cosyjax.hift.incremental import IncrementalVocoderCV3

            return IncrementalVocoderCV3(params, cfg.hift, noise=noise, run=run)
        from cosyjax.streaming import RecomputeVocoderCV3

        return RecomputeVocoderCV3(lambda mel, finalize: np.asarray(voc.vocode(
            params, cfg.hift, mel, finalize=finalize, noise=noise, precision=prec)[0]))
