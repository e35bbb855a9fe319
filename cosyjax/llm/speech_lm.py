"""The speech-token LM around the Qwen2 backbone (`Qwen2LM` / `CosyVoice3LM`): embeddings, head, prompt layout.

Parameter tree (= the converter's output):
```
llm/...                       Qwen2Model (embed_tokens, layers_<i>, norm)
speech_embedding/embedding    [S + num_special, H]
llm_embedding/embedding       [2, H]          cosyvoice2 only (row 0 = sos, row 1 = task_id)
llm_decoder/kernel (+ bias)   [H, S + num_special]   (bias: cosyvoice2 only)
```

Prompt layout (SPEC §3.4, `Qwen2LM.inference`), one row per utterance, left-padded to a common
length L so that the last prompt position is slot L-1 for every row:
```
[pad ... pad | sos | prompt_text | text | task_id | prompt_speech_token]
```
It is assembled on the host as integer arrays `ids [B, L]` + `kind [B, L]` (which table each id
indexes) and embedded on device by `SpeechLM.embed_prompt`.
"""
from __future__ import annotations
from cosyjax.errors import CosyJaxError

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.llm import kv_cache as kvc
from cosyjax.llm.config import LLMConfig
from cosyjax.llm.qwen2 import Embedding, Linear, Qwen2Model

__all__ = [
    "KIND_PAD", "KIND_TEXT", "KIND_SPEECH", "KIND_SPECIAL", "LLMInputError", "PromptLayout", "SpeechLM",
    "abstract_params", "backbone_forward", "build_prompt", "cast_params", "filter_silent_tokens", "fuse_qkv",
    "init_params",
    "length_limits", "new_cache", "prompt_rows",
]

KIND_PAD, KIND_TEXT, KIND_SPEECH, KIND_SPECIAL = 0, 1, 2, 3  # which table `ids` index


class LLMInputError(CosyJaxError):
    """Bad input to the speech LM (shapes, lengths, ids out of range, missing <|endofprompt|>)."""


class SpeechLM(nn.Module):
    """Qwen2 backbone + speech embedding + speech head. Methods are used with `apply(..., method=...)`."""

    cfg: LLMConfig

    def setup(self):
        c = self.cfg
        self.llm = Qwen2Model(c)
        self.speech_embedding = Embedding(c.speech_vocab_size, c.hidden_size, c.dtype)
        if c.has_llm_embedding:
            self.llm_embedding = Embedding(2, c.hidden_size, c.dtype)
        self.llm_decoder = Linear(c.speech_vocab_size, c.decoder_bias, c.dtype, out_dtype="float32")

    def embed_prompt(self, ids, kind):
        """ids, kind `[B, L]` (see `build_prompt`) -> `[B, L, H]`; pad slots are zeros."""
        text = self.llm.embed(jnp.where(kind == KIND_TEXT, ids, 0))
        speech = self.speech_embedding(jnp.where(kind == KIND_SPEECH, ids, 0))
        out = jnp.where((kind == KIND_TEXT)[..., None], text, speech)
        if self.cfg.has_llm_embedding:
            special = self.llm_embedding(jnp.where(kind == KIND_SPECIAL, ids, 0))
            out = jnp.where((kind == KIND_SPECIAL)[..., None], special, out)
        return jnp.where((kind == KIND_PAD)[..., None], jnp.zeros((), out.dtype), out)

    def embed_text(self, ids):
        """Text ids `[B, T]` -> `[B, T, H]` (Qwen2 `embed_tokens`)."""
        return self.llm.embed(ids)

    def embed_speech(self, tokens):
        """Speech ids `[B, T]` -> `[B, T, H]` (`speech_embedding`)."""
        return self.speech_embedding(tokens)

    def special(self, which: str):
        """sos / task_id embedding `[H]` (`llm_embedding` rows 0/1 for cv2, `speech_embedding` rows for cv3)."""
        c = self.cfg
        row = c.sos_id if which == "sos" else c.task_id
        table = self.llm_embedding if c.has_llm_embedding else self.speech_embedding
        return table(jnp.asarray(row, jnp.int32))

    def forward(self, x, cache: kvc.KVCache, n_new=None, kv_lengths=None):
        """x `[B, T, H]` -> (hidden `[B, T, H]`, cache); see `Qwen2Model.__call__`."""
        return self.llm(x, cache, n_new, kv_lengths)

    def logits(self, h):
        """hidden `[..., H]` -> float32 logits `[..., S + num_special]` (`llm_decoder`)."""
        return self.llm_decoder(h).astype(jnp.float32)

    def logp(self, h):
        """hidden `[..., H]` -> float32 log-softmax over the speech vocabulary."""
        return jax.nn.log_softmax(self.logits(h), axis=-1)

    def __call__(self, ids, kind, cache: kvc.KVCache):
        """Prefill (used by `init`): ids/kind `[B, L]` -> (log-probs `[B, L, V]`, cache)."""
        h, cache = self.forward(self.embed_prompt(ids, kind), cache)
        return self.logp(h), cache


# ---------------------------------------------------------------------------------------------
# parameters and caches

def new_cache(cfg: LLMConfig, batch: int, capacity: int, start=None) -> kvc.KVCache:
    """An empty cache `[B, capacity, K, D]` per layer in `cfg.kv_cache_dtype` (default: the compute dtype)."""
    return kvc.init_cache(cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.head_dim,
                          jnp.dtype(cfg.kv_cache_dtype or cfg.dtype), start)


def _init_args(cfg: LLMConfig):
    ids = jnp.zeros((1, 4), jnp.int32)
    kind = jnp.array([[KIND_SPECIAL if cfg.has_llm_embedding else KIND_SPEECH, KIND_TEXT, KIND_TEXT, KIND_SPEECH]])
    return ids, kind, new_cache(cfg, 1, 4)


def init_params(cfg: LLMConfig, key) -> dict:
    """Random parameters (normal(0.02) matrices, unit norms) with the converter's tree structure."""
    return SpeechLM(cfg).init(key, *_init_args(cfg))["params"]


def abstract_params(cfg: LLMConfig) -> dict:
    """`ShapeDtypeStruct` tree of `init_params` without allocating (for shape checks)."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.PRNGKey(0))


def fuse_qkv(params) -> dict:
    """Converter tree -> the tree of `cfg.replace(fused_qkv=True)`: each layer's q/k/v kernels `[H, .]`
    and biases concatenated into `self_attn/qkv_proj` (same math, one matmul). Call once at load."""
    llm = dict(params["llm"])
    for name, layer in params["llm"].items():
        if not name.startswith("layers_"):
            continue
        attn = dict(layer["self_attn"])
        parts = [attn.pop(p) for p in ("q_proj", "k_proj", "v_proj")]
        attn["qkv_proj"] = {key: jnp.concatenate([p[key] for p in parts], axis=-1) for key in ("kernel", "bias")}
        llm[name] = {**layer, "self_attn": attn}
    return {**params, "llm": llm}


def cast_params(params, dtype) -> dict:
    """Cast matrices/embeddings (ndim >= 2) to `dtype` once, so jitted steps read `dtype` weights.

    Norm scales and biases keep their dtype (they are cast where used)."""
    dt = jnp.dtype(dtype)
    return jax.tree_util.tree_map(lambda a: a.astype(dt) if a.ndim >= 2 else a, params)


# ---------------------------------------------------------------------------------------------
# host-side input handling

@dataclasses.dataclass(frozen=True)
class PromptLayout:
    """Left-padded prompt rows: `ids`, `kind` `[B, L]` int32, `start` `[B]` (first real slot), `n` `[B]`."""

    ids: np.ndarray
    kind: np.ndarray
    start: np.ndarray
    n: np.ndarray


def _rows(name: str, tokens, lengths, batch: int | None):
    """Normalise a `[B, T]` id array (+ `[B]` lengths, default T) to a list of 1-D int64 rows."""
    if tokens is None:
        if batch is None:
            raise LLMInputError(f"{name} is required")
        return [np.zeros((0,), np.int64) for _ in range(batch)]
    a = np.asarray(tokens)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise LLMInputError(f"{name} must be [B, T] token ids, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise LLMInputError(f"{name} must hold integer token ids, got dtype {a.dtype}")
    if batch is not None and a.shape[0] != batch:
        raise LLMInputError(f"{name} has batch {a.shape[0]}, expected {batch}")
    if lengths is None:
        lens = np.full((a.shape[0],), a.shape[1], np.int64)
    else:
        lens = np.asarray(lengths).reshape(-1).astype(np.int64)
        if lens.shape[0] != a.shape[0]:
            raise LLMInputError(f"{name} lengths {lens.shape} do not match batch {a.shape[0]}")
        if np.any(lens < 0) or np.any(lens > a.shape[1]):
            raise LLMInputError(f"{name} lengths {lens.tolist()} must lie in [0, {a.shape[1]}]")
    return [a[b, : lens[b]].astype(np.int64) for b in range(a.shape[0])]


def _check_range(name: str, rows, hi: int):
    for b, r in enumerate(rows):
        if r.size and (r.min() < 0 or r.max() >= hi):
            bad = r[(r < 0) | (r >= hi)]
            raise LLMInputError(f"{name} row {b}: ids {bad[:5].tolist()} out of range [0, {hi})")


def prompt_rows(cfg: LLMConfig, text, text_len=None, prompt_text=None, prompt_text_len=None,
                prompt_speech_token=None, prompt_speech_token_len=None):
    """Validated per-row (text, prompt_text, prompt_speech) id lists."""
    text_rows = _rows("text", text, text_len, None)
    B = len(text_rows)
    pt_rows = _rows("prompt_text", prompt_text, prompt_text_len, B)
    ps_rows = _rows("prompt_speech_token", prompt_speech_token, prompt_speech_token_len, B)
    for b, r in enumerate(text_rows):
        if r.size == 0:
            raise LLMInputError(f"text row {b} is empty (min/max lengths are multiples of the text length)")
    _check_range("text", text_rows, cfg.vocab_size)
    _check_range("prompt_text", pt_rows, cfg.vocab_size)
    _check_range("prompt_speech_token", ps_rows, cfg.speech_token_size)
    if cfg.endofprompt_id is not None:
        for b in range(B):
            if not (np.any(text_rows[b] == cfg.endofprompt_id) or np.any(pt_rows[b] == cfg.endofprompt_id)):
                raise LLMInputError(
                    f"row {b}: CosyVoice3 needs <|endofprompt|> (id {cfg.endofprompt_id}) in text or prompt_text "
                    "(e.g. prompt_text 'You are a helpful assistant.<|endofprompt|>' + transcript)")
    return text_rows, pt_rows, ps_rows


def build_prompt(cfg: LLMConfig, text_rows, pt_rows, ps_rows, length: int | None = None) -> PromptLayout:
    """`[sos | prompt_text | text | task_id | prompt_speech]` per row, left-padded to `length` (default: max)."""
    B = len(text_rows)
    special_kind = KIND_SPECIAL if cfg.has_llm_embedding else KIND_SPEECH
    seqs = []
    for b in range(B):
        ids = np.concatenate([[cfg.sos_id], pt_rows[b], text_rows[b], [cfg.task_id], ps_rows[b]])
        nt = len(pt_rows[b]) + len(text_rows[b])
        kind = np.concatenate([[special_kind], np.full(nt, KIND_TEXT), [special_kind],
                               np.full(len(ps_rows[b]), KIND_SPEECH)])
        seqs.append((ids, kind))
    n = np.array([len(s[0]) for s in seqs], np.int32)
    L = int(n.max()) if length is None else int(length)
    if L < n.max():
        raise LLMInputError(f"prompt of {int(n.max())} positions does not fit in {L} slots")
    ids = np.zeros((B, L), np.int32)
    kind = np.zeros((B, L), np.int32)
    for b, (i, k) in enumerate(seqs):
        ids[b, L - len(i):] = i
        kind[b, L - len(k):] = k
    return PromptLayout(ids=ids, kind=kind, start=(L - n).astype(np.int32), n=n)


def length_limits(cfg: LLMConfig, text_rows, min_len=None, max_len=None):
    """Per-row (min_len, max_len) int32 `[B]`: `int(ratio * len(text))` as upstream, or overrides."""
    B = len(text_rows)
    n = np.array([len(r) for r in text_rows], np.float64)

    def pick(override, ratio, name):
        if override is None:
            return np.array([int(v * ratio) for v in n], np.int32)
        o = np.broadcast_to(np.asarray(override, np.int64), (B,)).astype(np.int32)
        if np.any(o < 0):
            raise LLMInputError(f"{name} must be >= 0, got {o.tolist()}")
        return o

    return pick(min_len, cfg.min_token_text_ratio, "min_len"), pick(max_len, cfg.max_token_text_ratio, "max_len")


def filter_silent_tokens(cfg: LLMConfig, tokens) -> list[int]:
    """`CosyVoiceModel.llm_job`'s filter: drop silent tokens after more than `max_silent_tokens` in a row.

    Applied to what the flow gets; the LLM itself conditions on every token (cosyvoice3 only; the
    cosyvoice2 list is empty)."""
    out, run = [], 0
    silent = set(cfg.silent_tokens)
    for t in (int(x) for x in tokens):
        if t in silent:
            run += 1
            if run > cfg.max_silent_tokens:
                continue
        else:
            run = 0
        out.append(t)
    return out



@functools.partial(jax.jit, static_argnames=("cfg",))
def backbone_forward(params, cfg: LLMConfig, xs, lengths=None):
    """Teacher-forced full forward without a prior cache: xs `[B, T, H]` (right-padded, `lengths` `[B]`)
    -> (hidden `[B, T, H]` after the final norm, float32 logits `[B, T, V]`) = upstream
    `Qwen2Encoder.forward` + `llm_decoder`."""
    B, T, _ = xs.shape
    cache = new_cache(cfg, B, T)
    h, _ = SpeechLM(cfg).apply({"params": params}, xs, cache, None, lengths, method=SpeechLM.forward)
    return h, SpeechLM(cfg).apply({"params": params}, h, method=SpeechLM.logits)
