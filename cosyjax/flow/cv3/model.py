"""CosyVoice3 flow (upstream `cosyvoice/flow/flow.py:CausalMaskedDiffWithDiT.inference`).

tokens -> mel:
  spks = Linear_{192->80}(L2normalize(embedding))
  e    = Embedding(prompt_token ++ token) * length mask                      [B, N, 80]
  h    = PreLookaheadLayer(e)  (finalize=False: the last 3 tokens are right context only)
  mu   = repeat(h, 2) along time                                             [B, 2N, 80]
  cond = prompt mel in the first 2P frames, zeros after
  mel  = CFM(DiT, mu, cond, spks, noise = seed-0 buffer[:2N])[2P:]          (prompt frames removed)

Public API: `flow_inference(params, cfg, token, token_len, prompt_token, prompt_token_len, prompt_feat,
prompt_feat_len, embedding, *, streaming, finalize, noise=None, n_timesteps=10)` -> (mel [B, T_new, 80],
mel_len [B]). Inputs are validated on the host, packed into a bucketed static length (so calls whose
total token count falls in the same bucket reuse one compilation) and run by one jitted function.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cosyjax.flow.cv3.config import FlowCV3Config
from cosyjax.flow.cv3.dit import DiT
from cosyjax.flow.conditioning import FlowModule
from cosyjax.flow.inference import make_flow_inference, solve_and_strip_prompt
from cosyjax.flow.inputs import DEFAULT_BUCKETS, FlowInputError, bucket_for, pack_inputs
from cosyjax.flow.masks import padding_mask
from cosyjax.flow.pre_lookahead import PreLookaheadLayer

__all__ = ["FlowCV3", "FlowInputError", "flow_inference", "flow_core", "DEFAULT_BUCKETS", "bucket_for",
           "init_params", "pack_inputs", "cast_matmul_weights"]


class FlowCV3(FlowModule):
    """All CV3 flow parameters; methods `embed`, `speaker`, `estimate` are used by `flow_core`."""

    cfg: FlowCV3Config

    def setup(self):
        c = self.cfg
        self.setup_conditioning()
        self.pre_lookahead_layer = PreLookaheadLayer(c.pre_lookahead_channels, c.pre_lookahead_len, self.dtype,
                                                     name="pre_lookahead_layer")
        self.estimator = DiT(c, self.dtype, self.attention_impl, name="estimator")

    def embed(self, tokens, n_tokens):
        """tokens [B, N], n_tokens [B] -> (embedding [B, N, 80], mu [B, N*ratio, 80]) float32.

        The pre-lookahead output at token t needs tokens t..t+3; for rows that do not finalize,
        the caller shortens the valid length by 3 afterwards (those tokens then act as context).
        """
        e = self.token_embedding(tokens, n_tokens)
        h = self.pre_lookahead_layer(e).astype(jnp.float32)
        return e, jnp.repeat(h, self.cfg.token_mel_ratio, axis=1)

    def estimate(self, x, mask, mu, t, spks, cond, streaming: bool = False, cache=None):
        """The DiT velocity [B, T, 80]; with a `dit.DiTCache`, `(v, dit.DiTCacheUpdate)` (incremental.py)."""
        return self.estimator(x, mask, mu, t, spks, cond, streaming=streaming, cache=cache)

    def __call__(self, tokens, n_tokens, embedding, x, t, cond, streaming: bool = False):
        """Touches every parameter once (used by `init`): returns the estimator output [B, 2N, 80]."""
        _, mu = self.embed(tokens, n_tokens)
        spks = self.speaker(embedding)
        mask = padding_mask(n_tokens * self.cfg.token_mel_ratio, mu.shape[1])
        return self.estimate(x, mask, mu, t, spks, cond, streaming)


def init_params(cfg: FlowCV3Config, key=None, n_tokens: int = 8, abstract: bool = False):
    """Random parameters with the converter's tree structure (or its shapes, with `abstract=True`)."""
    key = jax.random.PRNGKey(0) if key is None else key
    module = FlowCV3(cfg)
    T = n_tokens * cfg.token_mel_ratio
    args = (jnp.zeros((1, n_tokens), jnp.int32), jnp.full((1,), n_tokens, jnp.int32),
            jnp.zeros((1, cfg.spk_embed_dim)), jnp.zeros((1, T, cfg.mel_dim)), jnp.zeros((1,)),
            jnp.zeros((1, T, cfg.mel_dim)))
    init = lambda k: module.init(k, *args)["params"]  # noqa: E731
    return jax.eval_shape(init, key) if abstract else jax.jit(init)(key)


# kernels that run in the compute dtype; time MLP, AdaLN modulation and proj_out stay float32
_LOW_PRECISION_KERNELS = {("estimator", "blocks", n) for n in ("to_q", "to_k", "to_v", "to_out", "ff_in", "ff_out")} | {
    ("estimator", n) for n in ("input_proj", "conv_pos_1", "conv_pos_2")} | {
    ("pre_lookahead_layer", n) for n in ("conv1", "conv2")}


def cast_matmul_weights(params, dtype="bfloat16"):
    """Store the compute-dtype matmul/conv kernels in `dtype` (halves their memory traffic).

    Only kernels that `FlowCV3(dtype=...)` casts to `dtype` anyway are cast, so results equal running
    with float32 params; biases, embeddings and float32 layers are left alone.
    """
    dtype = jnp.dtype(dtype)

    def visit(tree, path):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = visit(v, path + (k,))
            else:
                out[k] = v.astype(dtype) if (k == "kernel" and path in _LOW_PRECISION_KERNELS) else v
        return out

    return visit(params, ())


@functools.partial(jax.jit, static_argnames=("cfg", "streaming", "n_timesteps", "dtype", "attention_impl",
                                             "return_trajectory"))
def flow_core(params, tokens, n_tokens, n_prompt, lookahead, cond, embedding, noise, *, cfg: FlowCV3Config,
              streaming: bool, n_timesteps: int = 10, dtype: str = "float32", attention_impl: str = "auto",
              return_trajectory: bool = False):
    """The jitted flow on packed, bucketed inputs.

    tokens [B, N] int32 (prompt ++ new, zero-padded), n_tokens [B] (valid tokens incl. the look-ahead
    context), n_prompt [B], lookahead [B] (0 when finalizing, else pre_lookahead_len), cond [B, 2N, 80]
    (prompt mel then zeros), embedding [B, 192], noise [B|1, 2N, 80].
    Returns a dict: mel [B, 2N, 80] (new frames first, zero after mel_len), mel_len [B], mu, cond,
    spks, mask (and `trajectory` when requested).
    """
    module = FlowCV3(cfg, jnp.dtype(dtype), attention_impl)
    variables = {"params": params}
    r = cfg.token_mel_ratio
    _, mu = module.apply(variables, tokens, n_tokens, method=FlowCV3.embed)
    spks = module.apply(variables, embedding, method=FlowCV3.speaker)
    n_frames = (n_tokens - lookahead) * r

    def estimator_fn(x, m, mu_, t, s, c):
        return module.apply(variables, x, m, mu_, t, s, c, streaming, method=FlowCV3.estimate)

    return solve_and_strip_prompt(estimator_fn, mu, spks, cond, noise, n_frames, n_prompt * r,
                                  n_mels=cfg.mel_dim, n_timesteps=n_timesteps, cfg_rate=cfg.inference_cfg_rate,
                                  t_scheduler=cfg.t_scheduler, return_trajectory=return_trajectory)


flow_inference = make_flow_inference(flow_core, """Speech tokens -> mel, prompt frames removed.

token [B, Tt] int, token_len [B]; prompt_token [B, Tp], prompt_token_len [B]; prompt_feat [B, Tm, 80]
(time-major log-mel), prompt_feat_len [B] (= 2 x prompt_token_len); embedding [B, 192].
streaming: 50-frame block-causal attention (upstream `streaming=True`); finalize=False drops the
frames of the last 3 tokens (right context only). noise: None = upstream's seed-0 buffer, else
[1|B, >= total frames, 80]. Returns (mel [B, T_new, 80] float32, mel_len [B] int32): frames
>= mel_len are zero; `trim=True` cuts the padded array to max(mel_len) frames (outside jit).
Pass `params` as device arrays (`jax.device_put`) to avoid re-uploading them on each call.
""")
