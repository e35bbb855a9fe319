"""`cosyjax finetune --model-dir DIR --data LIST --component llm|flow [--lora-rank R] --steps N --out OUT`.

Writes OUT/finetune.json + OUT/params (see `cosyjax.train.checkpoint`) and, every --save-every steps,
the whole train state to OUT/checkpoints (`--resume` continues from the latest one).
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", required=True, help="CosyVoice2/3 model folder")
    p.add_argument("--data", required=True, help="parquet data list (.list of parquet paths, or .parquet) "
                   "or a JSONL manifest (.jsonl: wav, text [, speech_token, embedding, instruct])")
    p.add_argument("--component", required=True, choices=("llm", "flow"))
    p.add_argument("--steps", type=int, required=True, help="optimizer steps in total (micro-batches)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--optimizer", choices=("adam", "adamw"), default="adamw")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=5.0)
    p.add_argument("--accum-steps", type=int, default=1)
    p.add_argument("--freeze", action="append", default=[], help="regex of parameter paths to freeze (repeatable)")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-target", action="append", default=[], help="regex of adapted kernels (repeatable)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint the train state every K steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    import os

    from convert.registry import convert_component
    from cosyjax.config import ModelConfig
    from cosyjax.train.checkpoint import save_output
    from cosyjax.train.data import Batcher, read_dataset
    from cosyjax.train.loop import fit
    from cosyjax.train.step import TrainConfig, make_task

    mc = ModelConfig.from_dir(args.model_dir)
    tc = TrainConfig(learning_rate=args.lr, warmup_steps=args.warmup_steps, optimizer=args.optimizer,
                     weight_decay=args.weight_decay, grad_clip=args.grad_clip, accum_steps=args.accum_steps,
                     freeze=tuple(args.freeze), lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                     lora_targets=tuple(args.lora_target), seed=args.seed)
    task = make_task(args.component, mc, tc)
    frontend = None
    if args.data.endswith(".jsonl") or args.component == "llm":
        from cosyjax.frontend.model_inputs import Frontend

        frontend = Frontend.from_model_dir(mc.model_dir, text_frontend="none")
    utts = read_dataset(args.data, args.component, mc, frontend)
    params = convert_component(args.component, mc)
    os.makedirs(args.out, exist_ok=True)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, desc=f"finetune {args.component}", file=sys.stderr)

    def on_step(step, m):
        if bar is not None:
            bar.n = step
            bar.set_postfix(loss=f"{m['loss']:.4f}", steps_s=f"{m['steps_per_s']:.2f}")

    state, base, losses = fit(task, params, Batcher(utts, task, args.batch_size, args.seed), args.steps,
                              out_dir=args.out, save_every=args.save_every, resume=args.resume, on_step=on_step)
    if bar is not None:
        bar.close()
    save_output(args.out, task, state.trainable, model_dir=mc.model_dir, steps=int(state.step))
    last = f"; last loss {losses[-1]:.4f}" if losses else ""
    print(f"fine-tuned {args.component} for {int(state.step)} steps on {len(utts)} utterances{last} -> {args.out}")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `finetune` on the main CLI's subparsers (dispatch: `args.finetune_run(args)`)."""
    p = sub.add_parser("finetune", help="fine-tune the LLM or the flow (optax; full or LoRA)")
    add_arguments(p)
    p.set_defaults(finetune_run=run)
    return p
