"""End-to-end CosyVoice3 benchmark: random FULL-SIZE weights (tests/fullsize/cosyvoice3), 10 s of audio.

    python bench/bench_e2e.py                          # batch 1 and 16, float32, 250 LLM tokens (10 s)
    python bench/bench_e2e.py --batches 1 --reps 1     # a CPU-sized run
    python bench/bench_e2e.py --dtype bfloat16 --attention cudnn

The LLM is fixed at `--tokens` tokens (stop ids masked: min_len = max_len; 250 tokens = 10 s at 25 Hz),
RAS sampling, a 20-token prompt (40 mel frames) and a 30-id text. Rows:
* `engine B=1`: the host engine per request (`Engine.tts(stream=False)`: exact-length component calls).
* `batched B=n`: the jitted core (`pipeline.synthesize_rows`: LLM + flow + HiFT in one program, n rows).
* `stream B=1`: `Engine.tts(stream=True)` (upstream schedule, CV3 whole-mel re-vocoding): time to the
  first audio chunk (TTFA) and total time.
RTF = wall time / seconds of audio produced (all rows). Median of `--reps` timed runs after one warm-up
run (compilation excluded). The table names the device.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cosyjax.config import ModelConfig  # noqa: E402
from cosyjax.pipeline import Engine, PipelineConfig, prepare_inputs, synthesize_rows  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULLSIZE = os.path.join(HERE, "tests", "fullsize", "cosyvoice3")
EOP = 151646


def _fill(abstract, rng, std=0.02):
    def leaf(path, a):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return np.ones(a.shape, np.float32)
        if name.endswith("['bias']"):
            return np.zeros(a.shape, np.float32)
        return (rng.standard_normal(a.shape, dtype=np.float32) * np.float32(std))
    return jax.tree_util.tree_map_with_path(leaf, abstract)


def random_params(config: PipelineConfig, seed: int = 0) -> dict:
    """Random trees with the converters' structure (NumPy RNG: fast for the 0.5 B LLM)."""
    from cosyjax.flow.cv3.model import init_params as flow_init
    from cosyjax.hift.generator import HiFTGenerator
    from cosyjax.llm.speech_lm import abstract_params

    rng = np.random.default_rng(seed)
    llm = _fill(abstract_params(config.llm), rng)
    flow = _fill(flow_init(config.flow, abstract=True), rng)
    h = config.hift
    mel = jax.ShapeDtypeStruct((1, 8, h.in_channels), jnp.float32)
    noise = jax.ShapeDtypeStruct((1, 8 * h.upsample_scale, h.num_harmonics), jnp.float32)
    hift = _fill(jax.eval_shape(lambda m, n: HiFTGenerator(h).init(jax.random.key(0), m, n), mel, noise)["params"],
                 rng)
    return {"llm": llm, "flow": flow, "hift": hift}


def model_input(rng, prompt_tokens: int = 20, text_len: int = 30) -> dict:
    text = rng.integers(0, 151000, (1, text_len)).astype(np.int32)
    text[0, 0] = EOP  # CosyVoice3 needs <|endofprompt|> in text or prompt text
    tok = rng.integers(0, 6561, (1, prompt_tokens)).astype(np.int32)
    return {"text": text, "llm_prompt_speech_token": tok, "flow_prompt_speech_token": tok,
            "prompt_speech_feat": (rng.standard_normal((1, 2 * prompt_tokens, 80)) * 2 - 5).astype(np.float32),
            "flow_embedding": rng.standard_normal((1, 192)).astype(np.float32)}


def _timed(fn, reps: int):
    fn()  # warm-up: compiles
    times = []
    out = None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=250, help="LLM tokens per row (250 = 10 s)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "pallas"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of rows to skip: engine,batched,stream")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    mc = ModelConfig.from_dir(FULLSIZE)
    config = PipelineConfig.from_model_config(mc, dtype=args.dtype, attention=args.attention, sampling="ras")
    config = PipelineConfig(**{**config.__dict__, "llm": config.llm.replace(min_len_mask="stop_set")})
    t0 = time.perf_counter()
    params = random_params(config)
    n_params = sum(np.size(a) for a in jax.tree_util.tree_leaves(params)) / 1e6
    engine = Engine(params, config)
    print(f"random full-size CV3 weights: {n_params:.0f} M params ({time.perf_counter() - t0:.1f} s)", flush=True)
    rng = np.random.default_rng(0)
    n = args.tokens
    audio_s = n * 2 * 480 / 24000
    llm_kw = {"min_len": n, "max_len": n}
    device = f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}"
    rows = []

    if "engine" not in skip:
        mi = model_input(rng)
        t, out = _timed(lambda: np.concatenate(list(engine.tts(mi, key=jax.random.PRNGKey(0), llm_kwargs=llm_kw)), 1),
                        args.reps)
        assert out.shape[1] == n * 960, out.shape
        rows.append(("engine (non-stream)", 1, t, t / audio_s, float("nan")))
        print(f"  engine B=1: {t:.2f} s, RTF {t / audio_s:.3f}", flush=True)
    if "batched" not in skip:
        for B in [int(b) for b in args.batches.split(",") if b]:
            mis = [model_input(rng) for _ in range(B)]
            inputs, cfg = prepare_inputs(config, mis, min_len=n, max_len=n)
            keys = jnp.stack([jax.random.PRNGKey(i) for i in range(B)])

            def run():
                wav, wav_len = synthesize_rows(engine.params, inputs, keys, cfg)
                return np.asarray(jax.block_until_ready(wav_len))

            t, lens = _timed(run, args.reps)
            assert np.all(lens == n * 960), lens
            rows.append(("batched core", B, t, t / (B * audio_s), float("nan")))
            print(f"  batched B={B}: {t:.2f} s, RTF {t / (B * audio_s):.3f}", flush=True)
    if "stream" not in skip:
        mi = model_input(rng)

        def stream():
            t0 = time.perf_counter()
            first = None
            total = 0
            for chunk in engine.tts(mi, stream=True, key=jax.random.PRNGKey(0), llm_kwargs=llm_kw):
                if first is None:
                    first = time.perf_counter() - t0
                total += chunk.shape[1]
            return first, time.perf_counter() - t0, total

        stream()  # warm-up: compiles every chunk shape
        res = [stream() for _ in range(args.reps)]
        ttfa = statistics.median(r[0] for r in res)
        tot = statistics.median(r[1] for r in res)
        assert res[0][2] == n * 960
        rows.append(("stream", 1, tot, tot / audio_s, ttfa))
        print(f"  stream B=1: TTFA {ttfa * 1e3:.0f} ms, total {tot:.2f} s", flush=True)

    print()
    print(f"CosyVoice3 end-to-end, random full-size weights, {n} LLM tokens = {audio_s:.1f} s audio per row, "
          f"{args.dtype}, attention={args.attention}, device {device}, median of {args.reps}")
    print(f"| {'path':<20} | {'batch':>5} | {'wall s':>8} | {'RTF':>7} | {'TTFA ms':>8} | device")
    print(f"|{'-' * 22}|{'-' * 7}|{'-' * 10}|{'-' * 9}|{'-' * 10}|{'-' * 8}")
    for name, B, t, rtf, ttfa in rows:
        tt = f"{ttfa * 1e3:8.0f}" if ttfa == ttfa else f"{'-':>8}"
        print(f"| {name:<20} | {B:>5} | {t:8.2f} | {rtf:7.3f} | {tt} | {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
