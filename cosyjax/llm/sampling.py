"""On-device token sampling: repetition-aware sampling (RAS, upstream default), greedy, top-k/top-p.

Upstream (`cosyvoice/utils/common.py`): `ras_sampling` = `nucleus_sampling` (softmax, stable
descending sort, take items while cumulative mass < top_p and count < top_k — the crossing item is
included — then `multinomial` among them); if the drawn id occurs >= win_size * tau_r times in the
last win_size generated tokens, set its score to -inf and redraw from the full softmax
(`random_sampling`). Here every draw is an inverse-CDF lookup of one uniform number: index = first j
with `u < cumsum(w)[j] / sum(w)`. Uniforms come from `jax.random` keys or are injected, which
replays the recorded-uniform golden decode exactly.

Samplers are small frozen dataclasses (hashable: passed to `jax.jit` as static values) with one
method `sample(logp, history, uniforms) -> (ids [B] int32, fallback [B] bool, nucleus size [B] int32)`:
`RAS(top_p, top_k, win_size, tau_r)` (upstream `ras_sampling`, defaults from the yaml), `Greedy()`,
`TopKTopP(top_k, top_p, temperature)`. The strings 'ras' / 'greedy' map to `RAS.from_config(cfg)` /
`Greedy()` (`resolve`).

All functions work on a batch: logp `[B, V]` float32, history `[B, W]` int32 (-1 = empty),
uniforms `[B, 2]` float32 in [0, 1).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Union

import jax
import jax.numpy as jnp

from cosyjax.llm.config import LLMConfig, LLMConfigError

__all__ = ["SAMPLERS", "RAS", "Greedy", "TopKTopP", "Sampler", "resolve", "suppress_stop", "inverse_cdf", "nucleus",
           "ras_sample", "greedy_sample", "sample", "top_k_rows", "draw_uniforms", "uniforms_from_keys"]

SAMPLERS = ("ras", "greedy")  # the strings accepted at the public boundary (mapped by `resolve`)
_NEG_INF = -jnp.inf


def suppress_stop(cfg: LLMConfig, logp, suppress, allow_fill: bool = False):
    """Mask stop ids in rows where `suppress` `[B]` is True (`sampling_ids(ignore_eos=True)`).

    'upstream' mode masks only index `speech_token_size` (for cosyvoice3 that is sos, not eos —
    quirk kept for parity, cosyvoice/llm/llm.py `TransformerLM.sampling_ids`); 'stop_set' masks
    the whole stop range (except the fill id when `allow_fill`, i.e. in bistream)."""
    V = logp.shape[-1]
    ids = jnp.arange(V, dtype=jnp.int32)
    if cfg.min_len_mask == "upstream":
        hit = ids == cfg.speech_token_size
    else:
        lo, hi = cfg.stop_ids
        hit = (ids >= lo) & (ids < hi)
        if allow_fill:
            hit = hit & (ids != cfg.fill_id)
    return jnp.where(suppress[:, None] & hit[None, :], _NEG_INF, logp)


def inverse_cdf(weights, u):
    """First index j with `u < cumsum(w)[j] / sum(w)`; weights `[B, N]` >= 0, u `[B]` in [0, 1) -> `[B]` int32.

    Never returns an index of zero weight (rounding at the top end falls back to the last
    non-zero entry)."""
    N = weights.shape[-1]
    c = jnp.cumsum(weights, axis=-1)
    frac = c / c[:, -1:]
    idx = jnp.sum((frac <= u[:, None]).astype(jnp.int32), axis=-1)
    last_nonzero = N - 1 - jnp.argmax((weights > 0)[:, ::-1], axis=-1).astype(jnp.int32)
    return jnp.minimum(idx, last_nonzero)


def top_k_rows(x, k: int):
    """`lax.top_k` of x `[B, V]` -> (values `[B, k]`, indices `[B, k]` int32), descending, lower index first on ties.

    The same result as `lax.top_k`, but vmapped copies stay rank 2: XLA CPU runs a rank-2 top-k as its fast
    top-k kernel and a rank-3 one (what `vmap` over batch-1 rows makes) as a full sort of every row, about
    100x slower for 6.6k speech logits (most of a tiny model's decode step)."""
    return _top_k_rank2(int(k))(x)


@functools.lru_cache(maxsize=None)
def _top_k_rank2(k: int):
    @jax.custom_batching.custom_vmap
    def top_k(x):
        # The barrier keeps the [B, k] result whole: if consumers' slices reach the sort, XLA no longer
        # sees the sort-then-slice pattern it turns into its top-k kernel (seen inside decode loops).
        v, i = jax.lax.optimization_barrier(jax.lax.top_k(x, k))
        return v, i

    @top_k.def_vmap
    def _rule(axis_size, in_batched, x):
        if not in_batched[0]:
            return top_k(x), (False, False)
        out = x.shape[:-1] + (k,)  # every leading axis (the vmapped one comes first) folds into the rows
        v, i = top_k(x.reshape(-1, x.shape[-1]))
        return (v.reshape(out), i.reshape(out)), (True, True)

    return top_k


def nucleus(cfg, p, u):
    """Nucleus draw: p `[B, V]` probabilities -> (ids `[B]`, kept count `[B]`); `cfg`: anything with
    `top_p` / `top_k` (an `LLMConfig`, `RAS`, `TopKTopP`).

    Sorted descending with ties broken by lower index first (`lax.top_k`, as torch's stable sort);
    item i is kept while the float32 mass accumulated *before* it is < top_p and i < top_k."""
    k = min(cfg.top_k, p.shape[-1])
    vals, idx = top_k_rows(p, k)  # [B, k]
    # Sequential float32 accumulation in the same order as upstream's Python loop.
    keep, cum = [], jnp.zeros(p.shape[:1], jnp.float32)
    for i in range(k):
        keep_i = cum < jnp.float32(cfg.top_p)
        keep.append(keep_i)
        cum = jnp.where(keep_i, cum + vals[:, i], cum)
    keep = jnp.stack(keep, axis=-1)
    # The condition is monotone, so `keep` is a prefix; zero-mass items never get picked.
    w = jnp.where(keep, vals, 0.0)
    j = jnp.minimum(inverse_cdf(w, u), jnp.sum(keep, axis=-1).astype(jnp.int32) - 1)
    return jnp.take_along_axis(idx, j[:, None], axis=-1)[:, 0].astype(jnp.int32), jnp.sum(keep, -1).astype(jnp.int32)


def ras_sample(cfg, logp, history, u):
    """RAS: logp `[B, V]` (stop ids already suppressed), history `[B, W]`, u `[B, 2]` ->
    (ids `[B]`, fallback used `[B]` bool, nucleus size `[B]`). `cfg`: an `LLMConfig` or `RAS`."""
    p = jax.nn.softmax(logp, axis=-1)
    top, n_keep = nucleus(cfg, p, u[:, 0])
    window = history[:, -cfg.win_size:] if history.shape[1] > cfg.win_size else history
    rep = jnp.sum((window == top[:, None]).astype(jnp.int32), axis=-1)
    fallback = rep.astype(jnp.float32) >= jnp.float32(cfg.ras_threshold)
    V = logp.shape[-1]
    masked = jnp.where(jnp.arange(V)[None, :] == top[:, None], _NEG_INF, logp)
    redraw = inverse_cdf(jax.nn.softmax(masked, axis=-1), u[:, 1])
    return jnp.where(fallback, redraw, top).astype(jnp.int32), fallback, n_keep


def greedy_sample(logp):
    """Argmax (lowest id on ties) `[B, V]` -> `[B]`."""
    return jnp.argmax(logp, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class RAS:
    """Repetition-aware sampling (upstream `ras_sampling`): nucleus draw, redrawn from the full
    softmax when the pick occurs >= win_size * tau_r times in the last win_size tokens."""

    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1

    @classmethod
    def from_config(cls, cfg: LLMConfig) -> "RAS":
        """The yaml's `sampling: !name:...ras_sampling` arguments (kept in `LLMConfig`)."""
        return cls(top_p=cfg.top_p, top_k=cfg.top_k, win_size=cfg.win_size, tau_r=cfg.tau_r)

    @property
    def ras_threshold(self) -> float:
        return self.win_size * self.tau_r  # a Python float, as upstream

    @property
    def history_size(self) -> int:
        return self.win_size

    needs_uniforms = True

    def sample(self, logp, history, uniforms):
        """logp `[B, V]`, history `[B, W]`, uniforms `[B, 2]` -> (ids, fallback, nucleus size) `[B]`."""
        return ras_sample(self, logp, history, uniforms)


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Argmax (lowest id on ties); draws no uniforms."""

    history_size = 1
    needs_uniforms = False

    def sample(self, logp, history, uniforms):
        """logp `[B, V]` -> (ids, fallback (all False), nucleus size (all 0)) `[B]`."""
        del history, uniforms
        z = jnp.zeros(logp.shape[:1], jnp.int32)
        return greedy_sample(logp), z.astype(bool), z


@dataclasses.dataclass(frozen=True)
class TopKTopP:
    """Temperature-scaled softmax, then the nucleus rule of `nucleus` (at most top_k ids, taken while
    the mass before them is < top_p), one inverse-CDF draw (uniform 0)."""

    top_k: int = 25
    top_p: float = 0.8
    temperature: float = 1.0

    history_size = 1
    needs_uniforms = True

    def __post_init__(self):
        if not self.temperature > 0:
            raise LLMConfigError(f"TopKTopP temperature must be > 0, got {self.temperature}")
        if self.top_k < 1 or not 0 < self.top_p <= 1:
            raise LLMConfigError(f"TopKTopP needs top_k >= 1 and 0 < top_p <= 1, got {self.top_k}, {self.top_p}")

    def sample(self, logp, history, uniforms):
        """logp `[B, V]`, uniforms `[B, 2]` -> (ids, fallback (all False), nucleus size) `[B]`."""
        del history
        p = jax.nn.softmax(logp / jnp.float32(self.temperature), axis=-1)
        ids, n_keep = nucleus(self, p, uniforms[:, 0])
        return ids, jnp.zeros(ids.shape, bool), n_keep


Sampler = Union[RAS, Greedy, TopKTopP]


def resolve(cfg: LLMConfig, sampling) -> Sampler:
    """'ras' -> `RAS.from_config(cfg)`, 'greedy' -> `Greedy()`; a sampler object passes through."""
    if isinstance(sampling, (RAS, Greedy, TopKTopP)):
        return sampling
    if sampling == "ras":
        return RAS.from_config(cfg)
    if sampling == "greedy":
        return Greedy()
    raise LLMConfigError(f"unknown sampling method {sampling!r}; expected one of {SAMPLERS} or a sampler object "
                     "(RAS, Greedy, TopKTopP)")


def sample(cfg: LLMConfig, method, logp, history, u):
    """`resolve(cfg, method).sample(logp, history, u)` -> (ids, fallback, nucleus size)."""
    return resolve(cfg, method).sample(logp, history, u)


def uniforms_from_keys(keys, n: int):
    """keys `[B]` -> uniforms `[B, n, 2]` float32; row i of key k = `uniform(fold_in(k, i), (2,))`.

    Drawn before the decode loop (per sampling call, so a prefix does not depend on n); the loop
    itself then only indexes an array (no RNG ops inside the compiled `while`)."""
    return _uniforms_from_keys(keys, int(n))


@functools.partial(jax.jit, static_argnums=1)
def _uniforms_from_keys(keys, n):
    steps = jnp.arange(n, dtype=jnp.uint32)
    one = lambda k: jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(k, i), (2,), jnp.float32))(steps)
    return jax.vmap(one)(keys)


def draw_uniforms(uniforms, step):
    """The two uniforms `[B, 2]` of sampling call `step` (`[]` or per row `[B]`) from `[B, N, 2]`
    (index clamped to N-1)."""
    B, N = uniforms.shape[:2]
    i = jnp.clip(jnp.broadcast_to(jnp.asarray(step, jnp.int32), (B,)), 0, N - 1)
    return jnp.take_along_axis(uniforms, i[:, None, None], axis=1)[:, 0].astype(jnp.float32)
