"""HiFT vocoder benchmark: `vocode` on 500 mel frames, full-size random-init CV2 / CV3 (tests/fullsize).

    python bench/bench_hift.py [--frames 500] [--reps 20] [--precision highest|default|both]
                               [--dtype float32|bfloat16] [--versions cosyvoice2,cosyvoice3]

Prints one row per (version, precision): compile time of the first call, the median over `reps`
timed calls (after warm-up) of the whole public call and of its two jitted stages (f0 predictor +
SineGen2 phase under local x64, then source/STFT/generator/iSTFT), achieved conv GFLOP/s, and the
ratio to upstream PyTorch (H100: CV2 13.5 ms, CV3 19.2 ms; 2 CPU cores: 1.2 s). With
`--precision both`, also the wav difference between 'highest' (true float32) and 'default' (TF32 on
recent NVIDIA GPUs; identical on CPU) -- the TF32 risk: f0-predictor and STFT stay pinned to highest.

    python bench/bench_hift.py --stream 60 [--model tiny|fullsize]

Streaming CosyVoice3 vocoder over the streaming chunk schedule (prompt 0, 25 tokens/s): the
incremental `IncrementalVocoderCV3` against the recompute path (upstream token2wav: `vocode` on the
whole accumulated mel every chunk), each run twice (first run includes compilation, the second is
timed warm); prints per-push seconds, totals, the summed vocoder frames and the max rel-L2 between them.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from cosyjax.config import ModelConfig  # noqa: E402
from cosyjax.hift.config import HiFTConfig  # noqa: E402
from cosyjax.hift.f0_predictor import x64_enabled  # noqa: E402
from cosyjax.hift.generator import HiFTGenerator  # noqa: E402
from cosyjax.hift.incremental import IncrementalVocoderCV3  # noqa: E402
from cosyjax.hift.vocoder import _split, _stage_f0, _stage_wave, bucket_length, device_params, vocode  # noqa: E402
from cosyjax.streaming import plan_schedule  # noqa: E402

UPSTREAM_MS = {"gpu": {"cosyvoice2": 13.5, "cosyvoice3": 19.2}, "cpu": {"cosyvoice2": 1200.0, "cosyvoice3": 1200.0}}
FULLSIZE = os.path.join(os.path.dirname(__file__), "..", "tests", "fullsize")


def random_params(cfg: HiFTConfig, seed: int = 0):
    """Full-size tree shaped like `init` (no compilation): N(0, 0.01) weights (upstream init_weights),
    zero biases, Snake alpha 1."""
    mel = jax.ShapeDtypeStruct((1, 4, cfg.in_channels), jnp.float32)
    noise = jax.ShapeDtypeStruct((1, 4 * cfg.upsample_scale, cfg.num_harmonics), jnp.float32)
    shapes = jax.eval_shape(lambda m, n: HiFTGenerator(cfg).init(jax.random.key(0), m, n), mel, noise)["params"]
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith("['alpha']"):
            return np.ones(s.shape, np.float32)
        if name.endswith("['bias']"):
            return np.zeros(s.shape, np.float32)
        return (rng.standard_normal(s.shape) * 0.01).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def conv_flops(cfg: HiFTConfig, frames: int) -> float:
    """Multiply-adds x2 of every conv/matmul in the generator + f0 predictor for `frames` mel frames."""
    c, macs = cfg, 0
    ch = c.f0_cond_channels
    macs += frames * ((4 if c.causal else 3) * c.in_channels * ch + (c.f0_num_layers - 1) * 3 * ch * ch)
    macs += frames * (c.conv_pre_look_right + 1 if c.causal else 7) * c.in_channels * c.base_channels
    per, cin = 1, c.base_channels
    for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)):
        per *= u
        cout = c.stage_channels(i)
        n = frames * per + (1 if i == c.num_upsamples - 1 else 0)
        # CV3: nearest x u then a k-tap conv at the output rate; CV2 ConvTranspose: k taps per *input* frame
        macs += (n if c.causal else frames * per // u) * k * cin * cout
        blocks = list(c.resblock_kernel_sizes) + [c.source_resblock_kernel_sizes[i]]
        macs += sum(n * 2 * len(c.resblock_dilation_sizes[0]) * kk * cout * cout for kk in blocks)
        macs += n * (1 if c.source_down_rates[i] == 1 else 2 * c.source_down_rates[i]) * (c.n_fft + 2) * cout
        cin = cout
    macs += (frames * c.upsample_total + 1) * 7 * cin * (c.n_fft + 2)
    return 2.0 * macs


def _time(fn, reps: int) -> tuple[float, list[float]]:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), ts


def bench_version(version: str, args, precision: str):
    cfg = HiFTConfig.from_model_config(ModelConfig.from_dir(os.path.join(FULLSIZE, version), need_qwen=False))
    params = device_params(random_params(cfg), cfg)
    mel = (np.random.default_rng(1).standard_normal((1, args.frames, cfg.in_channels)) * 2 - 5).astype(np.float32)
    key = None if cfg.causal else jax.random.key(0)
    dtype = None if args.dtype == "float32" else jnp.bfloat16

    def call():
        return vocode(params, cfg, mel, key=key, precision=precision, dtype=dtype)[0]

    t0 = time.perf_counter()
    wav = jax.block_until_ready(call())
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        jax.block_until_ready(call())
    total, _ = _time(call, args.reps)

    # the two jitted stages alone (same bucket; no host-side checks, padding or trimming)
    tb = bucket_length(args.frames)
    mel_p = jnp.asarray(np.pad(mel, ((0, 0), (0, tb - args.frames), (0, 0))))
    lengths = jnp.asarray([args.frames], jnp.int32)
    f0p, rest = _split(params)
    with x64_enabled():
        f0, phase = _stage_f0(f0p, mel_p, lengths, cfg=cfg)
        f0_ms, _ = _time(lambda: _stage_f0(f0p, mel_p, lengths, cfg=cfg), max(3, args.reps // 2))
    wave_ms, _ = _time(lambda: _stage_wave(rest, mel_p, lengths, f0, phase, None, key, None, cfg=cfg,
                                           precision=precision, dtype=dtype)[0], max(3, args.reps // 2))
    return dict(version=version, precision=precision, compile_s=compile_s, total_ms=total, f0_ms=f0_ms,
                wave_ms=wave_ms, gflops=conv_flops(cfg, tb) / (total * 1e-3) / 1e9, wav=np.asarray(wav),
                bucket=tb)


def bench_stream(seconds: int, model: str) -> None:
    if model == "tiny":
        from convert.registry import convert_component

        mc = ModelConfig.from_dir(os.path.join(os.path.dirname(__file__), "..", "tests", "golden", "cosyvoice3",
                                               "modeldir"))
        cfg = HiFTConfig.from_model_config(mc)
        params = device_params(convert_component("hift", mc), cfg)
    else:
        cfg = HiFTConfig.from_model_config(ModelConfig.from_dir(os.path.join(FULLSIZE, "cosyvoice3"), need_qwen=False))
        params = device_params(random_params(cfg), cfg)
    n_tok = seconds * 25
    mel = (np.random.default_rng(1).standard_normal((1, 2 * n_tok, cfg.in_channels)) * 2 - 5).astype(np.float32)
    pushes = [(2 * c.token_offset, 2 * (c.n_tokens if c.finalize else c.n_tokens - 3), c.finalize)
              for c in plan_schedule(n_tok, 0)]

    def incremental():
        inc = IncrementalVocoderCV3(params, cfg)
        out = []
        for lo, hi, fin in pushes:
            t0 = time.perf_counter()
            audio, frames = inc.push(mel[:, lo:hi], fin)
            out.append((time.perf_counter() - t0, audio, frames))
        return out

    def recompute():
        out, emitted = [], 0
        for _, hi, fin in pushes:
            t0 = time.perf_counter()
            audio = np.asarray(vocode(params, cfg, mel[:, :hi], finalize=fin)[0])[:, emitted:]
            emitted += audio.shape[1]
            out.append((time.perf_counter() - t0, audio, hi))
        return out

    print(f"CV3 streaming vocoder, {model} model, {seconds} s ({2 * n_tok} mel frames, {len(pushes)} pushes)")
    runs = {}
    for name, fn in (("incremental", incremental), ("recompute", recompute)):
        cold = fn()
        warm = fn()
        runs[name] = warm
        print(f"{name:<12} first run {sum(r[0] for r in cold):8.2f} s (with compilation), warm run "
              f"{sum(r[0] for r in warm):8.2f} s; non-final vocoder frames {sum(r[2] for r in warm[:-1])}")
        print(f"{'':<12} warm per push (s): " + " ".join(f"{r[0]:.2f}" for r in warm), flush=True)
    emitted = sum(r[1].shape[1] for r in runs["incremental"][:-1]) // cfg.upsample_scale
    err = max(float(np.linalg.norm(a[1] - b[1]) / max(np.linalg.norm(b[1]), 1e-30))
              for a, b in zip(runs["incremental"], runs["recompute"]))
    print(f"non-final pushes emit {emitted} frames; max per-push rel-L2 incremental vs recompute {err:.2e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=500)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", choices=("highest", "default", "both"), default="both")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--versions", default="cosyvoice2,cosyvoice3")
    ap.add_argument("--stream", type=int, default=0, help="seconds of streamed CV3 audio (incremental vs recompute)")
    ap.add_argument("--model", choices=("tiny", "fullsize"), default="tiny")
    args = ap.parse_args(argv)
    if args.stream:
        bench_stream(args.stream, args.model)
        return 0

    dev = jax.devices()[0]
    kind = "gpu" if dev.platform == "gpu" else "cpu"
    cores = os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device: {dev.platform} {dev.device_kind} | host {platform.processor() or platform.machine()} "
          f"{cores} cores, load avg {load:.1f} | jax {jax.__version__}")
    print(f"vocode of {args.frames} mel frames ({args.frames * 480} samples, bucket {bucket_length(args.frames)}), "
          f"median of {args.reps} after {args.warmup} warm-up; conv dtype {args.dtype}")
    precisions = ("highest", "default") if args.precision == "both" else (args.precision,)
    rows = []
    for v in [s for s in args.versions.split(",") if s]:
        for p in precisions:
            rows.append(bench_version(v, args, p))
            r = rows[-1]
            up = UPSTREAM_MS[kind][v] if args.frames == 500 else float("nan")  # upstream timed 500 frames
            if len(rows) == 1:
                print(f"{'version':<11} {'dtype':<9} {'precision':<9} {'compile s':>9} {'f0 ms':>9} {'wave ms':>10} "
                      f"{'total ms':>10} {'GFLOP/s':>8} {'upstream ms':>12} {'ours/upstream':>13}")
            print(f"{v:<11} {args.dtype:<9} {p:<9} {r['compile_s']:>9.1f} {r['f0_ms']:>9.2f} {r['wave_ms']:>10.2f} "
                  f"{r['total_ms']:>10.2f} {r['gflops']:>8.1f} {up:>12.1f} {r['total_ms'] / up:>13.2f}", flush=True)
    if len(precisions) == 2:
        for v in {r["version"] for r in rows}:
            a, b = [r["wav"] for r in rows if r["version"] == v]
            diff = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
            print(f"{v}: wav highest vs default precision: rel-L2 {diff:.3e}, max-abs {np.max(np.abs(a - b)):.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
