"""Training-loss parity on `<v>/train/{llm,flow_nonstream,flow_stream}.npz` (upstream `Qwen2LM.forward` /
`CosyVoice3LM.forward`, the flows' `forward` + `ConditionalCFM.compute_loss`, eval mode, fp32).

The recorded draws are replayed (`row_uniform`, `py_random`, `py_randint`, `t`, `z`, `cfg_uniform`).
Rows: layout (`lm_target`, `lm_input_len` exact; `lm_input`, `logits` at valid slots), `loss` (rel <= 1e-5),
`acc`, the flow's `mu` / `spks` / `conds` / `pred`, and the gradients: upstream's `grad.<key>` (or
`grad_rows` + `grad_rowidx`) are mapped into our tree by the project's own converter (`convert_state`),
so transposes, stacking and renames are the checkpoint key map's; every tensor must reach
rel-L2 <= 1e-4. One summary row per loss reports the worst tensor; each failing tensor gets its own row.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.parity.core import FixtureContext, Result, compare, exact

COMPONENT = "train"
TOL_LOSS = 1e-5
TOL_GRAD = 1e-4
TOL_ACT = 1e-4
ROUNDOFF = 1e-7  # gradients below this fraction of the total gradient norm are round-off
_ID0 = 1000.0  # key ids written into the probe state; far outside any real weight value
# upstream UpsampleConformerEncoder.forward runs the pre-lookahead conv on the embed layer's output, which
# is LayerNorm(bias) != 0 at padded tokens, so a padded row's last 3 tokens see the padding (its mu depends
# on the batch's padded length); cosyjax zeroes that input (pad-invariant). The fixture's padded row is
# CFG-dropped (mu -> 0), so loss and gradients are unaffected; mu is compared on unpadded rows.
CV2_PAD_QUIRK = "padded rows differ (upstream pre-lookahead sees padding)"
FILES = ("llm.npz", "flow_nonstream.npz", "flow_stream.npz")
_LLM_KEYS = ("text_token", "text_token_len", "speech_token", "speech_token_len", "row_uniform", "loss", "acc")
_FLOW_KEYS = ("speech_token", "speech_token_len", "speech_feat", "speech_feat_len", "embedding", "py_random",
              "py_randint", "t", "z", "cfg_uniform", "loss")
# tied aliases the converter reads but never converts; their gradient lives under the other key
_TIED = {"llm.model.lm_head.weight": "llm.model.model.embed_tokens.weight"}


def _fail(v, output, note) -> Result:
    return Result(v, COMPONENT, output, float("nan"), float("nan"), 0.0, False, note)


def check(ctx: FixtureContext) -> list[Result]:
    if not ctx.has("train"):
        return []
    v = ctx.version
    rows = [_fail(v, f"fixture/{f}", f"missing fixture {ctx.fixture('train', f)}")
            for f in FILES if not ctx.has("train", f)]
    with jax.default_matmul_precision("highest"):
        if ctx.has("train", "llm.npz"):
            rows += _llm(ctx, ctx.npz("train", "llm.npz"))
        for f in FILES[1:]:
            if ctx.has("train", f):
                rows += _flow(ctx, ctx.npz("train", f), f[:-4])
    return rows


# ------------------------------------------------------------------------------------------ gradients
def upstream_grads(z: dict, state: dict) -> dict[str, np.ndarray]:
    """The fixture's gradients as dense arrays keyed by checkpoint names (row-sparse tables expanded)."""
    keys = list(z.keys())  # indexed below so that a tracking fixture dict records every array as read
    out = {k[5:]: np.asarray(z[k], np.float32) for k in keys if k.startswith("grad.")}
    for k in keys:
        if k.startswith("grad_rows."):
            name = k[len("grad_rows."):]
            dense = np.zeros(state[name].shape, np.float32)
            dense[np.asarray(z[f"grad_rowidx.{name}"]).astype(np.int64)] = z[k]
            out[name] = dense
    return out


def mapped_grads(component: str, mc, grads: dict[str, np.ndarray]):
    """(expected gradient tree, key-id tree, id -> key) in our parameter layout, via the converter.

    The converter's maps are pure relayouts (transpose / reshape / stack), so converting a state
    whose entries are the gradients gives the gradient tree, and converting one whose entries are
    key ids tells, element by element, which upstream tensor each position came from.
    """
    from convert.registry import component_module, convert_state
    from cosyjax.io.torch_checkpoint import load_state_dict

    state = load_state_dict(mc.path(component_module(component).CHECKPOINT))
    names = sorted(grads)
    ids = {k: i for i, k in enumerate(names)}

    def probe(fill):
        s = {}
        for k, a in state.items():
            src = _TIED.get(k, k)
            s[k] = fill(src, a) if src in grads else a  # buffers (e.g. rotary inv_freq) stay as stored
        return convert_state(component, s, mc)

    id_tree = probe(lambda k, a: np.full(a.shape, _ID0 + ids[k], np.float32))
    grad_tree = probe(lambda k, a: grads[k].reshape(a.shape).astype(np.float32))

    def key_of(leaf):
        leaf = np.asarray(leaf, np.float64)
        hit = (leaf >= _ID0) & (leaf < _ID0 + len(names)) & (leaf == np.round(leaf))
        return np.where(hit, leaf - _ID0, -1).astype(np.int64)

    id_tree = jax.tree_util.tree_map(key_of, id_tree)
    grad_tree = jax.tree_util.tree_map(lambda g, i: np.where(i >= 0, np.asarray(g, np.float32), 0.0),
                                       grad_tree, id_tree)
    return grad_tree, id_tree, names


def compare_grads(v: str, what: str, ours, component: str, mc, z: dict) -> list[Result]:
    """One summary row (worst tensor) + a row per tensor above tolerance."""
    from convert.registry import component_module
    from cosyjax.io.torch_checkpoint import load_state_dict

    grads = upstream_grads(z, load_state_dict(mc.path(component_module(component).CHECKPOINT)))
    if not grads:
        return [_fail(v, f"{what}/grad", "fixture has no grad.* / grad_rows.* arrays")]
    want_tree, id_tree, names = mapped_grads(component, mc, grads)
    got_l = jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.asarray, ours))
    want_l, id_l = jax.tree_util.tree_leaves(want_tree), jax.tree_util.tree_leaves(id_tree)
    if len(got_l) != len(want_l):
        return [_fail(v, f"{what}/grad", f"{len(got_l)} parameter leaves vs {len(want_l)} mapped")]
    per_key: dict[int, list] = {i: [[], []] for i in range(len(names))}
    unmapped = []
    for g, w, i in zip(got_l, want_l, id_l):
        g = np.asarray(g, np.float64)
        unmapped.append(g[i < 0].ravel())
        for k in np.unique(i[i >= 0]):
            sel = i == k
            per_key[int(k)][0].append(g[sel])
            per_key[int(k)][1].append(np.asarray(w, np.float64)[sel])
    rows, worst = [], None
    total = float(np.sqrt(sum(float(np.sum(np.asarray(w, np.float64) ** 2)) for w in grads.values())))
    for k, (gs, ws) in per_key.items():
        if not gs:
            rows.append(_fail(v, f"{what}/grad.{names[k]}", "upstream gradient maps to no parameter"))
            continue
        g, w = np.concatenate(gs), np.concatenate(ws)
        r = compare(v, COMPONENT, f"{what}/grad.{names[k]}", g, w, TOL_GRAD)
        floor = ROUNDOFF * total
        if not r.passed and np.linalg.norm(w) <= floor and np.linalg.norm(g - w) <= floor:
            # zero in exact arithmetic (e.g. attention key biases: softmax is shift invariant); both sides
            # hold round-off only, so the relative error is meaningless
            r = dataclasses.replace(r, rel_l2=float(np.linalg.norm(g - w) / total), tol=ROUNDOFF, passed=True,
                                    note="zero in exact arithmetic: error / total gradient norm")
            rows.append(r)
            continue
        worst = r if worst is None or not (r.rel_l2 <= worst.rel_l2) else worst
        if not r.passed:
            rows.append(r)
    extra = np.concatenate(unmapped) if unmapped else np.zeros(0)
    if extra.size and np.any(extra != 0):
        rows.append(Result(v, COMPONENT, f"{what}/grad(no upstream key)", float(np.linalg.norm(extra)),
                           float(np.max(np.abs(extra))), 0.0, False, "non-zero gradient where upstream records none"))
    n_bad = sum(1 for r in rows if not r.passed)
    n_round = len(rows) - n_bad
    rows.insert(0, Result(v, COMPONENT, f"{what}/grad(worst of {len(names)})", worst.rel_l2, worst.max_abs,
                          TOL_GRAD, n_bad == 0 and worst.passed,
                          f"worst: {worst.output.split('/grad.', 1)[-1]}; {n_bad} failing, {n_round} round-off only"))
    return rows


# ------------------------------------------------------------------------------------------ LLM
def _llm(ctx, z) -> list[Result]:
    from cosyjax.llm.config import LLMConfig
    from cosyjax.train.llm_loss import LLMLossConfig, lm_loss, prepare_lm_input_target

    v = ctx.version
    need = _LLM_KEYS + (("instruct_token", "instruct_token_len") if v == "cosyvoice3" else ())
    missing = [k for k in need if k not in z]
    if missing:
        return [_fail(v, "llm/fixture", f"llm.npz lacks {', '.join(missing)}")]
    mc = ctx.model_config
    cfg = LLMConfig.from_model_config(mc)
    loss_cfg = LLMLossConfig.from_model_config(mc)
    lay = prepare_lm_input_target(cfg, z["text_token"], z["text_token_len"], z["speech_token"],
                                  z["speech_token_len"], z["row_uniform"], z.get("instruct_token"),
                                  z.get("instruct_token_len"))
    rows = []
    if "lm_target" in z:
        rows.append(exact(v, COMPONENT, "llm/lm_target", _pad_to(lay.target, z["lm_target"].shape, -1),
                          z["lm_target"]))
    if "lm_input_len" in z:
        rows.append(exact(v, COMPONENT, "llm/lm_input_len", lay.length, z["lm_input_len"]))
    params = jax.device_put(ctx.params("llm"))
    args = tuple(jnp.asarray(a) for a in (lay.ids, lay.kind, lay.target, lay.length))

    def f(p):
        return lm_loss(p, cfg, loss_cfg, *args)

    (loss, aux), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    valid = np.arange(lay.ids.shape[1])[None, :] < lay.length[:, None]
    for name in ("lm_input", "logits"):
        if name in z:
            got = np.where(valid[..., None], np.asarray(aux[name]), 0)
            want = _pad_to(z[name], got.shape, 0)
            rows.append(compare(v, COMPONENT, f"llm/{name}", got, np.where(valid[..., None], want, 0), TOL_LOSS,
                                "valid slots"))
    rows.append(compare(v, COMPONENT, "llm/loss", loss, z["loss"], TOL_LOSS))
    rows.append(compare(v, COMPONENT, "llm/acc", aux["acc"], z["acc"], TOL_LOSS))
    return rows + compare_grads(v, "llm", grads, "llm", mc, z)


def _pad_to(a, shape, value):
    a = np.asarray(a)
    if a.shape[1] >= shape[1]:
        return a[:, :shape[1]]
    pad = [(0, 0)] * a.ndim
    pad[1] = (0, shape[1] - a.shape[1])
    return np.pad(a, pad, constant_values=value)


# ------------------------------------------------------------------------------------------ flow
def recorded_flow_draws(z, loss_cfg):
    """The fixture's draws in call order -> (streaming, FlowDraws) (time-major z)."""
    from cosyjax.train.flow_loss import FlowDraws

    py_random, py_randint = list(np.asarray(z["py_random"]).ravel()), list(np.asarray(z["py_randint"]).ravel())
    streaming = bool(py_random.pop(0) < 0.5)
    B = z["speech_token"].shape[0]
    cond_len = np.zeros(B, np.int32)
    for b in range(B):
        if py_random.pop(0) < 0.5:
            continue
        cond_len[b] = int(py_randint.pop(0))
    return streaming, FlowDraws(cond_len=jnp.asarray(cond_len), t=jnp.asarray(np.asarray(z["t"]).reshape(B)),
                                z=jnp.asarray(np.swapaxes(z["z"], 1, 2)),
                                cfg_keep=jnp.asarray(np.asarray(z["cfg_uniform"]) > loss_cfg.training_cfg_rate))


def _flow(ctx, z, case) -> list[Result]:
    from convert.registry import component_module
    from cosyjax.train.flow_loss import FlowLossConfig, flow_loss

    v = ctx.version
    missing = [k for k in _FLOW_KEYS if k not in z]
    if missing:
        return [_fail(v, f"{case}/fixture", f"{case}.npz lacks {', '.join(missing)}")]
    mc = ctx.model_config
    flow_cfg = component_module("flow").config_from(mc)
    loss_cfg = FlowLossConfig.from_model_config(mc)
    streaming, draws = recorded_flow_draws(z, loss_cfg)
    rows = []
    if "streaming" in z:
        rows.append(exact(v, COMPONENT, f"{case}/streaming", np.asarray(streaming), np.asarray(bool(z["streaming"]))))
    params = jax.device_put(ctx.params("flow"))
    batch = tuple(jnp.asarray(z[k]) for k in ("speech_token", "speech_token_len", "speech_feat", "speech_feat_len",
                                               "embedding"))

    def f(p):
        return flow_loss(p, flow_cfg, loss_cfg, *batch, draws, streaming)

    (loss, aux), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    valid = np.asarray(aux["mask"])[:, :, None]
    for ours, theirs in (("x1", "x1"), ("mu", "mu"), ("cond", "conds"), ("pred", "pred")):
        if theirs not in z:
            continue
        got, want = np.where(valid, aux[ours], 0), np.where(valid, np.swapaxes(z[theirs], 1, 2), 0)
        note = "valid frames"  # padded frames are masked out of the loss (upstream's encoder leaves bias there)
        if theirs == "mu" and v == "cosyvoice2":
            full = np.asarray(z["speech_token_len"]) == z["speech_token"].shape[1]
            got, want = got[full], want[full]
            note = f"unpadded rows {np.flatnonzero(full).tolist()}: {CV2_PAD_QUIRK}"
        rows.append(compare(v, COMPONENT, f"{case}/{theirs}", got, want, TOL_ACT, note))
    if "spks" in z:
        rows.append(compare(v, COMPONENT, f"{case}/spks", aux["spks"], z["spks"], TOL_ACT))
    if "mask" in z:
        rows.append(exact(v, COMPONENT, f"{case}/mask", np.asarray(aux["mask"]), np.asarray(z["mask"])[:, 0] > 0))
    rows.append(compare(v, COMPONENT, f"{case}/loss", loss, z["loss"], TOL_LOSS))
    return rows + compare_grads(v, case, grads, "flow", mc, z)
