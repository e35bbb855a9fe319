"""Benchmark the full-size speech LM (Qwen2-0.5B backbone, random weights from tests/fullsize/<version>).

    python bench/bench_llm.py                                # 128-position prefill, 250 tokens, B 1 and 16, f32 + bf16
    python bench/bench_llm.py --tokens 32 --batches 1 --dtypes float32 --reps 2   # a quick CPU run
    python bench/bench_llm.py --model-dir tests/golden/cosyvoice2/modeldir --prompt 32 --tokens 64 \
        --batches 1 --dtypes float32             # the tiny golden model (same architecture, small sizes)

* prefill: the jitted prefill program (embed 128 prompt positions, fill the KV cache, first log-probs).
* decode: `generate(...)` end to end (host prep, prefill, the whole jitted decode loop with RAS
  sampling, device sync) with stop ids masked (`min_len = max_len = n`, `min_len_mask='stop_set'`)
  so every run has exactly n steps; ms/token = (t(tokens) - t(tokens // 2)) / (tokens - tokens // 2),
  both runs on the same compiled program (fixed cache_len), so prefill and host costs cancel.
Median (or `--stat min`) of `--reps` timed calls after one warm-up call (compilation excluded). Reference: upstream
PyTorch CosyVoice2 LLM decodes about 115 ms/token on 2 CPU cores (fp32, batch 1).
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
from cosyjax.llm import generate as G  # noqa: E402
from cosyjax.llm.config import LLMConfig  # noqa: E402
from cosyjax.llm.speech_lm import abstract_params, cast_params  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_STAT = {"median": statistics.median, "min": min}  # min: robust when other processes share the CPU


def _median_time(fn, reps, stat="median"):
    fn()  # warm-up (compiles)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return _STAT[stat](times)


def random_params(cfg, seed):
    """N(0, 0.02) matrices and unit norm scales with `init_params`' tree (NumPy RNG: fast for 0.5 B)."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.ones(a.shape, jnp.float32)
        return jnp.asarray(rng.standard_normal(a.shape, dtype=np.float32) * np.float32(0.02))

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(cfg))


def _inputs(cfg, batch, prompt_positions, rng):
    """Prompt of exactly `prompt_positions` positions: 30 text ids, the rest prompt speech tokens."""
    n_text = 30
    n_speech = prompt_positions - 2 - n_text
    text = rng.integers(0, cfg.vocab_size, (batch, n_text)).astype(np.int32)
    if cfg.endofprompt_id is not None:
        text[:, 0] = cfg.endofprompt_id
    speech = rng.integers(0, cfg.speech_token_size, (batch, n_speech)).astype(np.int32)
    return text, speech


def bench(version, dtypes, batches, tokens, prompt_positions, reps, seed=0, model_dir=None, stat="median"):
    mc = ModelConfig.from_dir(model_dir or os.path.join(HERE, "tests", "fullsize", version))
    base = LLMConfig.from_model_config(mc, min_len_mask="stop_set")
    t0 = time.perf_counter()
    params32 = random_params(base, seed)
    print(f"random init {time.perf_counter() - t0:.1f} s "
          f"({sum(a.size for a in jax.tree_util.tree_leaves(params32)) / 1e6:.1f} M params)", flush=True)
    rng = np.random.default_rng(seed)
    rows = []
    for dtype in dtypes:
        cfg = base.replace(dtype=dtype)
        params = params32 if dtype == "float32" else cast_params(params32, dtype)
        for B in batches:
            text, speech = _inputs(cfg, B, prompt_positions, rng)
            key = jax.random.PRNGKey(1)
            p = G.prepare(cfg, text, prompt_speech_token=speech, key=key, min_len=tokens, max_len=tokens)
            assert p.ids.shape[1] == G.bucket_length(prompt_positions)
            args = (params, jnp.asarray(p.ids), jnp.asarray(p.kind), jnp.asarray(p.start), jnp.asarray(p.min_len),
                    jnp.asarray(p.max_len), p.draws)

            def run_prefill():
                st = G._prefill_program(*args, cfg=cfg, capacity=p.capacity)
                jax.block_until_ready(st.logp)

            def run_generate(n_tok):
                toks, n = G.generate(params, cfg, text, prompt_speech_token=speech, key=key, min_len=n_tok,
                                     max_len=n_tok, cache_len=p.capacity)  # same compiled program for both
                n = np.asarray(n)
                assert np.all(n == n_tok), n

            half = tokens // 2
            t_pre = _median_time(run_prefill, reps, stat)
            t_gen = _median_time(lambda: run_generate(tokens), reps, stat)
            t_half = _median_time(lambda: run_generate(half), reps, stat)
            ms_tok = (t_gen - t_half) / (tokens - half) * 1e3
            rows.append((dtype, B, t_pre * 1e3, t_gen, ms_tok, B * 1e3 / ms_tok))
            print(f"  {dtype:9s} B={B:<3d} prefill {t_pre * 1e3:8.1f} ms  generate {t_gen:7.2f} s  "
                  f"{ms_tok:7.1f} ms/token", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", default="cosyvoice2", choices=["cosyvoice2", "cosyvoice3"])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--tokens", type=int, default=250)
    ap.add_argument("--prompt", type=int, default=128, help="prompt positions (prefill length)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--stat", default="median", choices=sorted(_STAT), help="statistic over the timed reps")
    ap.add_argument("--model-dir", default=None,
                    help="model folder (yaml + CosyVoice-BlankEN/config.json); default tests/fullsize/<version>")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    name = f"{dev.platform}:{getattr(dev, 'device_kind', '')}"
    if dev.platform == "cpu":
        name += f" ({os.cpu_count()} cores)"
    print(f"device {name}, jax {jax.__version__}, {args.model_dir or args.version}, prompt {args.prompt} positions, "
          f"{args.tokens} decode steps, RAS sampling, {args.stat} of {args.reps}")
    rows = bench(args.version, [d for d in args.dtypes.split(",") if d], [int(b) for b in args.batches.split(",")],
                 args.tokens, args.prompt, args.reps, model_dir=args.model_dir,
                 stat=args.stat)
    print()
    print(f"| device | dtype | batch | prefill {args.prompt} (ms) | generate {args.tokens} tok (s) | "
          "decode ms/token | tokens/s (all rows) |")
    print("|---|---|---|---|---|---|---|")
    for dtype, B, pre, gen, mst, tps in rows:
        print(f"| {name} | {dtype} | {B} | {pre:.1f} | {gen:.2f} | {mst:.1f} | {tps:.1f} |")
    print("reference: upstream PyTorch CosyVoice2 LLM, 2 CPU cores, fp32, batch 1: ~115 ms/token")


if __name__ == "__main__":
    main()
