"""CosyVoice2 flow parity against `<v>/flow/{encoder,estimator,inference}.npz` (tests/golden/README.md).

Upstream arrays are channel-major `[B, 80, T]`; ours are time-major `[B, T, 80]` (transposed here).
* encoder.npz: token embedding, encoder output and mu = encoder_proj(encoder(...)) for the
  nonstream / stream (chunk masks) / stream_context (finalize=False, 3-token look-ahead context)
  calls, their frame counts, and the projected speaker vector.
* estimator.npz: one U-Net call on the CFG batch of 2 (not streaming, streaming, key-padded mask).
* inference.npz: full `flow_inference` for nonstream / stream_final / stream_chunk with the recorded
  noise (and once with the regenerated seed-0 buffer), what the solver was fed (mu, cond, spks) and
  the per-step ODE states / raw estimator outputs / times of the nonstream solve.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.parity.core import FixtureContext, Result, compare, exact

TOL = 1e-4
COMPONENT = "flow"


def _t(a):
    """[B, C, T] -> [B, T, C]."""
    return np.swapaxes(np.asarray(a), -1, -2)


def check(ctx: FixtureContext) -> list[Result]:
    if not ctx.has("flow", "inference.npz"):
        return []
    from convert.registry import convert_component
    from cosyjax.flow.cfm import t_span
    from cosyjax.flow.cv2.config import FlowCV2Config
    from cosyjax.flow.cv2.model import FlowCV2, flow_core, flow_inference, pack_inputs

    v = ctx.version
    cfg = FlowCV2Config.from_model_config(ctx.model_config)
    params = jax.device_put(convert_component("flow", ctx.model_config))
    module = FlowCV2(cfg)
    variables = {"params": params}
    rows: list[Result] = []
    L = cfg.pre_lookahead_len

    if ctx.has("flow", "encoder.npz"):
        z = ctx.npz("flow", "encoder.npz")
        tok = jnp.asarray(z["token_concat"])
        n = jnp.asarray(z["token_len"])
        for case, streaming, lookahead in (("nonstream", False, 0), ("stream", True, 0),
                                           ("stream_context", True, L)):
            if f"{case}__mu" not in z:
                continue
            e, mu, mu_len = module.apply(variables, tok, n, n - lookahead, streaming, method=FlowCV2.encode)
            want = z[f"{case}__mu"]
            T = want.shape[1]
            if case == "nonstream":
                rows.append(compare(v, COMPONENT, "encoder/token_embedding", e, z["token_embedding"], TOL))
            rows.append(compare(v, COMPONENT, f"encoder/{case}__mu", mu[:, :T], want, TOL))
            if f"{case}__encoder_out" in z:
                _, h, _ = module.apply(variables, tok, n, n - lookahead, streaming, method=FlowCV2.encoder_hidden)
                rows.append(compare(v, COMPONENT, f"encoder/{case}__encoder_out", h[:, :T],
                                    z[f"{case}__encoder_out"], TOL))
            if f"{case}__encoder_mask" in z:
                rows.append(exact(v, COMPONENT, f"encoder/{case}__frames", np.asarray(mu_len),
                                  z[f"{case}__encoder_mask"].sum(axis=(1, 2))))
        if "spks_projected" in z:
            spks = module.apply(variables, jnp.asarray(z["embedding_in"]), method=FlowCV2.speaker)
            rows.append(compare(v, COMPONENT, "encoder/spks_projected", spks, z["spks_projected"], TOL))

    if ctx.has("flow", "estimator.npz"):
        z = ctx.npz("flow", "estimator.npz")
        x, mu, cond = (jnp.asarray(_t(z[k])) for k in ("x", "mu", "cond"))
        t, spks = jnp.asarray(z["t"]), jnp.asarray(z["spks"])
        cases = [("out_nonstream", "mask", False), ("out_stream", "mask", True),
                 ("out_nonstream_padded", "mask_padded", False), ("out_stream_padded", "mask_padded", True)]
        for out_key, mask_key, streaming in cases:
            if out_key not in z or mask_key not in z:
                continue
            mask = jnp.asarray(z[mask_key][:, 0, :] > 0)
            got = module.apply(variables, x, mask, mu, t, spks, cond, streaming, method=FlowCV2.estimate)
            rows.append(compare(v, COMPONENT, f"estimator/{out_key}", got, _t(z[out_key]), TOL))

    z = ctx.npz("flow", "inference.npz")
    shared = [z[k] for k in ("token", "token_len", "prompt_token", "prompt_token_len", "prompt_feat",
                             "prompt_feat_len", "embedding")]
    for case, streaming, finalize in (("nonstream", False, True), ("stream_final", True, True),
                                      ("stream_chunk", True, False)):
        if f"{case}__mel" not in z:
            continue
        noise = _t(z[f"{case}__noise_z"]) if f"{case}__noise_z" in z else None
        note = "recorded noise" if noise is not None else "seed-0 noise regenerated"
        mel, _ = flow_inference(params, cfg, *shared, streaming=streaming, finalize=finalize, noise=noise)
        rows.append(compare(v, COMPONENT, f"inference/{case}__mel", mel, _t(z[f"{case}__mel"]), TOL, note))
        if noise is not None and case == "nonstream":
            mel0, _ = flow_inference(params, cfg, *shared, streaming=streaming, finalize=finalize)
            rows.append(compare(v, COMPONENT, f"inference/{case}__mel(seed0)", mel0, _t(z[f"{case}__mel"]), TOL,
                                "seed-0 noise regenerated"))
        packed = pack_inputs(cfg, *shared, finalize=finalize, noise=noise)
        traj = case == "nonstream" and "nonstream__x_per_step" in z
        out = flow_core(params, packed["tokens"], packed["n_tokens"], packed["n_prompt"], packed["lookahead"],
                        packed["cond"], packed["embedding"], packed["noise"], cfg=cfg, streaming=streaming,
                        return_trajectory=traj)
        T = int(np.asarray(out["mask"][0]).sum())
        for name, got in (("mu", out["mu"][:, :T]), ("cond", out["cond"][:, :T])):
            if f"{case}__{name}" in z:
                rows.append(compare(v, COMPONENT, f"inference/{case}__{name}", got, _t(z[f"{case}__{name}"]), TOL))
        if f"{case}__spks" in z:
            rows.append(compare(v, COMPONENT, f"inference/{case}__spks", out["spks"], z[f"{case}__spks"], TOL))
        if traj:
            tr = out["trajectory"]
            rows.append(compare(v, COMPONENT, "inference/nonstream__x_per_step", tr.x[:, 0, :T],
                                _t(z["nonstream__x_per_step"]), TOL))
            rows.append(compare(v, COMPONENT, "inference/nonstream__dphi_per_step", tr.v[:, :, :T],
                                _t(z["nonstream__dphi_per_step"]), TOL))
            if "nonstream__t_per_step" in z:
                rows.append(compare(v, COMPONENT, "inference/nonstream__t_per_step", tr.t,
                                    z["nonstream__t_per_step"], TOL))
    if "t_span" in z:
        rows.append(compare(v, COMPONENT, "inference/t_span", t_span(len(z["t_span"]) - 1, cfg.t_scheduler),
                            z["t_span"], TOL))
    return rows
