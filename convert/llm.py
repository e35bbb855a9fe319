"""`llm.pt` converter (`Qwen2LM` / `CosyVoice3LM`, SPEC §8.2) -> `cosyjax.llm.speech_lm.SpeechLM` params.

Key map (torch Linear `[out, in]` -> kernel `[in, out]`):
```
llm.model.model.embed_tokens.weight                    -> llm/embed_tokens/embedding
llm.model.model.layers.<i>.self_attn.{q,k,v}_proj.*    -> llm/layers_<i>/self_attn/{q,k,v}_proj/{kernel,bias}
llm.model.model.layers.<i>.self_attn.o_proj.weight     -> llm/layers_<i>/self_attn/o_proj/kernel
llm.model.model.layers.<i>.mlp.{gate,up,down}_proj.weight -> llm/layers_<i>/mlp/*/kernel
llm.model.model.layers.<i>.{input,post_attention}_layernorm.weight -> .../scale
llm.model.model.norm.weight                            -> llm/norm/scale
speech_embedding.weight                                -> speech_embedding/embedding
llm_embedding.weight (cosyvoice2)                      -> llm_embedding/embedding
llm_decoder.weight (+ .bias, cosyvoice2)               -> llm_decoder/{kernel,bias}
llm.model.lm_head.weight                               -> consumed, not converted
```
`lm_head.weight` is tied to `embed_tokens.weight` (`tie_word_embeddings`); CosyVoice never uses it.
Both keys are read; with real weights they must be equal (upstream's strict load into the tied
tensor would otherwise silently keep whichever key loads last), else a `ConversionError`.
"""
from __future__ import annotations

import numpy as np

from convert.common import ConversionError, StateDict
from cosyjax.llm.config import LLMConfig

CHECKPOINT = "llm.pt"
PREFIX_ALIASES = ()

_QWEN = "llm.model.model"


def config_from(model_cfg) -> LLMConfig:
    return LLMConfig.from_model_config(model_cfg)


def _layer(sd: StateDict, i: int, c: LLMConfig) -> dict:
    p = f"{_QWEN}.layers.{i}"
    H, D = c.hidden_size, c.head_dim
    return {
        "self_attn": {
            "q_proj": sd.linear(f"{p}.self_attn.q_proj", H, c.num_heads * D, bias=True),
            "k_proj": sd.linear(f"{p}.self_attn.k_proj", H, c.num_kv_heads * D, bias=True),
            "v_proj": sd.linear(f"{p}.self_attn.v_proj", H, c.num_kv_heads * D, bias=True),
            "o_proj": sd.linear(f"{p}.self_attn.o_proj", c.num_heads * D, H, bias=False),
        },
        "mlp": {
            "gate_proj": sd.linear(f"{p}.mlp.gate_proj", H, c.intermediate_size, bias=False),
            "up_proj": sd.linear(f"{p}.mlp.up_proj", H, c.intermediate_size, bias=False),
            "down_proj": sd.linear(f"{p}.mlp.down_proj", c.intermediate_size, H, bias=False),
        },
        "input_layernorm": sd.norm(f"{p}.input_layernorm", H, bias=False),
        "post_attention_layernorm": sd.norm(f"{p}.post_attention_layernorm", H, bias=False),
    }


def convert(sd: StateDict, cfg: LLMConfig) -> dict:
    c = cfg
    H = c.hidden_size
    llm = {"embed_tokens": sd.embedding(f"{_QWEN}.embed_tokens", c.vocab_size, H)}
    for i in range(c.num_layers):
        llm[f"layers_{i}"] = _layer(sd, i, c)
    llm["norm"] = sd.norm(f"{_QWEN}.norm", H, bias=False)
    _check_tied(sd, c)
    params = {
        "llm": llm,
        "speech_embedding": sd.embedding("speech_embedding", c.speech_vocab_size, H),
        "llm_decoder": sd.linear("llm_decoder", H, c.speech_vocab_size, bias=c.decoder_bias),
    }
    if c.has_llm_embedding:
        params["llm_embedding"] = sd.embedding("llm_embedding", 2, H)
    return params


def _check_tied(sd: StateDict, c: LLMConfig) -> None:
    key = "llm.model.lm_head.weight"
    if not sd.has(key):
        return  # a checkpoint saved without the tied duplicate is fine: it is never used
    head = sd.take(key, (c.vocab_size, c.hidden_size))
    emb_key = f"{_QWEN}.embed_tokens.weight"
    emb = sd.state.get(emb_key)
    if isinstance(head, np.ndarray) and isinstance(emb, np.ndarray) and head.shape == emb.shape:
        if not np.array_equal(head, emb):
            raise ConversionError(
                f"{sd.source}: {key} differs from {emb_key}; they are tied (tie_word_embeddings) in "
                "Qwen2LM/CosyVoice3LM, so upstream's text embedding would be ambiguous")
