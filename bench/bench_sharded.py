"""A batch of requests sharded over a 'data' mesh vs one device: row-for-row equality and throughput.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python bench/bench_sharded.py --devices 4 --batch 8
    python bench/bench_sharded.py --devices 8 --batch 64          # a multi-GPU host

Runs `Engine.synthesize_batch` on the tiny golden CV3 model (greedy LLM, fixed vocoder noise) once with
all rows on one device and once with the rows sharded `batch / devices` per device (parameters
replicated). Prints the worst per-row rel-L2 between the two and both wall times (warm, median of
`--reps`), i.e. the same-run throughput ratio. Multi-host: start every process with the same command
after `jax.distributed.initialize()` (see README "Batches across devices").
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


def requests(n: int, golden: str):
    with np.load(os.path.join(golden, "cosyvoice3", "e2e", "inputs.npz")) as z:
        base = {k: z[k] for k in z.files}
    out = []
    for i in range(n):
        P = 20 - (i % 5)
        out.append({"text": base["text"][:, : 3 + (i % 4)], "prompt_text": base["prompt_text"],
                    "llm_prompt_speech_token": base["llm_prompt_speech_token"][:, :P],
                    "flow_prompt_speech_token": base["flow_prompt_speech_token"][:, :P],
                    "prompt_speech_feat": base["prompt_speech_feat"][:, : 2 * P],
                    "flow_embedding": base["flow_embedding"] * (1.0 + 0.05 * i)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--golden", default=os.environ.get("COSYJAX_GOLDEN", os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "golden")))
    args = ap.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")
    from cosyjax.config import ModelConfig
    from cosyjax.model_cache import load_or_convert_params
    from cosyjax.pipeline import Engine, PipelineConfig

    mc = ModelConfig.from_dir(os.path.join(args.golden, "cosyvoice3", "modeldir"))
    params, _ = load_or_convert_params(mc, use_cache=False)
    cfg = PipelineConfig.from_model_config(mc, sampling="ras")
    reqs = requests(args.batch, args.golden)
    keys = [jax.random.PRNGKey(i) for i in range(args.batch)]
    one = Engine(params, cfg)
    many = Engine(params, cfg, devices=args.devices)
    print(f"{jax.device_count()} {jax.devices()[0].platform} devices; mesh {dict(many.mesh.shape)}; batch {args.batch}")
    res, times = {}, {}
    for name, eng in (("1 device", one), (f"{args.devices} devices", many)):
        eng.synthesize_batch(reqs, keys, max_len=40)  # compile
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            res[name] = eng.synthesize_batch(reqs, keys, max_len=40)
            ts.append(time.perf_counter() - t0)
        times[name] = statistics.median(ts)
    a, b = res["1 device"], res[f"{args.devices} devices"]

    def worst_of(xs, ys):
        return max(float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-12)) if x.shape == y.shape
                   else float("inf") for x, y in zip(xs, ys))

    worst = worst_of(a, b)
    # the same rows on one device in slices of the per-device batch: the same programs the mesh runs
    per = -(-args.batch // args.devices)
    sliced = [w for i in range(0, args.batch, per)
              for w in one.synthesize_batch(reqs[i:i + per], keys[i:i + per], max_len=40)]
    print(f"{'setting':>12} {'wall s':>8} {'rows/s':>8}")
    for name, t in times.items():
        print(f"{name:>12} {t:>8.3f} {args.batch / t:>8.2f}")
    print(f"throughput ratio ({args.devices} devices / 1): {times['1 device'] / times[f'{args.devices} devices']:.2f}x")
    print(f"max per-row rel-L2 sharded vs one device (batch {args.batch} in one call): {worst:.3e}")
    print(f"max per-row rel-L2 one device, batch {args.batch} vs batches of {per}: {worst_of(a, sliced):.3e} "
          "(XLA's batch-size dependent rounding, no sharding involved)")
    same = worst_of(sliced, b)
    print(f"max per-row rel-L2 sharded vs one device in batches of {per}: {same:.3e}")
    return 0 if same <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
