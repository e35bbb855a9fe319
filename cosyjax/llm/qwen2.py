"""Qwen2 decoder (HF `Qwen2ForCausalLM.model`) used by CosyVoice as a sequence model over embeddings.

Pre-norm blocks: `x += o_proj(attn(rope(q), rope(k), v))` on `RMSNorm(x)`, then
`x += down(silu(gate(h)) * up(h))` on `RMSNorm(x)`; a final RMSNorm. GQA with q/k/v biases,
rotate-half RoPE (theta from config.json; cos/sin built in float32 from integer positions), RMSNorm
statistics in float32. The module always runs against a `KVCache`: `T` new inputs are written at
each row's `cache.index` and attend causally to every valid slot (prefill: empty cache, T = prompt;
decode: T = 1), so prefill, chunked (bistream) prefill and decode share one code path.

Parameter tree (names follow HF so the converter is a table):
`embed_tokens/embedding [V, H]`, `layers_<i>/{input_layernorm, post_attention_layernorm}/scale`,
`layers_<i>/self_attn/{q,k,v}_proj/{kernel,bias}` (or one `qkv_proj` with `cfg.fused_qkv`, built by
`speech_lm.fuse_qkv`), `layers_<i>/self_attn/o_proj/kernel`,
`layers_<i>/mlp/{gate,up,down}_proj/kernel`, `norm/scale`. Kernels are `[in, out]`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cosyjax.llm import kv_cache as kvc
from cosyjax.llm.config import LLMConfig
from cosyjax.nn.attention import attention
from cosyjax.nn.layers import Embedding, Linear, RMSNorm
from cosyjax.nn.rotary import apply_rope, rope_cos_sin, rope_inv_freq

__all__ = ["Embedding", "Linear", "RMSNorm", "Qwen2Model", "rope_inv_freq", "rope_cos_sin", "apply_rope"]

class Qwen2Attention(nn.Module):
    cfg: LLMConfig

    @nn.compact
    def __call__(self, x, cos, sin, k_buf, v_buf, index, mask):
        """x `[B, T, H]`; k_buf/v_buf `[B, C, K, D]` -> (`[B, T, H]`, new k_buf, new v_buf)."""
        c = self.cfg
        B, T, _ = x.shape
        nq, nkv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        if c.fused_qkv:  # one matmul instead of three (GPU decode is weight-bandwidth bound)
            q, k, v = jnp.split(Linear(nq + 2 * nkv, True, c.dtype, name="qkv_proj")(x), [nq, nq + nkv], axis=-1)
        else:
            q = Linear(nq, True, c.dtype, name="q_proj")(x)
            k = Linear(nkv, True, c.dtype, name="k_proj")(x)
            v = Linear(nkv, True, c.dtype, name="v_proj")(x)
        q = apply_rope(q.reshape(B, T, c.num_heads, c.head_dim), cos, sin)
        k = apply_rope(k.reshape(B, T, c.num_kv_heads, c.head_dim), cos, sin)
        v = v.reshape(B, T, c.num_kv_heads, c.head_dim)
        k_buf = kvc.write(k_buf, k, index)
        v_buf = kvc.write(v_buf, v, index)
        out = attention(q, k_buf.astype(q.dtype), v_buf.astype(q.dtype), mask, implementation=c.attention_impl)
        out = Linear(c.hidden_size, False, c.dtype, name="o_proj")(out.reshape(B, T, c.num_heads * c.head_dim))
        return out, k_buf, v_buf


class Qwen2MLP(nn.Module):
    cfg: LLMConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        g = Linear(c.intermediate_size, False, c.dtype, name="gate_proj")(x)
        u = Linear(c.intermediate_size, False, c.dtype, name="up_proj")(x)
        return Linear(c.hidden_size, False, c.dtype, name="down_proj")(jax.nn.silu(g) * u)


class Qwen2Block(nn.Module):
    cfg: LLMConfig

    @nn.compact
    def __call__(self, x, cos, sin, k_buf, v_buf, index, mask):
        c = self.cfg
        h, k_buf, v_buf = Qwen2Attention(c, name="self_attn")(
            RMSNorm(c.rms_norm_eps, name="input_layernorm")(x), cos, sin, k_buf, v_buf, index, mask)
        x = x + h
        x = x + Qwen2MLP(c, name="mlp")(RMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(x))
        return x, k_buf, v_buf


class Qwen2Model(nn.Module):
    """Embeddings-in, final-normed hidden states out, over a `KVCache`."""

    cfg: LLMConfig

    def setup(self):
        c = self.cfg
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, c.dtype)
        self.layers = [Qwen2Block(c) for _ in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps)

    def embed(self, ids):
        """Text token ids `[B, T]` -> `[B, T, H]` in the compute dtype."""
        return self.embed_tokens(ids)

    def __call__(self, x, cache: kvc.KVCache, n_new=None, kv_lengths=None):
        """x `[B, T, H]` written at `cache.index` -> (hidden `[B, T, H]` after the final norm, cache).

        `n_new` (scalar or `[B]`, default T): how many of the T inputs of each row are real
        (right-padded chunks; 0 for a row that takes no input this step); each row's write index
        advances by it. `kv_lengths` `[B]` additionally masks keys at slots >= it.
        """
        c = self.cfg
        B, T, _ = x.shape
        x = x.astype(jnp.dtype(c.dtype))
        cos, sin = rope_cos_sin(kvc.positions(cache, T), c.head_dim, c.rope_theta)
        mask = kvc.attention_mask(cache, T, kv_lengths)
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            x, k_buf, v_buf = layer(x, cos, sin, cache.k[i], cache.v[i], cache.index, mask)
            ks.append(k_buf)
            vs.append(v_buf)
        step = jnp.asarray(T if n_new is None else n_new, jnp.int32)
        cache = cache.replace(k=tuple(ks), v=tuple(vs), index=cache.index + step)
        return self.norm(x), cache
