"""Streaming token2wav benchmark: time per chunk against chunk index, incremental vs recompute, one run.

    python bench/bench_stream.py --seconds 10 20            # full-size CV3 (random weights), this CPU
    python bench/bench_stream.py --seconds 10 30 60 --dtype bfloat16   # on a GPU
    python bench/bench_stream.py --tiny --seconds 30 60     # the tiny golden model (plumbing, quick)
    python bench/bench_stream.py --seconds 20 --max-hop 50 --modes incremental   # equal hops after the first

The LLM is left out: fixed random speech tokens arrive all at once, so the table shows the flow + vocoder
cost of each chunk of upstream's schedule (hops 25+pad, 50, 100, 100, ... tokens; the last chunk full
attention). `--max-hop 50` caps the hop at 50 tokens (upstream's `token_max_hop_len`), so every chunk after
the first is as long as the second and last/2nd compares equal chunks. `recompute` is upstream's algorithm (every chunk re-solves the whole prefix and CV3 re-vocodes
the whole mel); `incremental` keeps the per-step DiT K/V and the causal vocoder state. Each chunk is
timed including its host<->device transfers; each mode runs the whole utterance once untimed first
(compilation of every chunk shape), and time-to-first-audio is the first chunk's time after that. Prints one row per
chunk, then per length: TTFA, last-non-final / second chunk ratio, total, and the same-run speed-up.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _models(tiny: bool, dtype: str, max_hop: int | None = None):
    from cosyjax.config import ModelConfig
    from cosyjax.pipeline import Engine, PipelineConfig

    if tiny:
        from cosyjax.model_cache import load_or_convert_params

        root = os.environ.get("COSYJAX_GOLDEN", os.path.join(os.path.dirname(ROOT), "shared", "golden"))
        mc = ModelConfig.from_dir(os.path.join(root, "cosyvoice3", "modeldir"))
        params, _ = load_or_convert_params(mc, use_cache=False)
    else:
        from bench.bench_hift import random_params as hift_params
        from cosyjax.flow.cv3.model import init_params as flow_init
        from cosyjax.llm.config import LLMConfig
        from cosyjax.llm.speech_lm import abstract_params

        mc = ModelConfig.from_dir(os.path.join(ROOT, "tests", "fullsize", "cosyvoice3"))
        cfg = PipelineConfig.from_model_config(mc, dtype=dtype)
        # the LLM is not run: zero-size placeholders with the right tree keep prepare_params happy
        llm = jax.tree_util.tree_map(lambda s: np.zeros((1,) * len(s.shape), np.float32),
                                     abstract_params(LLMConfig.from_model_config(mc)))
        params = {"llm": llm, "flow": flow_init(cfg.flow, jax.random.PRNGKey(0)), "hift": hift_params(cfg.hift)}
    cfg = PipelineConfig.from_model_config(mc, dtype=dtype)
    if max_hop is not None:
        cfg = dataclasses.replace(cfg, stream=dataclasses.replace(cfg.stream, token_max_hop_len=max_hop))
    return Engine(params, cfg), mc


def _prompt_input(mc, P: int, rng):
    return {"text": np.array([[1]], np.int32), "flow_prompt_speech_token": rng.integers(0, 6561, (1, P)),
            "prompt_speech_feat": rng.normal(-5, 2, (1, 2 * P, 80)).astype(np.float32),
            "flow_embedding": rng.standard_normal((1, 192)).astype(np.float32)}


def run_once(engine, mi, tokens, incremental: bool):
    """-> list of (seconds, samples, work) per chunk."""
    rows = []
    t0 = time.perf_counter()
    for out in engine.generate(mi, stream=True, tokens=[tokens], incremental=incremental):
        t1 = time.perf_counter()
        rows.append((t1 - t0, out["tts_speech"].shape[1], out["work"]))
        t0 = time.perf_counter()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, nargs="+", default=[10.0, 20.0])
    ap.add_argument("--prompt", type=int, default=75, help="prompt speech tokens")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--tiny", action="store_true", help="the tiny golden CV3 model instead of full size")
    ap.add_argument("--modes", default="incremental,recompute")
    ap.add_argument("--max-hop", type=int, default=None,
                    help="token_max_hop_len (default: the model's, 100); 50 = equal chunks after the first")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    print(f"device: {dev.platform} {dev.device_kind}; jax {jax.__version__}; host cores {os.cpu_count()}; "
          f"{'tiny' if args.tiny else 'full-size'} CV3, {args.dtype}")
    engine, mc = _models(args.tiny, args.dtype, args.max_hop)
    st = engine.config.stream
    print(f"hops: {st.token_hop_len} (+ prompt pad), x{st.stream_scale_factor} up to {st.token_max_hop_len} tokens")
    rng = np.random.default_rng(0)
    mi = _prompt_input(mc, args.prompt, rng)
    modes = [m for m in args.modes.split(",") if m]
    summary = []
    for seconds in args.seconds:
        n = int(round(seconds * 25))
        tokens = rng.integers(0, 6561, n).astype(np.int32)
        res = {}
        for mode in modes:
            inc = mode == "incremental"
            run_once(engine, mi, tokens, inc)  # warm-up: compiles every chunk shape of this length
            res[mode] = run_once(engine, mi, tokens, inc)
        print(f"\n{seconds:g} s of audio ({n} tokens): per chunk")
        print(f"{'chunk':>5} " + " ".join(f"{m + ' s':>14} {'flow/voc frames':>17}" for m in modes) + f" {'samples':>8}")
        for i in range(len(res[modes[0]])):
            cells = []
            for m in modes:
                t, _, w = res[m][i]
                cells.append(f"{t:>14.3f} {str(w['flow_frames']) + '/' + str(w['vocoder_frames']):>17}")
            print(f"{i:>5} " + " ".join(cells) + f" {res[modes[0]][i][1]:>8}")
        for m in modes:
            times = [t for t, _, _ in res[m]]
            samples = [max(k, 1) for _, k, _ in res[m]]
            ratio = times[-2] / times[1] if len(times) >= 3 else float("nan")
            # per emitted second: the schedule's hops double (50 -> 100 tokens) after the second chunk
            per_s = (times[-2] / samples[-2]) / (times[1] / samples[1]) if len(times) >= 3 else float("nan")
            # like for like: the last non-final chunk against the first one of the same (full) hop
            same = [i for i in range(1, len(times) - 1) if samples[i] == samples[-2]]
            like = times[-2] / times[same[0]] if same and same[0] < len(times) - 2 else float("nan")
            summary.append((seconds, m, times[0], ratio, per_s, like, sum(times)))
    print(f"\n{'audio s':>7} {'mode':>12} {'TTFA s':>8} {'last/2nd':>9} {'per-audio-s':>12} {'last/1st-full':>14} "
          f"{'total s':>9} {'speed-up':>9}")
    totals = {(s, m): tot for s, m, *_, tot in summary}
    for s, m, ttfa, ratio, per_s, like, tot in summary:
        sp = totals.get((s, "recompute"), float("nan")) / tot
        print(f"{s:>7g} {m:>12} {ttfa:>8.3f} {ratio:>9.2f} {per_s:>12.2f} {like:>14.2f} {tot:>9.2f} {sp:>8.2f}x")
    print("last/2nd: time of the last non-final chunk / the second chunk; per-audio-s: the same ratio per second "
          "of audio each chunk emits; last/1st-full: / the first chunk as long as the last (the same hop)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
