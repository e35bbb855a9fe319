"""On-device token sampling: repetition-aware sampling (RAS, upstream default) and greedy.

Upstream (`cosyvoice/utils/common.py`): `ras_sampling` = `nucleus_sampling` (softmax, stable
descending sort, take items while cumulative mass < top_p and count < top_k — the crossing item is
included — then `multinomial` among them); if the drawn id occurs >= win_size * tau_r times in the
last win_size generated tokens, set its score to -inf and redraw from the full softmax
(`random_sampling`). Here every draw is an inverse-CDF lookup of one uniform number: index = first j
with `u < cumsum(w)[j] / sum(w)`. Uniforms come from `jax.random` keys or are injected, which
replays the recorded-uniform golden decode exactly.

All functions work on a batch: logp `[B, V]` float32, history `[B, W]` int32 (-1 = empty).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cosyjax.llm.config import LLMConfig

__all__ = ["SAMPLERS", "suppress_stop", "inverse_cdf", "nucleus", "ras_sample", "greedy_sample", "sample",
           "draw_uniforms", "uniforms_from_keys"]

SAMPLERS = ("ras", "greedy")
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


def nucleus(cfg: LLMConfig, p, u):
    """Nucleus draw: p `[B, V]` probabilities -> (ids `[B]`, kept count `[B]`).

    Sorted descending with ties broken by lower index first (`lax.top_k`, as torch's stable sort);
    item i is kept while the float32 mass accumulated *before* it is < top_p and i < top_k."""
    k = min(cfg.top_k, p.shape[-1])
    vals, idx = jax.lax.top_k(p, k)  # [B, k]
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


def ras_sample(cfg: LLMConfig, logp, history, u):
    """RAS: logp `[B, V]` (stop ids already suppressed), history `[B, W]`, u `[B, 2]` ->
    (ids `[B]`, fallback used `[B]` bool, nucleus size `[B]`)."""
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


def sample(cfg: LLMConfig, method: str, logp, history, u):
    """Dispatch on the static `method` ('ras' | 'greedy') -> (ids, fallback, nucleus size)."""
    if method == "greedy":
        z = jnp.zeros(logp.shape[:1], jnp.int32)
        return greedy_sample(logp), z.astype(bool), z
    if method == "ras":
        return ras_sample(cfg, logp, history, u)
    raise ValueError(f"unknown sampling method {method!r}; expected one of {SAMPLERS}")


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
    """The two uniforms `[B, 2]` of sampling call `step` from `[B, N, 2]` (index clamped to N-1)."""
    return jax.lax.dynamic_index_in_dim(uniforms, step, axis=1, keepdims=False).astype(jnp.float32)
