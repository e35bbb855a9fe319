"""Shared converter machinery: key bookkeeping and PyTorch -> Flax layout rules.

A `StateDict` wraps a flat `{key: array}` checkpoint. Converters `take` keys through it; every
missing or mis-shaped key is *recorded* (not raised) so that `finish()` can report ALL problems
at once, together with every key that no converter consumed.

Arrays may be numpy arrays (real conversion; weight norm folded in float64) or
`jax.ShapeDtypeStruct`s (shapes-only checks against the full-size manifests): the layout helpers
use `jnp` on abstract values so that `jax.eval_shape` can trace them.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.io.torch_checkpoint import CheckpointError

__all__ = ["ConversionError", "StateDict", "shapes_only_state"]


class ConversionError(CheckpointError):
    """Checkpoint keys that do not match the model (lists every problem at once)."""


def _is_np(a) -> bool:
    return isinstance(a, np.ndarray)


def shapes_only_state(manifest: dict) -> dict[str, jax.ShapeDtypeStruct]:
    """A state dict of `ShapeDtypeStruct`s from a `../shared/manifests/*.json` manifest."""
    return {e["key"]: jax.ShapeDtypeStruct(tuple(e["shape"]), jnp.dtype(e["dtype"]))
            for e in manifest["keys"]}


class StateDict:
    """A checkpoint being consumed by a converter: tracks used, missing and mis-shaped keys."""

    def __init__(self, state: dict[str, Any], source: str = "checkpoint", prefix_aliases: Iterable[str] = ()):
        self.source = source
        self.state: dict[str, Any] = {}
        for k, v in state.items():
            for alias in prefix_aliases:
                if k.startswith(alias):
                    k = k[len(alias):]
                    break
            self.state[k] = v
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.misshaped: list[str] = []
        self.ignored: set[str] = set()

    # ---- bookkeeping -------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.state

    def keys_with_prefix(self, prefix: str) -> list[str]:
        return [k for k in self.state if k.startswith(prefix)]

    def take(self, key: str, shape: tuple | None = None, dtype=None) -> Any:
        """Consume `key`; records a missing/mis-shaped key and returns a zero placeholder."""
        if key not in self.state:
            self.missing.append(key)
            return self._placeholder(shape, dtype)
        self.used.add(key)
        value = self.state[key]
        if shape is not None:
            shape = tuple(shape)
            if tuple(value.shape) != shape:
                self.misshaped.append(f"{key}: checkpoint {tuple(value.shape)} != model {shape}")
                return self._placeholder(shape, dtype)
        if _is_np(value) and dtype is not None:
            value = value.astype(dtype)
        return value

    def ignore(self, *keys: str) -> None:
        """Mark keys as intentionally unused (e.g. a tied `lm_head.weight`). Absent keys are fine."""
        for k in keys:
            if k in self.state:
                self.used.add(k)
                self.ignored.add(k)

    def _placeholder(self, shape, dtype):
        shape = tuple(shape) if shape is not None else (0,)
        dtype = dtype or np.float32
        abstract = any(not _is_np(v) for v in self.state.values())
        return jax.ShapeDtypeStruct(shape, dtype) if abstract else np.zeros(shape, dtype)

    def finish(self, what: str = "model") -> None:
        """Raise `ConversionError` listing every unknown, missing and mis-shaped key."""
        unknown = sorted(set(self.state) - self.used)
        if not (unknown or self.missing or self.misshaped):
            return
        lines = [f"{self.source}: checkpoint keys do not match the {what}"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): " + ", ".join(self.missing))
        if self.misshaped:
            lines.append(f"  mis-shaped ({len(self.misshaped)}): " + "; ".join(self.misshaped))
        if unknown:
            lines.append(f"  unknown ({len(unknown)}): " + ", ".join(unknown))
        raise ConversionError("\n".join(lines))

    # ---- layout rules (SPEC §8.6) ------------------------------------------------------------
    def linear(self, prefix: str, in_dim: int, out_dim: int, bias: bool = True, dtype=np.float32) -> dict:
        """torch Linear `[out, in]` -> Dense `{'kernel': [in, out], 'bias': [out]}`."""
        w = self.take(f"{prefix}.weight", (out_dim, in_dim))
        p = {"kernel": _cast(_transpose(w, (1, 0)), dtype)}
        if bias:
            p["bias"] = _cast(self.take(f"{prefix}.bias", (out_dim,)), dtype)
        return p

    def embedding(self, prefix: str, num: int, dim: int, dtype=np.float32) -> dict:
        return {"embedding": _cast(self.take(f"{prefix}.weight", (num, dim)), dtype)}

    def norm(self, prefix: str, dim: int, bias: bool = True, dtype=np.float32) -> dict:
        """LayerNorm/RMSNorm `weight`/`bias` -> `{'scale', 'bias'}`."""
        p = {"scale": _cast(self.take(f"{prefix}.weight", (dim,)), dtype)}
        if bias:
            p["bias"] = _cast(self.take(f"{prefix}.bias", (dim,)), dtype)
        return p

    def conv1d(self, prefix: str, in_ch: int, out_ch: int, k: int, groups: int = 1, bias: bool = True,
               weight_norm: bool = False, dtype=np.float32) -> dict:
        """Conv1d `[out, in/g, k]` -> `{'kernel': [k, in/g, out], 'bias': [out]}` (weight norm folded)."""
        shape = (out_ch, in_ch // groups, k)
        w = self.weight_norm_weight(prefix, shape, gain_axis=0) if weight_norm else self.take(f"{prefix}.weight", shape)
        p = {"kernel": _cast(_transpose(w, (2, 1, 0)), dtype)}
        if bias:
            p["bias"] = _cast(self.take(f"{prefix}.bias", (out_ch,)), dtype)
        return p

    def conv_transpose1d(self, prefix: str, in_ch: int, out_ch: int, k: int, bias: bool = True,
                         weight_norm: bool = False, dtype=np.float32) -> dict:
        """ConvTranspose1d `[in, out, k]` -> a *forward* conv kernel `[k, in, out]`, flipped along k.

        Use with `lax.conv_general_dilated(lhs_dilation=stride, padding=(k-1-p, k-1-p))`.
        Weight norm on a ConvTranspose has its gain on axis 0 (= the input channels).
        """
        shape = (in_ch, out_ch, k)
        w = self.weight_norm_weight(prefix, shape, gain_axis=0) if weight_norm else self.take(f"{prefix}.weight", shape)
        w = _transpose(w, (2, 0, 1))
        w = w[::-1] if _is_np(w) else w
        p = {"kernel": _cast(w, dtype)}
        if bias:
            p["bias"] = _cast(self.take(f"{prefix}.bias", (out_ch,)), dtype)
        return p

    def weight_norm_weight(self, prefix: str, v_shape: tuple, gain_axis: int = 0) -> Any:
        """Fold `w = g * v / ||v||` (norm over all axes but 0) in float64.

        Accepts `<prefix>.parametrizations.weight.original0/1` (torch >= 2.1) and legacy
        `<prefix>.weight_g/weight_v`.
        """
        g_shape = tuple(v_shape[i] if i == gain_axis else 1 for i in range(len(v_shape)))
        if self.has(f"{prefix}.weight_g") or self.has(f"{prefix}.weight_v"):
            g = self.take(f"{prefix}.weight_g", g_shape)
            v = self.take(f"{prefix}.weight_v", v_shape)
        else:
            g = self.take(f"{prefix}.parametrizations.weight.original0", g_shape)
            v = self.take(f"{prefix}.parametrizations.weight.original1", v_shape)
        if not (_is_np(g) and _is_np(v)):
            return jax.ShapeDtypeStruct(tuple(v_shape), jnp.float32)
        v64 = v.astype(np.float64)
        axes = tuple(i for i in range(v64.ndim) if i != 0)
        norm = np.sqrt(np.sum(v64 * v64, axis=axes, keepdims=True))
        return g.astype(np.float64) * v64 / norm

    def raw(self, key: str, shape: tuple | None = None, dtype=np.float32) -> Any:
        """A tensor copied as is (buffers, embeddings used directly)."""
        return _cast(self.take(key, shape), dtype)


def _transpose(a, axes):
    if _is_np(a):
        return np.transpose(a, axes)
    return _abstract_t(a, axes)


def _abstract_t(a, axes):
    return jax.ShapeDtypeStruct(tuple(a.shape[i] for i in axes), a.dtype)


def _cast(a, dtype):
    if _is_np(a):
        return np.ascontiguousarray(a.astype(dtype))
    return jax.ShapeDtypeStruct(tuple(a.shape), jnp.dtype(dtype))


def tree_shapes(tree) -> Any:
    """`{path: shape}` view of a parameter tree (numpy, jax or ShapeDtypeStruct leaves)."""
    return jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)


def compare_trees(converted, expected, what: str = "params") -> list[str]:
    """Differences between two parameter trees (structure and leaf shapes); empty when equal."""
    flat_c = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(converted)}
    flat_e = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    problems = []
    for k in sorted(set(flat_e) - set(flat_c)):
        problems.append(f"{what}: model leaf {k} {flat_e[k]} not produced by the converter")
    for k in sorted(set(flat_c) - set(flat_e)):
        problems.append(f"{what}: converter leaf {k} {flat_c[k]} is not a model parameter")
    for k in sorted(set(flat_c) & set(flat_e)):
        if flat_c[k] != flat_e[k]:
            problems.append(f"{what}: {k} converter {flat_c[k]} != model {flat_e[k]}")
    return problems


ConvertFn = Callable[[StateDict, Any], dict]
