"""Lower every jitted inference stage for CUDA without a GPU and report what the GPU program contains.

    # once: a venv with CUDA jax of the same version (no device needed to lower)
    python -m venv /tmp/cudavenv && /tmp/cudavenv/bin/pip install "jax[cuda12]==0.10.2" flax optax \
        orbax-checkpoint chex numpy pyyaml soundfile tokenizers tqdm && /tmp/cudavenv/bin/pip install -e . --no-deps
    JAX_PLATFORMS=cpu /tmp/cudavenv/bin/python bench/gpu_lowering.py            # full-size, bf16, auto@gpu
    JAX_PLATFORMS=cpu /tmp/cudavenv/bin/python bench/gpu_lowering.py --attention xla@gpu   # the baseline
    python bench/gpu_lowering.py --cpu-smoke     # tiny golden configs, lowered for the CPU (any jax install)

Each stage is `jax.jit(f).trace(*ShapeDtypeStructs).lower(lowering_platforms=("cuda",))`: nothing is
allocated, so full-size shapes are fine. Stages: CV3 flow non-streaming and streaming
(`cosyjax.flow.cv3.model.flow_core`), CV2 flow both ways (`cosyjax.flow.cv2.model.flow_core`), LLM
prefill (`llm.generate._prefill_program`), one LLM decode step (`llm.decode.decode_step`), the whole LLM
decode program (`llm.generate._generate_program`: prefill + the decode `while_loop`), HiFT
(`hift.vocoder.vocode_padded`, i.e. `_f0_jit` + `_wave_jit`).

`--attention` is passed to every stage as `attention_impl`; the default 'auto@gpu' runs `attention()`'s
GPU decision logic although `jax.default_backend()` is 'cpu' here (see `cosyjax.nn.attention`).

Per stage the table counts, in the lowered StableHLO text (a layer stack under `nn.scan` is one call
site, so counts are call sites in the program, not executions): cuDNN fused attention custom calls
(`__cudnn$fmha`), Triton custom calls (`__gpu$xla.gpu.triton`: the project's Pallas kernel),
`stablehlo.while` loops, host callbacks (python callbacks: must be 0), and attention call sites left on
the XLA einsum path (dot_generals under the `cosyjax_xla_attention` named scope / 2). Exit status 1
when a stage fails to lower or has a host callback, or (with `--require-fused`) when a stage that has
attention keeps an XLA attention outside decode steps.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cosyjax.config import ModelConfig  # noqa: E402
from cosyjax.nn.attention import XLA_SCOPE  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDS = jax.ShapeDtypeStruct
CALLBACK_TARGETS = re.compile(r"custom_call @(\w*callback\w*)")
_LOC_DEF = re.compile(r"^#(loc\d+) = loc\((.*)\)$", re.M)
_LOC_USE = re.compile(r"loc\(#(loc\d+)\)\s*$")


def model_dir(version: str, tiny: bool) -> str:
    if tiny:
        golden = os.environ.get("COSYJAX_GOLDEN", os.path.join(ROOT, "tests", "golden"))
        return os.path.join(golden, version, "modeldir")
    return os.path.join(ROOT, "tests", "fullsize", version)


def abstract(tree):
    return jax.tree_util.tree_map(lambda a: SDS(np.shape(a), a.dtype), tree)


def census(text: str) -> dict:
    """Counts in StableHLO text lowered with `debug_info=True`."""
    locs = dict(_LOC_DEF.findall(text))
    xla_dots = 0
    for line in text.splitlines():
        if "stablehlo.dot_general" not in line:
            continue
        m = _LOC_USE.search(line)
        where = locs.get(m.group(1), "") if m else line
        xla_dots += XLA_SCOPE in where
    return {
        "cudnn": len(re.findall(r"custom_call @__cudnn\$fmha", text)),
        "pallas": len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)),
        "while": len(re.findall(r"stablehlo\.while", text)),
        "callbacks": len(CALLBACK_TARGETS.findall(text)),
        "xla_attn": xla_dots // 2,  # QK^T and PV per call site
    }


# ---------------------------------------------------------------------------------------------
# stages: each returns (jitted function, abstract args, static kwargs)

def flow_stage(version: str, tiny: bool, dtype: str, impl: str, streaming: bool, batch: int, tokens: int):
    mc = ModelConfig.from_dir(model_dir(version, tiny))
    if version == "cosyvoice3":
        from cosyjax.flow.cv3.config import FlowCV3Config as Cfg
        from cosyjax.flow.cv3 import model as M
        cfg = Cfg.from_model_config(mc)
        mels, ratio, spk = cfg.mel_dim, cfg.token_mel_ratio, cfg.spk_embed_dim
    else:
        from cosyjax.flow.cv2.config import FlowCV2Config as Cfg
        from cosyjax.flow.cv2 import model as M
        cfg = Cfg.from_model_config(mc)
        mels, ratio, spk = cfg.output_size, cfg.encoder.upsample_stride, cfg.spk_embed_dim
    params = M.init_params(cfg, abstract=True)
    if dtype != "float32":
        params = jax.eval_shape(lambda p: M.cast_matmul_weights(p, dtype), params)
    B, N = batch, tokens
    i32 = jnp.int32
    args = (params, SDS((B, N), i32), SDS((B,), i32), SDS((B,), i32), SDS((B,), i32),
            SDS((B, ratio * N, mels), jnp.float32), SDS((B, spk), jnp.float32), SDS((1, ratio * N, mels), jnp.float32))
    return M.flow_core, args, dict(cfg=cfg, streaming=streaming, n_timesteps=10, dtype=dtype, attention_impl=impl)


def _llm(version: str, tiny: bool, dtype: str, impl: str, batch: int, prompt: int, new_tokens: int):
    from cosyjax.llm import generate as G
    from cosyjax.llm.config import LLMConfig
    from cosyjax.llm.speech_lm import abstract_params, cast_params

    cfg = LLMConfig.from_model_config(ModelConfig.from_dir(model_dir(version, tiny)), dtype=dtype,
                                      attention_impl=impl, min_len_mask="stop_set")
    params = abstract_params(cfg)
    if dtype != "float32":
        params = jax.eval_shape(lambda p: cast_params(p, dtype), params)
    rng = np.random.default_rng(0)
    n_text = min(30, prompt // 2)
    text = rng.integers(0, cfg.vocab_size, (batch, n_text)).astype(np.int32)
    if cfg.endofprompt_id is not None:
        text[:, 0] = cfg.endofprompt_id
    speech = rng.integers(0, cfg.speech_token_size, (batch, max(1, prompt - 2 - n_text))).astype(np.int32)
    p = G.prepare(cfg, text, prompt_speech_token=speech, key=jax.random.PRNGKey(0), min_len=new_tokens,
                  max_len=new_tokens)
    arrays = abstract((p.ids, p.kind, p.start, p.min_len, p.max_len, p.draws))
    return G, cfg, params, arrays, p


def llm_prefill_stage(version, tiny, dtype, impl, batch, prompt, new_tokens):
    G, cfg, params, arrays, p = _llm(version, tiny, dtype, impl, batch, prompt, new_tokens)
    return G._prefill_program, (params, *arrays), dict(cfg=cfg, capacity=p.capacity)


def llm_decode_step_stage(version, tiny, dtype, impl, batch, prompt, new_tokens):
    from cosyjax.llm.decode import decode_step

    G, cfg, params, arrays, p = _llm(version, tiny, dtype, impl, batch, prompt, new_tokens)
    state = jax.eval_shape(lambda pr, *a: G._prefill_program(pr, *a, cfg=cfg, capacity=p.capacity), params, *arrays)

    def step(params, state):
        return decode_step(params, cfg, None, state)

    return jax.jit(step), (params, state), {}


def llm_decode_program_stage(version, tiny, dtype, impl, batch, prompt, new_tokens):
    from cosyjax.llm import sampling as smp

    G, cfg, params, arrays, p = _llm(version, tiny, dtype, impl, batch, prompt, new_tokens)
    return G._generate_program, (params, *arrays, None), dict(cfg=cfg, method=smp.resolve(cfg, "ras"),
                                                             max_new=p.capacity - p.ids.shape[1],
                                                             capacity=p.capacity)


def hift_stage(version, tiny, frames, batch):
    from cosyjax.hift.config import HiFTConfig
    from cosyjax.hift.generator import HiFTGenerator
    from cosyjax.hift.vocoder import vocode_padded

    cfg = HiFTConfig.from_model_config(ModelConfig.from_dir(model_dir(version, tiny)))
    mel = SDS((1, 4, cfg.in_channels), jnp.float32)
    noise = SDS((1, 4 * cfg.upsample_scale, cfg.num_harmonics), jnp.float32)
    params = jax.eval_shape(lambda m, n: HiFTGenerator(cfg).init(jax.random.key(0), m, n), mel, noise)["params"]

    def vocode(params, mel, lengths):
        return vocode_padded(params, cfg, mel, lengths, precision="highest")

    return jax.jit(vocode), (params, SDS((batch, frames, cfg.in_channels), jnp.float32), SDS((batch,), jnp.int32)), {}


def lower(fn, args, static, platform: str) -> str:
    traced = (jax.jit(lambda *a: fn(*a, **static)) if static else fn).trace(*args)
    return traced.lower(lowering_platforms=(platform,)).as_text(debug_info=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attention", default=None, help="attention_impl for every stage (default auto@gpu; "
                                                      "auto@cpu with --cpu-smoke)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--platform", default=None, help="lowering platform (default cuda; cpu with --cpu-smoke)")
    ap.add_argument("--versions", default="cosyvoice3,cosyvoice2")
    ap.add_argument("--tiny", action="store_true", help="tiny golden model configs instead of full size")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny configs, small shapes, lowered for cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=None, help="flow token bucket (default 384; 16 smoke)")
    ap.add_argument("--prompt", type=int, default=None, help="LLM prompt positions (default 128; 16 smoke)")
    ap.add_argument("--frames", type=int, default=None, help="HiFT mel frames (default 512; 32 smoke)")
    ap.add_argument("--only", default="", help="comma list of stage-name prefixes (e.g. flow,llm_prefill)")
    ap.add_argument("--require-fused", action="store_true",
                    help="fail when a flow / prefill stage keeps XLA attention")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    tiny = args.tiny or smoke
    platform = args.platform or ("cpu" if smoke else "cuda")
    impl = args.attention or ("auto@cpu" if smoke else "auto@gpu")
    tokens = args.tokens or (16 if smoke else 384)
    prompt = args.prompt or (16 if smoke else 128)
    frames = args.frames or (32 if smoke else 512)
    new = 8 if smoke else 250
    print(f"jax {jax.__version__}; lowering for {platform}; attention_impl={impl!r}; dtype {args.dtype}; "
          f"{'tiny' if tiny else 'full-size'} configs; batch {args.batch}; flow {tokens} tokens, "
          f"LLM prompt {prompt} + {new} new, HiFT {frames} frames", flush=True)

    stages = []
    for v in [s for s in args.versions.split(",") if s]:
        short = "cv3" if v == "cosyvoice3" else "cv2"
        for streaming in (False, True):
            stages.append((f"flow_{short}_{'stream' if streaming else 'offline'}", True,
                           lambda v=v, s=streaming: flow_stage(v, tiny, args.dtype, impl, s, args.batch, tokens)))
        llm_args = (v, tiny, args.dtype, impl, args.batch, prompt, new)
        stages.append((f"llm_prefill_{short}", True, lambda a=llm_args: llm_prefill_stage(*a)))
        stages.append((f"llm_decode_step_{short}", False, lambda a=llm_args: llm_decode_step_stage(*a)))
        stages.append((f"llm_decode_program_{short}", False, lambda a=llm_args: llm_decode_program_stage(*a)))
        stages.append((f"hift_{short}", False, lambda v=v: hift_stage(v, tiny, frames, args.batch)))
    only = [s for s in args.only.split(",") if s]
    stages = [s for s in stages if not only or any(s[0].startswith(o) for o in only)]

    rows, failed = [], False
    for name, must_fuse, build in stages:
        t0 = time.perf_counter()
        try:
            fn, fargs, static = build()
            c = census(lower(fn, fargs, static, platform))
        except Exception as e:  # noqa: BLE001 - a report tool: record which stage failed and go on
            print(f"{name}: FAILED to lower: {type(e).__name__}: {str(e)[:600]}", flush=True)
            traceback.print_exc(limit=3)
            rows.append((name, None, time.perf_counter() - t0, "LOWERING FAILED"))
            failed = True
            continue
        notes = []
        if c["callbacks"]:
            notes.append("HOST CALLBACK")
            failed = True
        if must_fuse and c["xla_attn"]:
            notes.append("unfused attention")
            failed |= args.require_fused
        rows.append((name, c, time.perf_counter() - t0, ", ".join(notes) or "ok"))
        print(f"{name}: {c} ({time.perf_counter() - t0:.1f} s)", flush=True)

    print()
    print(f"| stage | cuDNN fmha | Pallas (Triton) | XLA attention left | while loops | host callbacks | "
          f"lower (s) | note |")
    print("|---|---|---|---|---|---|---|---|")
    for name, c, secs, note in rows:
        if c is None:
            print(f"| {name} | - | - | - | - | - | {secs:.1f} | {note} |")
        else:
            print(f"| {name} | {c['cudnn']} | {c['pallas']} | {c['xla_attn']} | {c['while']} | {c['callbacks']} | "
                  f"{secs:.1f} | {note} |")
    print("(counts are call sites in the lowered program; a scanned layer stack counts once)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
