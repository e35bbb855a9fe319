"""`cosyjax` command line: `cosyjax synth | convert | info` (also `python -m cosyjax`).

Examples:
  cosyjax synth --model-dir pretrained_models/Fun-CosyVoice3-0.5B --text "Hello." \\
      --prompt-wav prompt.wav --prompt-text "You are a helpful assistant.<|endofprompt|>Transcript." --out out.wav
  echo "Hello." | cosyjax synth --model-dir DIR --prompt-wav DIR/demo_prompt.npz --out out.wav --stream
  cosyjax synth --model-dir DIR --batch-file jobs.jsonl        # one JSON object per line (see --help)
  cosyjax convert --model-dir DIR                              # convert + cache the orbax checkpoint
  cosyjax info --model-dir DIR
  cosyjax demo --out demo.wav                                  # tiny bundled model folder, end to end

Bad input prints one line `error: ...` on stderr and exits with status 2.
"""
from __future__ import annotations
from cosyjax.errors import CosyJaxError

import argparse
import json
import os
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser", "CLIError"]

MODES = ("auto", "zero_shot", "cross_lingual", "instruct2", "sft", "vc")
EXIT_BAD_INPUT = 2


class CLIError(CosyJaxError):
    """Bad command-line input (reported as one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2 (argparse prints usage + message otherwise)
        raise CLIError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cosyjax", description="CosyVoice2/3 text-to-speech in JAX.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Examples:")[1])
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    s = sub.add_parser("synth", help="synthesise speech to a WAV file")
    s.add_argument("--model-dir", required=True, help="CosyVoice2/3 model folder")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--text", help="text to speak")
    src.add_argument("--text-file", help="file with the text to speak (UTF-8)")
    s.add_argument("--mode", default="auto", choices=MODES,
                   help="inference mode (auto: vc with --source-wav, instruct2 with --instruct, zero_shot with "
                        "--prompt-text, sft with --spk-id, else cross_lingual)")
    s.add_argument("--prompt-wav", help="prompt speech (wav/flac/...) or a prompt .npz with speech_token / "
                                        "speech_feat / embedding (for folders without the ONNX models)")
    s.add_argument("--prompt-text", help="transcript of the prompt (zero_shot)")
    s.add_argument("--instruct", help="instruction text (instruct2)")
    s.add_argument("--spk-id", help="speaker id from spk2info.pt (sft, or zero_shot_spk_id)")
    s.add_argument("--source-wav", help="source speech for voice conversion (vc)")
    s.add_argument("--prompt-speech-tokens", help="prompt speech tokens (.npy or whitespace-separated ints) "
                                                  "instead of the speech-tokenizer ONNX model")
    s.add_argument("--prompt-embedding", help="192-d speaker embedding (.npy) instead of campplus.onnx")
    s.add_argument("--prompt-feat", help="prompt mel [T, 80] (.npy) instead of computing it from --prompt-wav")
    s.add_argument("--out", help="output WAV path (default out.wav; with --batch-file: per line)")
    s.add_argument("--stream", action="store_true", help="streaming synthesis (chunks as upstream stream=True)")
    s.add_argument("--speed", type=float, default=1.0, help="speaking-rate factor (non-streaming only)")
    s.add_argument("--seed", type=int, default=0, help="random seed (LLM sampling, vocoder noise)")
    s.add_argument("--sampling", default="ras", choices=("ras", "greedy"), help="LLM sampling")
    s.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="LLM / flow compute dtype")
    s.add_argument("--attention", default="auto", metavar="IMPL",
                   help="attention implementation: auto | xla | cudnn | pallas, optionally @gpu (see cosyjax.nn.attention)")
    s.add_argument("--no-text-frontend", action="store_true", help="skip text normalisation")
    s.add_argument("--batch-file", help="JSON-lines file: one request per line with keys text, out and optionally "
                                         "mode, prompt_wav, prompt_text, instruct, spk_id, seed; runs batched")
    s.add_argument("--cache-dir", help="where converted checkpoints are cached (default ~/.cache/cosyjax)")
    s.add_argument("--devices", type=int, help="shard --batch-file batches over N devices (a 'data' mesh)")
    s.add_argument("--params", help="a `cosyjax finetune --out` folder: use its fine-tuned parameters")
    s.add_argument("--no-incremental", action="store_true",
                   help="streaming: recompute the prefix every chunk (upstream's algorithm) instead of cached state")
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    c = sub.add_parser("convert", help="convert llm.pt/flow.pt/hift.pt and cache the orbax checkpoint")
    c.add_argument("--model-dir", required=True)
    c.add_argument("--cache-dir", help="cache root (default ~/.cache/cosyjax)")
    c.add_argument("--out", help="write the converted checkpoint to this folder instead of the cache")
    c.add_argument("--force", action="store_true", help="convert even when a cached checkpoint exists")

    i = sub.add_parser("info", help="describe a model folder")
    i.add_argument("--model-dir", required=True)
    i.add_argument("--json", action="store_true", help="machine-readable output")

    d = sub.add_parser("demo", help="build the tiny demo model folder and synthesise a WAV end to end")
    d.add_argument("--version", default="cosyvoice3", choices=("cosyvoice2", "cosyvoice3"))
    d.add_argument("--text", default="Hello from cosyjax. This runs the whole pipeline on a tiny model.")
    d.add_argument("--out", default="demo.wav", help="output WAV path")
    d.add_argument("--stream", action="store_true", help="streaming synthesis")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bar")

    from cosyjax.serve.cli import add_parser as add_serve_parser  # light: FastAPI loads only when serve runs
    add_serve_parser(sub)
    from cosyjax.train.cli import add_parser as add_finetune_parser  # light: jax/optax load only when it runs
    add_finetune_parser(sub)
    return p


# ------------------------------------------------------------------------------------------- helpers
def _read_text(args) -> str:
    if args.text is not None:
        text = args.text
    elif args.text_file is not None:
        try:
            with open(args.text_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise CLIError(f"cannot read --text-file {args.text_file}: {e.strerror or e}") from e
    elif not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        text = ""
    return text.strip()


def _resolve_mode(mode: str, *, source_wav=None, instruct=None, prompt_text=None, spk_id=None) -> str:
    if mode != "auto":
        return mode
    if source_wav:
        return "vc"
    if instruct:
        return "instruct2"
    if prompt_text:
        return "zero_shot"
    if spk_id:
        return "sft"
    return "cross_lingual"


def _check_file(path: Optional[str], flag: str) -> None:
    if path is not None and not os.path.isfile(path):
        raise CLIError(f"{flag}: file not found: {path}")


def _load_ints(path: str):
    import numpy as np

    _check_file(path, "--prompt-speech-tokens")
    try:
        if path.endswith(".npy"):
            a = np.load(path)
        else:
            with open(path, encoding="utf-8") as f:
                a = np.array([int(t) for t in f.read().replace(",", " ").split()])
    except (ValueError, OSError) as e:
        raise CLIError(f"--prompt-speech-tokens {path}: not a list of integers ({e})") from e
    return np.asarray(a).reshape(-1).astype("int32")


def _load_array(path: str, flag: str):
    import numpy as np

    _check_file(path, flag)
    try:
        return np.load(path)
    except (ValueError, OSError) as e:
        raise CLIError(f"{flag} {path}: cannot read a .npy array ({e})") from e


def _prompt_arg(args_or_req, base_dir: str = ""):
    """The `prompt_wav` value for the API: a path, or a PrecomputedPrompt built from the override files."""
    from cosyjax.prompt import PrecomputedPrompt

    get = (lambda k: args_or_req.get(k)) if isinstance(args_or_req, dict) else (lambda k: getattr(args_or_req, k, None))
    wav = get("prompt_wav")
    if wav and base_dir and not os.path.isabs(wav):
        wav = os.path.join(base_dir, wav)
    if wav is not None:
        _check_file(wav, "--prompt-wav")
    tok, emb, feat = get("prompt_speech_tokens"), get("prompt_embedding"), get("prompt_feat")
    if tok is None and emb is None and feat is None:
        return wav
    return PrecomputedPrompt.from_parts(
        wav=wav,
        speech_token=_load_ints(tok) if tok else None,
        embedding=_load_array(emb, "--prompt-embedding") if emb else None,
        speech_feat=_load_array(feat, "--prompt-feat") if feat else None,
    )


def _write_wav(path: str, audio, sample_rate: int) -> None:
    import numpy as np
    import soundfile as sf

    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise CLIError(f"--out: folder does not exist: {d}")
    try:
        sf.write(path, np.asarray(audio, np.float32).reshape(-1), sample_rate)  # WAV: 16-bit PCM
    except (TypeError, ValueError, RuntimeError) as e:  # unknown extension, unwritable file
        raise CLIError(f"--out {path}: cannot write audio ({e})") from e


def _request_kwargs(mode: str, text: str, prompt, *, prompt_text=None, instruct=None, spk_id=None,
                    source_wav=None) -> dict:
    """API method keyword arguments for one request (upstream argument names)."""
    if mode == "zero_shot":
        if not prompt_text:
            raise CLIError("mode zero_shot needs --prompt-text (the transcript of the prompt speech)")
        if prompt is None and not spk_id:
            raise CLIError("mode zero_shot needs --prompt-wav (or --spk-id of a saved zero-shot speaker)")
        return dict(tts_text=text, prompt_text=prompt_text, prompt_wav=prompt, zero_shot_spk_id=spk_id or "")
    if mode == "cross_lingual":
        if prompt is None and not spk_id:
            raise CLIError("mode cross_lingual needs --prompt-wav")
        return dict(tts_text=text, prompt_wav=prompt, zero_shot_spk_id=spk_id or "")
    if mode == "instruct2":
        if not instruct:
            raise CLIError("mode instruct2 needs --instruct")
        if prompt is None and not spk_id:
            raise CLIError("mode instruct2 needs --prompt-wav")
        return dict(tts_text=text, instruct_text=instruct, prompt_wav=prompt, zero_shot_spk_id=spk_id or "")
    if mode == "sft":
        if not spk_id:
            raise CLIError("mode sft needs --spk-id")
        return dict(tts_text=text, spk_id=spk_id)
    if mode == "vc":
        if not source_wav:
            raise CLIError("mode vc needs --source-wav")
        if prompt is None:
            raise CLIError("mode vc needs --prompt-wav")
        return dict(source_wav=source_wav, prompt_wav=prompt)
    raise CLIError(f"unknown mode {mode!r}")


def _load_model(args):
    from cosyjax.api import CosyVoice

    return CosyVoice.from_pretrained(args.model_dir, dtype=args.dtype, attention=args.attention,
                                     cache_dir=args.cache_dir, sampling=args.sampling,
                                     progress=not args.quiet, devices=getattr(args, "devices", None),
                                     params=getattr(args, "params", None))


def _synth(args) -> int:
    import numpy as np

    if args.speed <= 0:
        raise CLIError(f"--speed must be > 0, got {args.speed}")
    if args.stream and args.speed != 1.0:
        raise CLIError("--speed only works without --stream (upstream restriction)")
    if not os.path.isdir(args.model_dir):
        raise CLIError(f"--model-dir: folder not found: {args.model_dir}")
    if args.batch_file:
        return _synth_batch(args)
    mode = _resolve_mode(args.mode, source_wav=args.source_wav, instruct=args.instruct,
                         prompt_text=args.prompt_text, spk_id=args.spk_id)
    text = "" if mode == "vc" else _read_text(args)
    if mode != "vc" and not text:
        raise CLIError("no text given (use --text, --text-file or standard input)")
    _check_file(args.source_wav, "--source-wav")
    prompt = _prompt_arg(args)
    kwargs = _request_kwargs(mode, text, prompt, prompt_text=args.prompt_text, instruct=args.instruct,
                             spk_id=args.spk_id, source_wav=args.source_wav)
    out = args.out or "out.wav"
    model = _load_model(args)
    method = getattr(model, f"inference_{mode}")
    kw = dict(stream=args.stream, speed=args.speed, seed=args.seed, incremental=not args.no_incremental)
    if mode != "vc":
        kw["text_frontend"] = not args.no_text_frontend
    chunks = []
    from tqdm import tqdm

    with tqdm(desc="synth", unit="chunk", disable=args.quiet, file=sys.stderr) as bar:
        for piece in method(**kwargs, **kw):
            chunks.append(np.asarray(piece["tts_speech"]).reshape(-1))
            bar.set_postfix(seconds=f"{sum(len(c) for c in chunks) / model.sample_rate:.2f}")
            bar.update(1)
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    _write_wav(out, audio, model.sample_rate)
    if not args.quiet:
        print(f"wrote {out}: {len(audio) / model.sample_rate:.2f} s at {model.sample_rate} Hz", file=sys.stderr)
    return 0


def _synth_batch(args) -> int:
    _check_file(args.batch_file, "--batch-file")
    base = os.path.dirname(os.path.abspath(args.batch_file))
    reqs = []
    with open(args.batch_file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise CLIError(f"--batch-file line {n}: invalid JSON ({e.msg})") from e
            if not isinstance(r, dict) or not r.get("text") or not r.get("out"):
                raise CLIError(f"--batch-file line {n}: needs an object with 'text' and 'out'")
            mode = _resolve_mode(r.get("mode", args.mode), source_wav=r.get("source_wav"),
                                 instruct=r.get("instruct", args.instruct),
                                 prompt_text=r.get("prompt_text", args.prompt_text),
                                 spk_id=r.get("spk_id", args.spk_id))
            if mode in ("vc", "sft"):
                raise CLIError(f"--batch-file line {n}: mode {mode} is not supported in batch files")
            merged = {"prompt_wav": args.prompt_wav, "prompt_speech_tokens": args.prompt_speech_tokens,
                      "prompt_embedding": args.prompt_embedding, "prompt_feat": args.prompt_feat, **r}
            prompt = _prompt_arg(merged, base_dir=base if "prompt_wav" in r else "")
            kwargs = _request_kwargs(mode, r["text"], prompt, prompt_text=r.get("prompt_text", args.prompt_text),
                                     instruct=r.get("instruct", args.instruct), spk_id=r.get("spk_id", args.spk_id))
            out = r["out"] if os.path.isabs(r["out"]) else os.path.join(base, r["out"])
            reqs.append((mode, kwargs, out, int(r.get("seed", args.seed))))
    if not reqs:
        raise CLIError(f"--batch-file {args.batch_file}: no requests")
    model = _load_model(args)
    audios = model.synthesize_batch([(m, kw) for m, kw, _, _ in reqs], seeds=[s for *_, s in reqs],
                                    speed=args.speed, text_frontend=not args.no_text_frontend,
                                    progress=not args.quiet)
    for (_, _, out, _), audio in zip(reqs, audios):
        _write_wav(out, audio, model.sample_rate)
    if not args.quiet:
        print(f"wrote {len(reqs)} files", file=sys.stderr)
    return 0


def _convert(args) -> int:
    from cosyjax.api import convert_model_dir

    if not os.path.isdir(args.model_dir):
        raise CLIError(f"--model-dir: folder not found: {args.model_dir}")
    path = convert_model_dir(args.model_dir, cache_dir=args.cache_dir, out=args.out, force=args.force)
    print(path)
    return 0


def _info(args) -> int:
    from cosyjax.api import describe_model_dir

    if not os.path.isdir(args.model_dir):
        raise CLIError(f"--model-dir: folder not found: {args.model_dir}")
    info = describe_model_dir(args.model_dir)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for k, v in info.items():
            print(f"{k:<22} {v}")
    return 0


def _demo(args) -> int:
    """Tiny random-weight demo folder (copied from the golden fixtures) -> text -> WAV, every stage."""
    from cosyjax.demo import DEMO_PROMPT, DEMO_PROMPT_TEXT, build_demo_model_dir

    model_dir = build_demo_model_dir(args.version)
    prompt_text = DEMO_PROMPT_TEXT
    if args.version == "cosyvoice3":
        prompt_text = "You are a helpful assistant.<|endofprompt|>" + prompt_text
    argv = ["synth", "--model-dir", model_dir, "--text", args.text, "--mode", "zero_shot",
            "--prompt-wav", os.path.join(model_dir, DEMO_PROMPT), "--prompt-text", prompt_text,
            "--out", args.out, "--seed", str(args.seed)]
    argv += ["--stream"] if args.stream else []
    argv += ["--quiet"] if args.quiet else []
    print(f"demo model folder: {model_dir} (tiny random weights: the audio is noise-like)", file=sys.stderr)
    return _synth(build_parser().parse_args(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise CLIError("missing command (synth, convert, info or demo); see cosyjax --help")
        return {"synth": _synth, "convert": _convert, "info": _info, "demo": _demo,
                "serve": lambda a: a.serve_run(a), "finetune": lambda a: a.finetune_run(a)}[args.command](args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except CosyJaxError as e:
        # every bad-input error of the package derives from CosyJaxError; anything else is a bug: traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
