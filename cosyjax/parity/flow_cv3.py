"""CosyVoice3 flow parity against `<v>/flow/{encoder,estimator,inference}.npz` (tests/golden/README.md).

* encoder.npz: token embedding, pre-lookahead output and mu (finalize / context paths), projected speaker.
* estimator.npz (DiT) and inference.npz: `flow_common`.
"""
from __future__ import annotations

import jax.numpy as jnp

from cosyjax.parity.core import FixtureContext, Result, compare
from cosyjax.parity.flow_common import (COMPONENT, TOL, check_estimator, check_inference, check_speaker,
                                        flow_params)


def check(ctx: FixtureContext) -> list[Result]:
    if not ctx.has("flow", "inference.npz"):
        return []
    from cosyjax.flow.cv3 import model
    from cosyjax.flow.cv3.config import FlowCV3Config
    from cosyjax.flow.cv3.model import FlowCV3

    v = ctx.version
    cfg = FlowCV3Config.from_model_config(ctx.model_config)
    params = flow_params(ctx)
    module = FlowCV3(cfg)
    variables = {"params": params}
    rows: list[Result] = []
    r = cfg.token_mel_ratio
    L = cfg.pre_lookahead_len

    if ctx.has("flow", "encoder.npz"):
        z = ctx.npz("flow", "encoder.npz")
        tok = jnp.asarray(z["token_concat"])
        n = jnp.asarray(z["token_len"])
        e, mu = module.apply(variables, tok, n, method=FlowCV3.embed)
        rows.append(compare(v, COMPONENT, "encoder/token_embedding", e, z["token_embedding"], TOL))
        if "nonstream__mu" in z:
            rows.append(compare(v, COMPONENT, "encoder/nonstream__mu", mu, z["nonstream__mu"], TOL))
        h = module.apply(variables, e, method=lambda m, x: m.pre_lookahead_layer(x))
        if "nonstream__pre_lookahead_out" in z:
            rows.append(compare(v, COMPONENT, "encoder/nonstream__pre_lookahead_out", h,
                                z["nonstream__pre_lookahead_out"], TOL))
        # finalize=False: same call, the last L tokens only serve as right context
        keep = int(z["token_len"][0]) - L
        if "stream_context__pre_lookahead_out" in z:
            rows.append(compare(v, COMPONENT, "encoder/stream_context__pre_lookahead_out", h[:, :keep],
                                z["stream_context__pre_lookahead_out"], TOL))
        if "stream_context__mu" in z:
            rows.append(compare(v, COMPONENT, "encoder/stream_context__mu", mu[:, :keep * r],
                                z["stream_context__mu"], TOL))
        rows += check_speaker(ctx, module, variables, z)

    rows += check_estimator(ctx, module, variables)
    rows += check_inference(ctx, model, params, cfg)
    return rows
