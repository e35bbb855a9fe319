"""`cosyjax serve`: run the OpenAI-compatible speech server (uvicorn), or deploy it on Ray Serve (`--ray`).

    cosyjax serve --model-dir pretrained_models/Fun-CosyVoice3-0.5B --voice alice=alice.npz
    cosyjax serve --demo                      # the tiny demo folder, voice 'demo'
    cosyjax serve --model-dir DIR --ray --replicas 2

A model folder holding `demo_prompt.npz` (the demo folder) gets the built-in voice `demo`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from cosyjax.errors import CosyJaxError

__all__ = ["add_parser", "run", "config_from_args", "ServeCLIError"]


class ServeCLIError(CosyJaxError):
    """Bad `cosyjax serve` arguments."""


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the `serve` subcommand to an argparse sub-parser collection; `run(args)` executes it."""
    s = sub.add_parser("serve", help="OpenAI-compatible speech server (POST /v1/audio/speech)")
    s.add_argument("--model-dir", help="model folder (or --demo)")
    s.add_argument("--demo", action="store_true", help="serve the tiny demo folder (cosyjax.demo)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--voice", action="append", default=[], metavar="NAME=FILE",
                   help="built-in voice from a prompt .npz (repeatable)")
    s.add_argument("--voices-dir", help="folder for uploaded voices (default: <cache>/voices/<model name>)")
    s.add_argument("--model-name", help="model id reported by /v1/models (default: the folder's name)")
    s.add_argument("--api-key", default=os.environ.get("COSYJAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $COSYJAX_API_KEY)")
    s.add_argument("--max-batch", type=int, default=8, help="most segments in one batched call")
    s.add_argument("--batch-window-ms", type=float, default=20.0, help="how long a request waits for company")
    s.add_argument("--max-input-chars", type=int, default=4096)
    s.add_argument("--max-upload-mb", type=float, default=10.0, help="upload size limit")
    s.add_argument("--stream-slots", type=int, default=8,
                   help="LLM slots shared by concurrent streams (one batched decode program; 0: off)")
    s.add_argument("--stream-capacity", type=int, default=1024, help="KV entries per stream slot")
    s.add_argument("--stream-batching", default="auto", choices=("auto", "on", "off"),
                   help="run concurrent streams' flow/vocoder calls as one batched call (auto: on unless on CPU)")
    s.add_argument("--malloc-trim-s", type=float, default=10.0,
                   help="return freed heap memory to the OS every this many seconds (glibc malloc_trim; 0: never)")
    s.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="keep compiled programs in DIR across restarts (XLA's persistent compilation cache; "
                        "default <cache>/xla; 'none': off)")
    s.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    s.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn", "pallas"))
    s.add_argument("--sampling", default="ras", choices=("ras", "greedy"))
    s.add_argument("--cache-dir", help="converted-checkpoint cache (default ~/.cache/cosyjax)")
    s.add_argument("--no-text-frontend", action="store_true", help="skip text normalisation")
    s.add_argument("--warmup", action="store_true", help="compile the batch buckets and the stream path first")
    s.add_argument("--log-level", default="info")
    s.add_argument("--ray", action="store_true", help="deploy on Ray Serve (extra [ray]) instead of uvicorn")
    s.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (one per device)")
    s.add_argument("--ray-address", default=None, help="Ray cluster address (default: start or join a local one)")
    s.add_argument("--gpus-per-replica", type=float, default=None,
                   help="devices per replica (default: 1 when the cluster has GPUs, else 0)")
    s.set_defaults(serve_run=run)
    return s


def _model_dir(args) -> str:
    if args.demo:
        from cosyjax.demo import build_demo_model_dir

        return build_demo_model_dir("cosyvoice3")
    if not args.model_dir:
        raise ServeCLIError("serve needs --model-dir DIR (or --demo)")
    if not os.path.isdir(args.model_dir):
        raise ServeCLIError(f"--model-dir: folder not found: {args.model_dir}")
    return os.path.abspath(args.model_dir)


def config_from_args(args, model_dir: str):
    """ServeConfig from parsed `serve` arguments (voices checked here, before the model loads)."""
    from cosyjax.model_cache import cache_root
    from cosyjax.serve.app import ServeConfig
    from cosyjax.serve.voices import check_voice_name

    voices = []
    for item in args.voice:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ServeCLIError(f"--voice {item!r}: expected NAME=FILE")
        check_voice_name(name, param="--voice")
        if not os.path.isfile(path):
            raise ServeCLIError(f"--voice {name}: file not found: {path}")
        voices.append((name, os.path.abspath(path)))
    demo = os.path.join(model_dir, "demo_prompt.npz")
    if os.path.isfile(demo) and "demo" not in {n for n, _ in voices}:
        voices.append(("demo", demo))
    name = args.model_name or os.path.basename(os.path.normpath(model_dir))
    if args.malloc_trim_s < 0:
        raise ServeCLIError(f"--malloc-trim-s must be >= 0, got {args.malloc_trim_s}")
    if args.max_batch < 1:
        raise ServeCLIError(f"--max-batch must be >= 1, got {args.max_batch}")
    return ServeConfig(model_name=name, voices_dir=args.voices_dir or os.path.join(cache_root(), "voices", name),
                       voices=tuple(voices), api_key=args.api_key or None, max_batch=args.max_batch,
                       batch_window_ms=args.batch_window_ms, max_input_chars=args.max_input_chars,
                       max_upload_bytes=int(args.max_upload_mb * 2 ** 20), text_frontend=not args.no_text_frontend,
                       stream_slots=args.stream_slots, stream_capacity=args.stream_capacity,
                       batch_streams={"auto": None, "on": True, "off": False}[args.stream_batching],
                       malloc_trim_s=args.malloc_trim_s, compile_cache=_compile_cache_dir(args.compile_cache))


def _compile_cache_dir(choice: Optional[str]) -> Optional[str]:
    from cosyjax.model_cache import cache_root

    if choice is not None and choice.lower() in ("none", "off", ""):
        return None
    return os.path.abspath(choice or os.path.join(cache_root(), "xla"))


def enable_compile_cache(path: Optional[str]) -> None:
    """Point this process's XLA compilation cache at `path` (None: leave it off): a restarted server, or
    another replica on the same disk, loads the programs an earlier one compiled instead of compiling
    them again (warm-up and first-use compilations). Process-wide, so only the process owner (the serve
    CLI, a Ray replica) calls it."""
    if path is None:
        return
    import jax

    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ServeCLIError(f"--compile-cache {path}: cannot create the folder ({e.strerror})") from e
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)  # small programs are cheaper to compile


def load_tts(model_dir: str, args):
    from cosyjax.api import CosyVoice

    return CosyVoice.from_pretrained(model_dir, dtype=args.dtype, attention=args.attention, cache_dir=args.cache_dir,
                                     sampling=args.sampling, progress=True)


def warmup(app) -> None:
    """Compile what requests will run: per row bucket (1, 2, 4, ... max_batch) the LLM stage and the flow +
    vocoder stage of every answer length the first voice's "Hello." can reach, one stream through the slots
    and one alone (the two LLM paths), and the streaming flow + vocoder programs of every such length."""
    import numpy as np

    from cosyjax.pipeline import token2wav_lengths
    from cosyjax.serve.batcher import batch_bucket
    from cosyjax.serve.speech_request import parse_speech_request

    svc = app.state.service
    names = svc.voices.names()
    if not names:
        print("warmup skipped: no voice registered", file=sys.stderr)
        return
    req = parse_speech_request({"model": svc.model_name, "input": "Hello.", "voice": names[0], "stream": False,
                                "response_format": "wav"}, formats=svc.formats, models=svc.models)
    _, inputs, keys = svc.model_inputs(req, 0)
    sizes = sorted({batch_bucket(n, svc.config.max_batch) for n in range(1, svc.config.max_batch + 1)})
    engine = svc.tts.engine
    lengths = token2wav_lengths(engine.config, inputs[0])  # every answer length of this voice's buckets
    for b in sizes:
        print(f"warmup: batch of {b} ({len(lengths)} answer-length buckets)", file=sys.stderr)
        engine.synthesize_batch(inputs[:1] * b, keys[:1] * b)  # the LLM stage
        for n in lengths:
            engine.synthesize_batch(inputs[:1] * b, keys[:1] * b, tokens=[np.zeros(n, np.int32)] * b)
    print("warmup: stream", file=sys.stderr)
    open_stream = svc.slot_streams.open if svc.slot_streams is not None else \
        (lambda mi, key: svc.tts.engine.tts(mi, stream=True, key=key))
    for _ in open_stream(inputs[0], keys[0]):  # before the worker starts: this thread owns the slots
        pass
    if svc.slot_streams is not None:  # a stream that finds every slot taken runs the engine's own LLM loop
        for _ in engine.tts(inputs[0], stream=True, key=keys[0]):
            pass
    n = engine.warm_streams(inputs[0], keys[0])  # every answer length, as above
    print(f"warmup: streams of every answer length ({n} stage programs)", file=sys.stderr)
    if svc.gang is not None and svc.slot_streams is not None:  # the vmapped stage programs, per group bucket
        _warm_stream_groups(svc, inputs[0], keys[0])


def _warm_stream_groups(svc, mi, key) -> None:
    """Run 2, 4, ... identical streams through a scratch scheduler on the service's gang (lockstep: one
    group each call), so that concurrent streams find their batched programs compiled."""
    import threading

    from cosyjax.serve.batcher import Scheduler

    n_max = svc.slot_streams.free_count()
    b = 2
    while b <= n_max:
        print(f"warmup: {b} streams batched", file=sys.stderr)
        left, done = [b], threading.Event()

        def emit(kind, value):
            if kind != "chunk":
                left[0] -= 1
                if left[0] == 0:
                    done.set()

        sch = Scheduler(None, svc.slot_streams.open, gang=svc.gang).start()
        try:
            for _ in range(b):
                sch.stream([mi], [key], emit)
            done.wait()
        finally:
            sch.stop()
        b *= 2


def run(args) -> int:
    """Execute `cosyjax serve` (blocks until the server stops)."""
    if args.ray:
        from cosyjax.serve.ray_app import run_ray

        return run_ray(args)
    try:
        import uvicorn
    except ImportError as e:
        raise ServeCLIError("cosyjax serve needs the [serve] extra: pip install 'cosyjax[serve]'") from e
    from cosyjax.serve.app import create_app

    model_dir = _model_dir(args)
    config = config_from_args(args, model_dir)
    enable_compile_cache(config.compile_cache)
    app = create_app(load_tts(model_dir, args), config)
    if args.warmup:
        warmup(app)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print(f"warning: listening on {args.host} without --api-key", file=sys.stderr)
    print(f"serving {config.model_name} on http://{args.host}:{args.port} (voices: "
          f"{', '.join(app.state.service.voices.names()) or 'none'}; uploads in {config.voices_dir})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
