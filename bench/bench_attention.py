"""Attention micro-benchmark at the models' shapes: the Pallas kernel vs cuDNN vs XLA (`cosyjax.nn.attention`).

    python bench/bench_attention.py                 # on a GPU: bf16, every implementation that can run
    python bench/bench_attention.py --dtype float32 --reps 50
    python bench/bench_attention.py --cpu-smoke     # tiny shapes on CPU: xla vs pallas_interpret, 1 rep

Cases (full-size shapes; CFG doubles the flow batch): CV3 DiT self-attention offline (key-padding
mask) and streaming (chunk 50 as `chunk_size`, and as the dense mask the flow builds today), CV2 U-Net
(key padding), CV2 Conformer (relative-position bias + key padding), Qwen2 prefill (GQA 14/2, causal
mask over the KV cache) at batch 1 and 16. Each implementation is jitted once and timed as the median
of `--reps` calls after a warm-up; 'max rel' is max |out - xla| / max |xla|. An implementation that
cannot serve a case prints the CapabilityError reason instead of a time.
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

from cosyjax.errors import CapabilityError  # noqa: E402
from cosyjax.nn.attention import attention, block_causal_mask  # noqa: E402


def cases(smoke: bool):
    """(name, B, T, S, H, K, D, kind) with kind in padding | chunk | chunk_dense | bias | causal."""
    if smoke:
        return [("dit_offline", 2, 40, 40, 2, 2, 32, "padding"), ("dit_stream_chunk", 2, 40, 40, 2, 2, 32, "chunk"),
                ("conformer_bias", 1, 24, 24, 2, 2, 32, "bias"), ("qwen2_prefill", 2, 16, 40, 4, 2, 32, "causal")]
    return [("dit_offline", 2, 1000, 1000, 16, 16, 64, "padding"),
            ("dit_stream_chunk", 2, 1000, 1000, 16, 16, 64, "chunk"),
            ("dit_stream_dense", 2, 1000, 1000, 16, 16, 64, "chunk_dense"),
            ("unet_offline", 2, 1000, 1000, 8, 8, 64, "padding"),
            ("conformer_bias", 1, 500, 500, 8, 8, 64, "bias"),
            ("qwen2_prefill_b1", 1, 128, 384, 14, 2, 64, "causal"),
            ("qwen2_prefill_b16", 16, 128, 384, 14, 2, 64, "causal")]


def operands(B, T, S, H, K, D, kind, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), dtype)
    k = jnp.asarray(rng.normal(size=(B, S, K, D)), dtype)
    v = jnp.asarray(rng.normal(size=(B, S, K, D)), dtype)
    kvl = jnp.asarray(np.maximum(1, (S * np.linspace(1.0, 0.8, B)).astype(np.int32)))
    kw = {}
    if kind == "padding":
        kw["mask"] = (jnp.arange(S)[None, :] < kvl[:, None])[:, None, None, :]
    elif kind == "chunk":
        kw.update(kv_lengths=kvl, chunk_size=50 if T > 100 else 8)
    elif kind == "chunk_dense":
        kw["mask"] = block_causal_mask(T, S, 50)[None, None] & (jnp.arange(S)[None, :] < kvl[:, None])[:, None, None]
    elif kind == "bias":
        kw.update(mask=(jnp.arange(S)[None, :] < kvl[:, None])[:, None, None, :],
                  bias=jnp.asarray(rng.normal(size=(B, H, T, S)), jnp.float32))
    elif kind == "causal":  # T new positions written at slots S-T .. S-1 of an S-slot cache
        pos = (S - T) + jnp.arange(T)
        kw["mask"] = jnp.broadcast_to(jnp.arange(S)[None, :] <= pos[:, None], (B, 1, T, S))
    return q, k, v, kw


def time_call(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--impls", default=None, help="comma list (default xla,cudnn,pallas; smoke: xla,pallas_interpret)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, CPU, 1 rep")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    impls = (args.impls or ("xla,pallas_interpret" if smoke else "xla,cudnn,pallas")).split(",")
    reps = 1 if smoke else args.reps
    dtype = jnp.dtype(args.dtype)
    dev = jax.devices()[0]
    print(f"device {dev.platform}:{getattr(dev, 'device_kind', '')}; jax {jax.__version__}; {dtype.name}; "
          f"median of {reps}", flush=True)
    rows = []
    for name, B, T, S, H, K, D, kind in cases(smoke):
        q, k, v, kw = operands(B, T, S, H, K, D, kind, dtype)
        mask, rest = kw.pop("mask", None), kw
        ref = None
        for impl in impls:
            fn = jax.jit(lambda q, k, v, m, impl=impl: attention(q, k, v, m, implementation=impl, **rest))
            try:
                secs = time_call(fn, (q, k, v, mask), reps)
            except CapabilityError as e:
                rows.append((name, impl, None, None, str(e)))
                continue
            out = np.asarray(fn(q, k, v, mask), np.float32)
            if ref is None and impl == "xla":
                ref = out
            rel = None if ref is None else float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
            flops = 4.0 * B * T * S * H * D
            rows.append((name, impl, secs, rel, f"{flops / secs / 1e9:.1f} GFLOP/s (dense T x S count)"))
            print(f"{name} {impl}: {secs * 1e3:.3f} ms", flush=True)
    print()
    print("| case | impl | ms | max rel vs xla | note |")
    print("|---|---|---|---|---|")
    for name, impl, secs, rel, note in rows:
        ms = "-" if secs is None else f"{secs * 1e3:.3f}"
        r = "-" if rel is None else f"{rel:.1e}"
        print(f"| {name} | {impl} | {ms} | {r} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
