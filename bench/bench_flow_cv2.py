"""Benchmark the full-size CosyVoice2 flow (random weights from the full-size config).

    python bench/bench_flow_cv2.py                      # 250 new + 75 prompt tokens, 10 steps, fp32 + bf16
    python bench/bench_flow_cv2.py --dtype float32 --reps 3 --steps 10
    python bench/bench_flow_cv2.py --bucketed           # the real API's bucket (325 -> 384 tokens)
    python bench/bench_flow_cv2.py --streaming --no-finalize

Times `flow_inference` end to end (host packing, jitted encoder + 10-step solve, device sync):
median of `--reps` calls after `--warmup` calls, plus the encoder alone and one estimator call
(CFG batch of 2). Prints the device; on GPU also the attention kernels found in the compiled HLO
(`__cudnn$fmha` custom calls) and the bf16-vs-fp32 mel rel-L2.
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
from cosyjax.flow.cv2.config import FlowCV2Config  # noqa: E402
from cosyjax.flow.cv2.model import (DEFAULT_BUCKETS, FlowCV2, cast_matmul_weights, flow_core,  # noqa: E402
                                    flow_inference, init_params, pack_inputs)
from cosyjax.flow.masks import padding_mask  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FULLSIZE = os.path.join(os.path.dirname(HERE), "tests", "fullsize", "cosyvoice2")


def _median_time(fn, reps: int, warmup: int) -> tuple[float, float, float]:
    """(first call incl. compile, median, min) in seconds."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), min(times)


def random_params(cfg, seed: int = 0):
    """Random full-size parameters on the module's tree (numpy fill: seconds, where `init` takes minutes
    on CPU): kernels ~ N(0, 1/fan_in), norm scales 1, biases 0, embeddings / pos biases ~ N(0, 0.1)."""
    rng = np.random.default_rng(seed)
    shapes = init_params(cfg, abstract=True)

    def fill(path, a):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            fan_in = int(np.prod(a.shape[:-1]))
            v = rng.standard_normal(a.shape, np.float32) / np.float32(np.sqrt(fan_in))
        elif name.endswith("['scale']"):
            v = np.ones(a.shape, np.float32)
        elif name.endswith("['bias']"):
            v = np.zeros(a.shape, np.float32)
        else:
            v = rng.standard_normal(a.shape, np.float32) * np.float32(0.1)
        return jnp.asarray(v)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def attention_kernels(cfg, params, packed, dtype, streaming, n_steps, attention) -> str:
    """Which attention implementation the compiled flow uses (from the optimised HLO text)."""
    lowered = flow_core.lower(params, packed["tokens"], packed["n_tokens"], packed["n_prompt"], packed["lookahead"],
                              packed["cond"], packed["embedding"], packed["noise"], cfg=cfg, streaming=streaming,
                              n_timesteps=n_steps, dtype=dtype, attention_impl=attention)
    text = lowered.compile().as_text()
    n = text.count("__cudnn$fmha")
    return f"cudnn fmha x{n}" if n else "xla (no fused attention kernel)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="both", choices=("float32", "bfloat16", "both"))
    ap.add_argument("--tokens", type=int, default=250)
    ap.add_argument("--prompt", type=int, default=75)
    ap.add_argument("--steps", type=int, default=10, help="ODE steps (upstream: 10)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--streaming", action="store_true", help="chunk masks (upstream streaming=True)")
    ap.add_argument("--no-finalize", dest="finalize", action="store_false",
                    help="finalize=False (last 3 tokens are look-ahead context only)")
    ap.add_argument("--bucketed", action="store_true", help="pad to the default buckets (else exact length)")
    ap.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn", "pallas"))
    args = ap.parse_args(argv)

    cfg = FlowCV2Config.from_model_config(ModelConfig.from_dir(FULLSIZE))
    dev = jax.devices()[0]
    print(f"device: {dev.platform} {dev.device_kind} ({jax.device_count()} device(s)); jax {jax.__version__}; "
          f"host cores {os.cpu_count()}")
    t0 = time.perf_counter()
    params = random_params(cfg)
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
    packed = pack_inputs(cfg, *inputs, finalize=args.finalize, buckets=buckets)
    frames = packed["tokens"].shape[1] * cfg.token_mel_ratio
    new_tokens = N - (0 if args.finalize else cfg.pre_lookahead_len)
    audio_s = new_tokens * cfg.token_mel_ratio * 480 / 24000

    dtypes = ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,)
    rows, mels = [], {}
    for dt in dtypes:
        p = cast_matmul_weights(params, dt) if dt != "float32" else params
        module = FlowCV2(cfg, jnp.dtype(dt), args.attention)
        tokens, n_tok = jnp.asarray(packed["tokens"]), jnp.asarray(packed["n_tokens"])
        n_enc = n_tok - jnp.asarray(packed["lookahead"])
        encode = jax.jit(lambda p_: module.apply({"params": p_}, tokens, n_tok, n_enc, args.streaming,
                                                 method=FlowCV2.encode)[1])
        mu = encode(p)
        T = mu.shape[1]
        x2 = jnp.asarray(rng.normal(size=(2, T, cfg.output_size)).astype(np.float32))
        mask2 = jnp.broadcast_to(padding_mask(n_enc * cfg.token_mel_ratio, T), (2, T))
        spks2 = jnp.zeros((2, cfg.output_size))
        estimate = jax.jit(lambda p_: module.apply({"params": p_}, x2, mask2, jnp.concatenate([mu, mu * 0]),
                                                   jnp.full((2,), 0.5), spks2, x2 * 0, args.streaming,
                                                   method=FlowCV2.estimate))

        def call():
            mel, _ = flow_inference(p, cfg, *inputs, streaming=args.streaming, finalize=args.finalize,
                                    n_timesteps=args.steps, dtype=dt, attention_impl=args.attention, buckets=buckets)
            return mel

        first, med, mn = _median_time(call, args.reps, args.warmup)
        _, enc_med, _ = _median_time(lambda: encode(p), args.reps, args.warmup)
        _, est_med, _ = _median_time(lambda: estimate(p), args.reps, args.warmup)
        kernel = (attention_kernels(cfg, p, packed, dt, args.streaming, args.steps, args.attention)
                  if dev.platform == "gpu" else "-")
        mels[dt] = np.asarray(call(), np.float64)
        rows.append((dt, first, med, mn, med / audio_s, enc_med, est_med, kernel))
        print(f"  {dt}: first call {first:.2f} s, median {med:.3f} s over {args.reps}", flush=True)

    print()
    e, u = cfg.encoder, cfg.unet
    print(f"CosyVoice2 flow, full size (encoder d {e.output_size} x {e.num_blocks}+{e.num_up_blocks} layers, U-Net "
          f"{u.channels[0]} ch x {u.n_blocks * (2 + u.num_mid_blocks)} transformer blocks), {N} tokens + {P} prompt "
          f"tokens -> {frames} frames computed ({'bucketed' if args.bucketed else 'exact length'}), {args.steps} "
          f"steps, CFG batch 2, streaming={args.streaming}, finalize={args.finalize}, device {dev.device_kind}")
    head = (f"{'dtype':<9} {'compile+1st (s)':>15} {'median (s)':>11} {'min (s)':>9} {'RTF':>7} "
            f"{'encoder (s)':>12} {'1 estimator (s)':>16}  attention")
    print(head)
    print("-" * len(head))
    for dt, first, med, mn, rtf, enc, est, kernel in rows:
        print(f"{dt:<9} {first:>15.2f} {med:>11.3f} {mn:>9.3f} {rtf:>7.3f} {enc:>12.4f} {est:>16.4f}  {kernel}")
    if "float32" in mels and "bfloat16" in mels:
        a, b = mels["bfloat16"], mels["float32"]
        print(f"bf16 vs fp32 mel rel-L2: {np.linalg.norm(a - b) / np.linalg.norm(b):.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
