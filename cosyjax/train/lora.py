"""LoRA adapters on Dense kernels: W' = W + (alpha / r) * A @ B, A [..., in, r], B [..., r, out].

Adapters are a nested dict that mirrors the parameter tree down to each adapted `kernel` leaf
(`{'llm': {'layers_0': {'self_attn': {'q_proj': {'kernel': {'a': A, 'b': B}}}}}}`); stacked / scanned
kernels (`[depth, in, out]`) get stacked adapters. B starts at zero, so the merged tree equals the
base tree before training. `merge` gives the plain inference tree (same structure as the converter's).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from cosyjax.errors import CosyJaxError

__all__ = ["LoRAError", "DEFAULT_TARGETS", "default_targets", "target_paths", "init_lora", "merge", "lora_dense"]


class LoRAError(CosyJaxError):
    """LoRA targets that match nothing, or adapters that do not fit the parameter tree."""


DEFAULT_TARGETS = {
    # Qwen2 attention and MLP projections
    "llm": (r"^llm/layers_\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel$",),
    # DiT attention (stacked over blocks)
    ("flow", "cosyvoice3"): (r"^estimator/blocks/(to_q|to_k|to_v|to_out)/kernel$",),
    # conformer encoder and U-Net transformer attention
    ("flow", "cosyvoice2"): (r"/(linear_q|linear_k|linear_v|linear_out|to_q|to_k|to_v|to_out\w*)/kernel$",),
}


def default_targets(component: str, version: str) -> tuple[str, ...]:
    return DEFAULT_TARGETS["llm"] if component == "llm" else DEFAULT_TARGETS[(component, version)]


def _path(kp) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in kp)


def target_paths(params, patterns) -> list[str]:
    """'/'-joined paths of the kernels (ndim >= 2) matching any regex in `patterns`."""
    rx = [re.compile(p) for p in patterns]
    out = [_path(kp) for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
           if getattr(leaf, "ndim", 0) >= 2 and any(r.search(_path(kp)) for r in rx)]
    if not out:
        raise LoRAError(f"LoRA target patterns {list(patterns)} match no kernel of the parameter tree")
    return out


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _set(tree, path, value):
    keys = path.split("/")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def init_lora(params, patterns, rank: int, key) -> dict:
    """Adapters for every target kernel: A ~ N(0, 1/in) [..., in, r], B = 0 [..., r, out]."""
    if rank <= 0:
        raise LoRAError(f"LoRA rank must be positive, got {rank}")
    lora: dict = {}
    for i, p in enumerate(target_paths(params, patterns)):
        w = _get(params, p)
        *lead, n_in, n_out = w.shape
        a = jax.random.normal(jax.random.fold_in(key, i), (*lead, n_in, rank), jnp.float32) / jnp.sqrt(n_in)
        _set(lora, p, {"a": a, "b": jnp.zeros((*lead, rank, n_out), jnp.float32)})
    return lora


def _adapter_paths(lora, prefix=""):
    for k, v in lora.items():
        p = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict) and set(v) == {"a", "b"}:
            yield p, v
        elif isinstance(v, dict):
            yield from _adapter_paths(v, p)


def merge(params, lora, alpha: float, rank: int):
    """params + adapters -> plain tree with W + (alpha / rank) A @ B at each adapted kernel (traceable)."""
    scale = alpha / rank
    out = jax.tree_util.tree_map(lambda x: x, params)  # fresh containers, shared leaves
    for p, ab in _adapter_paths(lora):
        try:
            w = _get(params, p)
        except (KeyError, TypeError) as e:
            raise LoRAError(f"LoRA adapter {p} has no kernel in the parameter tree") from e
        delta = jnp.einsum("...ir,...ro->...io", ab["a"], ab["b"])
        if delta.shape != w.shape:
            raise LoRAError(f"LoRA adapter {p}: A @ B is {delta.shape}, kernel is {w.shape}")
        _set(out, p, (w.astype(jnp.float32) + scale * delta).astype(w.dtype))
    return out


def lora_dense(x, kernel, a, b, alpha: float, rank: int):
    """The adapter applied to activations: x [..., in] -> x @ W + (alpha / rank) (x @ A) @ B [..., out]."""
    return x @ kernel + (alpha / rank) * ((x @ a) @ b)
