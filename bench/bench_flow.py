"""Benchmark the full-size CosyVoice3 flow (random weights from the full-size config).

    python bench/bench_flow.py                      # 250 new + 75 prompt tokens, 10 steps, fp32 + bf16
    python bench/bench_flow.py --dtype float32 --reps 3 --steps 10
    python bench/bench_flow.py --bucketed           # the real API's bucket (325 -> 384 tokens)

Times `flow_inference` end to end (host packing, jitted solve, device sync): median of `--reps`
calls after `--warmup` calls. Prints a table with the device name; on GPU also the attention kernel
found in the compiled HLO (`__cudnn$fmha` custom calls) and the bf16-vs-fp32 mel rel-L2.
Reference: upstream PyTorch on 2 CPU cores takes about 31 s for this call (fp32, 10 steps).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cosyjax.config import ModelConfig  # noqa: E402
from cosyjax.flow.cv3.config import FlowCV3Config  # noqa: E402
from cosyjax.flow.cv3.model import (DEFAULT_BUCKETS, cast_matmul_weights, flow_core, flow_inference,  # noqa: E402
                                    init_params, pack_inputs)

HERE = os.path.dirname(os.path.abspath(__file__))
FULLSIZE = os.path.join(os.path.dirname(HERE), "tests", "fullsize", "cosyvoice3")


def attention_kernels(cfg, params, packed, dtype, streaming, n_steps) -> str:
    """Which attention implementation the compiled flow uses (from the optimised HLO text)."""
    lowered = flow_core.lower(params, packed["tokens"], packed["n_tokens"], packed["n_prompt"], packed["lookahead"],
                              packed["cond"], packed["embedding"], packed["noise"], cfg=cfg, streaming=streaming,
                              n_timesteps=n_steps, dtype=dtype)
    text = lowered.compile().as_text()
    found = []
    if "__cudnn$fmha" in text:
        found.append(f"cudnn fmha x{text.count('__cudnn$fmha')}")
    if "triton" in text.lower() or "__gpu$xla.gpu.triton" in text:
        found.append("triton")
    return ", ".join(found) or "xla (no fused attention kernel)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="both", choices=("float32", "bfloat16", "both"))
    ap.add_argument("--tokens", type=int, default=250)
    ap.add_argument("--prompt", type=int, default=75)
    ap.add_argument("--steps", type=int, default=10, help="ODE steps (upstream: 10)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--streaming", action="store_true", help="chunk masks (upstream streaming=True)")
    ap.add_argument("--bucketed", action="store_true", help="pad to the default buckets (else exact length)")
    ap.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn", "pallas"))
    args = ap.parse_args(argv)

    mc = ModelConfig.from_dir(FULLSIZE)
    cfg = FlowCV3Config.from_model_config(mc)
    dev = jax.devices()[0]
    print(f"device: {dev.platform} {dev.device_kind} ({jax.device_count()} device(s)); jax {jax.__version__}; "
          f"host cores {os.cpu_count()}")
    t0 = time.perf_counter()
    params = init_params(cfg, jax.random.PRNGKey(0))
    jax.block_until_ready(params)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(params))
    print(f"random init: {n_params / 1e6:.1f} M parameters in {time.perf_counter() - t0:.1f} s")

    rng = np.random.default_rng(0)
    P, N = args.prompt, args.tokens
    token = rng.integers(0, cfg.vocab_size, (1, N)).astype(np.int32)
    prompt_token = rng.integers(0, cfg.vocab_size, (1, P)).astype(np.int32)
    prompt_feat = rng.normal(-5.0, 2.0, (1, 2 * P, cfg.output_size)).astype(np.float32)
    embedding = rng.normal(size=(1, cfg.spk_embed_dim)).astype(np.float32)
    buckets = DEFAULT_BUCKETS if args.bucketed else (P + N,)
    inputs = (token, [N], prompt_token, [P], prompt_feat, [2 * P], embedding)
    packed = pack_inputs(cfg, *inputs, finalize=True, buckets=buckets)
    frames = packed["tokens"].shape[1] * cfg.token_mel_ratio
    audio_s = N * cfg.token_mel_ratio * 480 / 24000

    dtypes = ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,)
    rows, mels = [], {}
    for dt in dtypes:
        p = cast_matmul_weights(params, dt) if dt != "float32" else params

        def call():
            mel, _ = flow_inference(p, cfg, *inputs, streaming=args.streaming, finalize=True, n_timesteps=args.steps,
                                    dtype=dt, attention_impl=args.attention, buckets=buckets)
            return jax.block_until_ready(mel)

        t0 = time.perf_counter()
        mel = call()
        first = time.perf_counter() - t0
        for _ in range(max(0, args.warmup - 1)):
            call()
        times, cpu = [], []
        for _ in range(args.reps):
            t0, c0 = time.perf_counter(), time.process_time()
            call()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        kernel = attention_kernels(cfg, p, packed, dt, args.streaming, args.steps) if dev.platform == "gpu" else "-"
        mels[dt] = np.asarray(mel, np.float64)
        med = statistics.median(times)
        rows.append((dt, first, med, min(times), statistics.median(cpu), med / audio_s, kernel))
        print(f"  {dt}: first call {first:.2f} s, median {med:.3f} s over {args.reps}", flush=True)

    print()
    print(f"CosyVoice3 flow, full size (dim {cfg.dim}, depth {cfg.depth}), {N} tokens + {P} prompt tokens "
          f"-> {frames} frames computed ({'bucketed' if args.bucketed else 'exact length'}), {args.steps} steps, "
          f"CFG batch 2, streaming={args.streaming}, device {dev.device_kind}")
    head = (f"{'dtype':<9} {'compile+1st (s)':>15} {'median (s)':>11} {'min (s)':>9} {'CPU-s/call':>10} {'RTF':>7}"
            "  attention")
    print(head)
    print("-" * len(head))
    for dt, first, med, mn, cpu_s, rtf, kernel in rows:
        print(f"{dt:<9} {first:>15.2f} {med:>11.3f} {mn:>9.3f} {cpu_s:>10.2f} {rtf:>7.3f}  {kernel}")
    if "float32" in mels and "bfloat16" in mels:
        a, b = mels["bfloat16"], mels["float32"]
        print(f"bf16 vs fp32 mel rel-L2: {np.linalg.norm(a - b) / np.linalg.norm(b):.3e}")
    print("RTF = median wall time / audio seconds (new tokens x 40 ms); CPU-s/call = process CPU time (all threads),"
          " the fairer number on a shared host")
    print("reference: upstream PyTorch, 2 CPU cores, fp32, 10 steps: ~31 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
