"""The flow's conditional flow-matching loss (upstream `cosyvoice/flow/flow.py:CausalMaskedDiffWithXvec.forward`
/ `CausalMaskedDiffWithDiT.forward` + `cosyvoice/flow/flow_matching.py:ConditionalCFM.compute_loss`).

  spks = affine(L2normalize(embedding));   mu = encoder (CV2) / pre-lookahead + repeat (CV3) of the tokens
  cond = feat[:, :cond_len] per row (cond_len = 0 for about half the rows, else U{0..int(0.3 * feat_len)})
  y    = (1 - (1 - sigma_min) t) z + t x1,   u = x1 - (1 - sigma_min) z,   t ~ U(0, 1), z ~ N(0, 1)
  rows with a CFG draw <= training_cfg_rate get mu = spks = cond = 0
  loss = sum(mask (pred - u)^2) / (sum(mask) * 80),   pred = estimator(y, mask, mu, t, spks, cond)

The draws are an explicit `FlowDraws` pytree: `sample_flow_draws(key, ...)` for training, or the
recorded values for parity. The streaming choice changes the attention masks, so it is a static
Python bool (`sample_streaming(rng)` draws it on the host).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.flow.masks import padding_mask

__all__ = ["FlowLossConfig", "FlowDraws", "sample_flow_draws", "sample_streaming", "flow_loss", "flow_module"]


@dataclasses.dataclass(frozen=True)
class FlowLossConfig:
    """`cfm_params` training options from the yaml (`training_cfg_rate`, `sigma_min`)."""

    version: str
    training_cfg_rate: float = 0.2
    sigma_min: float = 1e-6
    prompt_fraction: float = 0.3  # upstream `random.randint(0, int(0.3 * feat_len))`

    @classmethod
    def from_model_config(cls, mc) -> "FlowLossConfig":
        cfm = mc.yaml["flow"]["decoder"]["cfm_params"]
        cfm = dict(getattr(cfm, "kwargs", {}).get("content", cfm))
        return cls(version=mc.version, training_cfg_rate=float(cfm.get("training_cfg_rate", 0.2)),
                   sigma_min=float(cfm.get("sigma_min", 1e-6)))


class FlowDraws(NamedTuple):
    """cond_len [B] int32 (0 = no prompt condition), t [B], z [B, T, 80], cfg_keep [B] bool."""

    cond_len: jax.Array
    t: jax.Array
    z: jax.Array
    cfg_keep: jax.Array


def sample_streaming(rng: np.random.Generator) -> bool:
    """Upstream's `random.random() < 0.5` streaming choice (host side: it selects the compiled masks)."""
    return bool(rng.random() < 0.5)


def sample_flow_draws(key, feat_len, T: int, loss_cfg: FlowLossConfig, n_mels: int = 80) -> FlowDraws:
    """key, feat_len [B] -> FlowDraws for padded length T (traceable)."""
    k_row, k_len, k_t, k_z, k_cfg = jax.random.split(key, 5)
    B = feat_len.shape[0]
    hi = jnp.floor(loss_cfg.prompt_fraction * feat_len.astype(jnp.float32)).astype(jnp.int32)
    idx = jnp.floor(jax.random.uniform(k_len, (B,)) * (hi + 1).astype(jnp.float32)).astype(jnp.int32)
    cond_len = jnp.where(jax.random.uniform(k_row, (B,)) < 0.5, 0, jnp.minimum(idx, hi))
    return FlowDraws(cond_len=cond_len, t=jax.random.uniform(k_t, (B,)),
                     z=jax.random.normal(k_z, (B, T, n_mels)),
                     cfg_keep=jax.random.uniform(k_cfg, (B,)) > loss_cfg.training_cfg_rate)


def flow_module(flow_cfg, version: str):
    """The flax module (`FlowCV2` / `FlowCV3`) for a flow config."""
    if version == "cosyvoice2":
        from cosyjax.flow.cv2.model import FlowCV2

        return FlowCV2(flow_cfg)
    from cosyjax.flow.cv3.model import FlowCV3

    return FlowCV3(flow_cfg)


def flow_loss(params, flow_cfg, loss_cfg: FlowLossConfig, speech_token, speech_token_len, speech_feat,
              speech_feat_len, embedding, draws: FlowDraws, streaming: bool = False):
    """speech_token [B, N] int, speech_token_len [B], speech_feat [B, 2N, 80] (time-major), speech_feat_len [B],
    embedding [B, 192] -> (loss scalar, aux dict: mu, spks, cond (before CFG dropout),
    mask, x1, pred, time-major)."""
    module = flow_module(flow_cfg, loss_cfg.version)
    variables = {"params": params}
    x1 = speech_feat.astype(jnp.float32)
    B, T, C = x1.shape
    spks = module.apply(variables, embedding, method=type(module).speaker)
    if loss_cfg.version == "cosyvoice2":
        _, mu, mu_len = module.apply(variables, speech_token, speech_token_len, speech_token_len, streaming,
                                     method=type(module).encode)
    else:
        _, mu = module.apply(variables, speech_token, speech_token_len, method=type(module).embed)
        mu_len = speech_token_len * flow_cfg.token_mel_ratio
    if mu.shape[1] != T:
        raise ValueError(f"speech_feat has {T} frames but the tokens give {mu.shape[1]} (token_mel_ratio x tokens)")
    mask = padding_mask(mu_len, T)
    cond = jnp.where(jnp.arange(T)[None, :, None] < draws.cond_len[:, None, None], x1, 0.0)
    t = draws.t.reshape(B).astype(jnp.float32)
    z = draws.z.astype(jnp.float32)
    tt = t[:, None, None]
    y = (1.0 - (1.0 - loss_cfg.sigma_min) * tt) * z + tt * x1
    u = x1 - (1.0 - loss_cfg.sigma_min) * z
    aux = {"mu": mu, "spks": spks, "cond": cond, "mask": mask, "x1": x1}  # as compute_loss receives them
    if loss_cfg.training_cfg_rate > 0:
        keep = draws.cfg_keep.astype(jnp.float32)
        mu, spks, cond = mu * keep[:, None, None], spks * keep[:, None], cond * keep[:, None, None]
    pred = module.apply(variables, y, mask, mu, t, spks, cond, streaming, method=type(module).estimate)
    m = mask.astype(jnp.float32)[:, :, None]
    loss = jnp.sum(((pred - u) * m) ** 2) / (jnp.sum(m) * C)
    return loss, dict(aux, pred=pred)
