"""The jitted optax train step for the LLM or the flow (full fine-tuning, frozen parts, or LoRA).

`Task` (frozen, static under jit) = component + model config + loss config + `TrainConfig`.
`TrainState` = (step, trainable, opt_state): `trainable` is the whole parameter tree, or only the
LoRA adapters (then the frozen base tree is a separate, non-donated argument). The optimizer is
clip_by_global_norm -> Adam/AdamW with a linear warm-up, wrapped in `optax.multi_transform` when
parts are frozen and in `optax.MultiSteps` for gradient accumulation. The step's random key is
`fold_in(PRNGKey(seed), step)`, so a resumed run draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cosyjax.errors import CosyJaxError
from cosyjax.train import lora as lora_lib
from cosyjax.train.flow_loss import FlowLossConfig, flow_loss, sample_flow_draws
from cosyjax.train.llm_loss import LLMLossConfig, lm_loss

__all__ = ["TrainConfig", "TrainConfigError", "Task", "TrainState", "make_task", "make_optimizer", "init_state",
           "train_step", "task_loss", "inference_params"]


class TrainConfigError(CosyJaxError):
    """Inconsistent training options."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer and adaptation options (hashable; static under jit)."""

    learning_rate: float = 1e-4
    warmup_steps: int = 0
    optimizer: str = "adamw"  # 'adam' | 'adamw'
    weight_decay: float = 0.0
    grad_clip: float = 5.0  # upstream train_conf.grad_clip
    accum_steps: int = 1  # upstream train_conf.accum_grad
    freeze: tuple[str, ...] = ()  # regexes over '/'-joined parameter paths (full fine-tuning only)
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()  # regexes; () = `lora.default_targets`
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in ("adam", "adamw"):
            raise TrainConfigError(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.accum_steps < 1 or self.warmup_steps < 0 or self.lora_rank < 0:
            raise TrainConfigError("accum_steps must be >= 1, warmup_steps and lora_rank >= 0")
        if self.lora_rank and self.freeze:
            raise TrainConfigError("freeze patterns apply to full fine-tuning; LoRA already freezes the base")


@dataclasses.dataclass(frozen=True)
class Task:
    component: str  # 'llm' | 'flow'
    version: str
    model_cfg: Any  # LLMConfig | FlowCV2Config | FlowCV3Config
    loss_cfg: Any  # LLMLossConfig | FlowLossConfig
    train: TrainConfig

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return self.train.lora_targets or lora_lib.default_targets(self.component, self.version)


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer calls so far (micro-batches with accumulation)
    trainable: Any
    opt_state: Any


def make_task(component: str, model_config, train: TrainConfig = TrainConfig()) -> Task:
    """Task for `component` of a `cosyjax.config.ModelConfig` (configs read from its yaml)."""
    from convert.registry import component_module

    if component not in ("llm", "flow"):
        raise TrainConfigError(f"component must be 'llm' or 'flow', got {component!r}")
    cfg = component_module(component).config_from(model_config)
    loss = (LLMLossConfig.from_model_config(model_config) if component == "llm"
            else FlowLossConfig.from_model_config(model_config))
    return Task(component, model_config.version, cfg, loss, train)


def _labels(tree, patterns):
    rx = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: "frozen" if any(r.search(lora_lib._path(kp)) for r in rx) else "trainable", tree)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    lr = tc.learning_rate
    schedule = (optax.join_schedules([optax.linear_schedule(0.0, lr, tc.warmup_steps), optax.constant_schedule(lr)],
                                     [tc.warmup_steps]) if tc.warmup_steps else lr)
    opt = optax.adam(schedule) if tc.optimizer == "adam" else optax.adamw(schedule, weight_decay=tc.weight_decay)
    opt = optax.chain(optax.clip_by_global_norm(tc.grad_clip), opt)
    if tc.freeze:
        opt = optax.multi_transform({"trainable": opt, "frozen": optax.set_to_zero()},
                                    functools.partial(_labels, patterns=tc.freeze))
    if tc.accum_steps > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=tc.accum_steps)
    return opt


def init_state(task: Task, params) -> tuple[TrainState, Any]:
    """-> (state, base): base is the frozen tree under LoRA, else None (the state holds the params)."""
    tc = task.train
    params = jax.tree_util.tree_map(jnp.array, params)  # a copy: the step donates the state's buffers
    if tc.freeze:
        lab = jax.tree_util.tree_leaves(_labels(params, tc.freeze))
        if "frozen" not in lab:
            raise TrainConfigError(f"freeze patterns {list(tc.freeze)} match no parameter")
    if tc.lora_rank:
        key = jax.random.fold_in(jax.random.PRNGKey(tc.seed), 0x10A)
        trainable, base = lora_lib.init_lora(params, task.lora_targets, tc.lora_rank, key), params
    else:
        trainable, base = params, None
    return TrainState(jnp.zeros((), jnp.int32), trainable, make_optimizer(tc).init(trainable)), base


def inference_params(task: Task, trainable, base):
    """The plain parameter tree the losses (and synthesis) use."""
    if task.train.lora_rank:
        return lora_lib.merge(base, trainable, task.train.lora_alpha, task.train.lora_rank)
    return trainable


def task_loss(task: Task, trainable, base, batch: dict, key, streaming: bool = False):
    """-> (loss, metrics). LLM batch: ids, kind, target [B, L], length [B]; flow batch: speech_token [B, N],
    speech_token_len, speech_feat [B, 2N, 80], speech_feat_len, embedding [B, 192]."""
    params = inference_params(task, trainable, base)
    if task.component == "llm":
        loss, aux = lm_loss(params, task.model_cfg, task.loss_cfg, batch["ids"], batch["kind"], batch["target"],
                            batch["length"])
        return loss, {"acc": aux["acc"]}
    feat = batch["speech_feat"]
    draws = sample_flow_draws(key, batch["speech_feat_len"], feat.shape[1], task.loss_cfg, feat.shape[2])
    loss, _ = flow_loss(params, task.model_cfg, task.loss_cfg, batch["speech_token"], batch["speech_token_len"],
                        feat, batch["speech_feat_len"], batch["embedding"], draws, streaming)
    return loss, {}


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree_util.tree_leaves(tree)))


@functools.partial(jax.jit, static_argnames=("task", "streaming"), donate_argnums=(0,))
def train_step(state: TrainState, base, batch: dict, *, task: Task, streaming: bool = False):
    """One optimizer call on one (micro-)batch -> (new state, metrics {loss, grad_norm, lr-free extras})."""
    key = jax.random.fold_in(jax.random.PRNGKey(task.train.seed), state.step)
    (loss, metrics), grads = jax.value_and_grad(
        lambda t: task_loss(task, t, base, batch, key, streaming), has_aux=True)(state.trainable)
    updates, opt_state = make_optimizer(task.train).update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    return TrainState(state.step + 1, trainable, opt_state), dict(metrics, loss=loss, grad_norm=_global_norm(grads))
