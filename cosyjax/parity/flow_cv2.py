"""CosyVoice2 flow parity against `<v>/flow/{encoder,estimator,inference}.npz` (tests/golden/README.md).

* encoder.npz: token embedding, encoder output and mu = encoder_proj(encoder(...)) for the
  nonstream / stream (chunk masks) / stream_context (finalize=False, 3-token look-ahead context)
  calls, their frame counts, and the projected speaker vector.
* estimator.npz (U-Net) and inference.npz: `flow_common`.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cosyjax.parity.core import FixtureContext, Result, compare, exact
from cosyjax.parity.flow_common import (COMPONENT, TOL, check_estimator, check_inference, check_speaker,
                                        flow_params)


def check(ctx: FixtureContext) -> list[Result]:
    if not ctx.has("flow", "inference.npz"):
        return []
    from cosyjax.flow.cv2 import model
    from cosyjax.flow.cv2.config import FlowCV2Config
    from cosyjax.flow.cv2.model import FlowCV2

    v = ctx.version
    cfg = FlowCV2Config.from_model_config(ctx.model_config)
    params = flow_params(ctx)
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
        rows += check_speaker(ctx, module, variables, z)

    rows += check_estimator(ctx, module, variables)
    rows += check_inference(ctx, model, params, cfg)
    return rows
