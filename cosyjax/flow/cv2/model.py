"""CosyVoice2 flow (upstream `cosyvoice/flow/flow.py:CausalMaskedDiffWithXvec.inference`).

tokens -> mel:
  spks = Linear_{192->80}(L2normalize(embedding))
  e    = Embedding(prompt_token ++ token) * length mask                      [B, N, D]
  h    = UpsampleConformerEncoder(e)  (finalize=False: the last 3 tokens are look-ahead context only;
         streaming: 25-token / 50-frame block-causal attention)            [B, 2N, D]
  mu   = encoder_proj(h)                                                    [B, 2N, 80]
  cond = prompt mel in the first 2P frames, zeros after
  mel  = CFM(U-Net, mu, cond, spks, noise = seed-0 buffer[:2N])[2P:]       (prompt frames removed)

Public API: `flow_inference(params, cfg, token, token_len, prompt_token, prompt_token_len, prompt_feat,
prompt_feat_len, embedding, *, streaming, finalize, noise=None, n_timesteps=10)` -> (mel [B, T_new, 80],
mel_len [B]). Inputs are validated on the host, packed into a bucketed static length (calls whose
total token count falls in the same bucket reuse one compilation) and run by one jitted function.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from cosyjax.flow.cv2.config import FlowCV2Config
from cosyjax.flow.cv2.encoder import UpsampleConformerEncoder
from cosyjax.flow.cv2.unet import CausalConditionalDecoder
from cosyjax.flow.conditioning import FlowModule
from cosyjax.flow.inference import make_flow_inference, solve_and_strip_prompt
from cosyjax.flow.inputs import DEFAULT_BUCKETS, FlowInputError, bucket_for, pack_inputs
from cosyjax.flow.masks import padding_mask

__all__ = ["FlowCV2", "FlowInputError", "flow_inference", "flow_core", "DEFAULT_BUCKETS", "bucket_for",
           "init_params", "pack_inputs", "cast_matmul_weights"]


class FlowCV2(FlowModule):
    """All CV2 flow parameters; methods `speaker`, `encode`, `estimate` are used by `flow_core`."""

    cfg: FlowCV2Config

    def setup(self):
        c = self.cfg
        self.setup_conditioning()
        self.encoder = UpsampleConformerEncoder(c.encoder, self.dtype, self.attention_impl, name="encoder")
        self.encoder_proj = nn.Dense(c.output_size, name="encoder_proj")  # float32: mu feeds the ODE
        self.estimator = CausalConditionalDecoder(c.unet, self.dtype, self.attention_impl, name="estimator")

    def encoder_hidden(self, tokens, n_tokens, n_encoded, streaming: bool = False):
        """tokens [B, N], n_tokens [B] (incl. look-ahead context), n_encoded [B] (= n_tokens, or
        n_tokens - 3 when not finalizing) -> (embedding [B, N, D] f32, h [B, 2N, D], h_len [B])."""
        e = self.token_embedding(tokens, n_tokens)
        h, h_len = self.encoder(e.astype(self.dtype), n_tokens, n_encoded, streaming=streaming)
        return e, h, h_len

    def encode(self, tokens, n_tokens, n_encoded, streaming: bool = False):
        """As `encoder_hidden`, projected: -> (embedding [B, N, D], mu [B, 2N, 80] float32, mu_len [B])."""
        e, h, h_len = self.encoder_hidden(tokens, n_tokens, n_encoded, streaming)
        return e, self.encoder_proj(h.astype(jnp.float32)), h_len

    def encode_incremental(self, tokens, n_tokens, cache, window):
        """Incremental `encode` (cosyjax.flow.cv2.incremental): a token window [B, Tq+2+L], its valid
        length n_tokens [B], encoder cache, `EncoderWindow` -> (mu [B, 2Tq, 80] float32 of the new tokens, cache)."""
        e = self.token_embedding(tokens, n_tokens)
        h, cache = self.encoder(e.astype(self.dtype), n_tokens, None, cache=cache, window=window)
        return self.encoder_proj(h.astype(jnp.float32)), cache

    def estimate(self, x, mask, mu, t, spks, cond, streaming: bool = False, cache=None, window=None):
        """The U-Net estimator; with `cache`/`window` the incremental form returning (v, cache)."""
        return self.estimator(x, mask, mu, t, spks, cond, streaming=streaming, cache=cache, window=window)

    def __call__(self, tokens, n_tokens, embedding, x, t, cond, streaming: bool = False):
        """Touches every parameter once (used by `init`): returns the estimator output [B, 2N, 80]."""
        _, mu, mu_len = self.encode(tokens, n_tokens, n_tokens, streaming)
        spks = self.speaker(embedding)
        return self.estimate(x, padding_mask(mu_len, mu.shape[1]), mu, t, spks, cond, streaming)


def init_params(cfg: FlowCV2Config, key=None, n_tokens: int = 8, abstract: bool = False):
    """Random parameters with the converter's tree structure (or its shapes, with `abstract=True`)."""
    key = jax.random.PRNGKey(0) if key is None else key
    module = FlowCV2(cfg)
    T = n_tokens * cfg.encoder.upsample_stride
    args = (jnp.zeros((1, n_tokens), jnp.int32), jnp.full((1,), n_tokens, jnp.int32),
            jnp.zeros((1, cfg.spk_embed_dim)), jnp.zeros((1, T, cfg.output_size)), jnp.zeros((1,)),
            jnp.zeros((1, T, cfg.output_size)))
    init = lambda k: module.init(k, *args)["params"]  # noqa: E731
    return jax.eval_shape(init, key) if abstract else jax.jit(init)(key)


# estimator layers that compute in float32 whatever the compute dtype (time embedding, output projection)
_FLOAT32_ESTIMATOR_LAYERS = ("time_mlp_linear_1", "time_mlp_linear_2", "final_proj")


def cast_matmul_weights(params, dtype="bfloat16"):
    """Store the compute-dtype matmul/conv kernels in `dtype` (halves their memory traffic).

    Only kernels that `FlowCV2(dtype=...)` casts to `dtype` anyway are cast (every encoder and
    estimator kernel except the estimator's time MLP and final projection), so results equal running
    with float32 params; biases, norms, embeddings, pos_bias_u/v and the float32 layers stay as they are.
    """
    dtype = jnp.dtype(dtype)

    def visit(tree, low):
        return {k: visit(v, low and k not in _FLOAT32_ESTIMATOR_LAYERS) if isinstance(v, dict)
                else (v.astype(dtype) if low and k == "kernel" else v) for k, v in tree.items()}

    return {k: visit(v, k in ("encoder", "estimator")) if isinstance(v, dict) else v for k, v in params.items()}


@functools.partial(jax.jit, static_argnames=("cfg", "streaming", "n_timesteps", "dtype", "attention_impl",
                                             "return_trajectory"))
def flow_core(params, tokens, n_tokens, n_prompt, lookahead, cond, embedding, noise, *, cfg: FlowCV2Config,
              streaming: bool, n_timesteps: int = 10, dtype: str = "float32", attention_impl: str = "auto",
              return_trajectory: bool = False):
    """The jitted flow on packed, bucketed inputs.

    tokens [B, N] int32 (prompt ++ new, zero-padded), n_tokens [B] (valid tokens incl. the look-ahead
    context), n_prompt [B], lookahead [B] (0 when finalizing, else pre_lookahead_len), cond [B, 2N, 80]
    (prompt mel then zeros), embedding [B, 192], noise [B|1, 2N, 80].
    Returns a dict: mel [B, 2N, 80] (new frames first, zero after mel_len), mel_len [B], mu, cond,
    spks, mask, feat (the whole solved mel incl. prompt frames) and `trajectory` when requested.
    """
    module = FlowCV2(cfg, jnp.dtype(dtype), attention_impl)
    variables = {"params": params}
    r = cfg.encoder.upsample_stride
    _, mu, n_frames = module.apply(variables, tokens, n_tokens, n_tokens - lookahead, streaming,
                                   method=FlowCV2.encode)
    spks = module.apply(variables, embedding, method=FlowCV2.speaker)

    def estimator_fn(x, m, mu_, t, s, c):
        return module.apply(variables, x, m, mu_, t, s, c, streaming, method=FlowCV2.estimate)

    return solve_and_strip_prompt(estimator_fn, mu, spks, cond, noise, n_frames, n_prompt * r,
                                  n_mels=cfg.output_size, n_timesteps=n_timesteps, cfg_rate=cfg.inference_cfg_rate,
                                  t_scheduler=cfg.t_scheduler, return_trajectory=return_trajectory)


flow_inference = make_flow_inference(flow_core, """Speech tokens -> mel, prompt frames removed.

token [B, Tt] int, token_len [B]; prompt_token [B, Tp], prompt_token_len [B]; prompt_feat [B, Tm, 80]
(time-major log-mel), prompt_feat_len [B] (= 2 x prompt_token_len); embedding [B, 192].
streaming: 25-token / 50-frame block-causal attention (upstream `streaming=True`); finalize=False
uses the last 3 tokens as look-ahead context only (no frames for them). noise: None = upstream's
seed-0 buffer, else [1|B, >= total frames, 80]. dtype: compute dtype ('float32' | 'bfloat16';
norms, softmax and the ODE state stay float32). Returns (mel [B, T_new, 80] float32, mel_len [B]
int32): frames >= mel_len are zero; `trim=True` cuts the padded array to max(mel_len) frames
(outside jit). Pass `params` as device arrays (`jax.device_put`) to avoid re-uploading them.
""")
