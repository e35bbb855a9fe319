"""The speech-LM training loss (upstream `cosyvoice/llm/llm.py:Qwen2LM.forward` / `CosyVoice3LM`).

Host side, `prepare_lm_input_target` lays every row out as integer arrays (which table each slot
indexes, so the device embeds it with `SpeechLM.embed_prompt`), unistream
`[sos | instruct | text | task_id | speech]` or, when the row's draw is < 0.5 and
speech/text > 15/5, the 5:15 bistream interleave `[sos | instruct | t0..t4 | s0..s14 | t5.. | ...]`
with `fill` after every full speech chunk. Targets use IGNORE_ID = -1 on every non-speech slot.

Device side, `lm_loss` embeds, runs Qwen2 over the right-padded rows (`backbone_forward`), applies
`llm_decoder` and upstream's `LabelSmoothingLoss` (KL to the smoothed one-hot; denominator = number
of target tokens when `length_normalized_loss`, else the batch size) and `th_accuracy`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.errors import CosyJaxError
from cosyjax.llm.config import LLMConfig
from cosyjax.llm.speech_lm import KIND_PAD, KIND_SPECIAL, KIND_SPEECH, KIND_TEXT, SpeechLM, backbone_forward

__all__ = ["IGNORE_ID", "LLMLossConfig", "LMLayout", "LLMBatchError", "prepare_lm_input_target", "lm_loss",
           "row_draws"]

IGNORE_ID = -1


class LLMBatchError(CosyJaxError):
    """An LLM training batch that cannot be laid out (lengths, ids out of range, missing instruct)."""


@dataclasses.dataclass(frozen=True)
class LLMLossConfig:
    """yaml `llm:` training options: `lsm_weight` (label smoothing) and `length_normalized_loss`."""

    lsm_weight: float = 0.0
    length_normalized_loss: bool = True

    @classmethod
    def from_model_config(cls, mc) -> "LLMLossConfig":
        y = mc.yaml["llm"]
        return cls(lsm_weight=float(y.get("lsm_weight", 0.0)),
                   length_normalized_loss=bool(y.get("length_normalized_loss", True)))


@dataclasses.dataclass(frozen=True)
class LMLayout:
    """Right-padded rows: `ids`, `kind`, `target` int32 `[B, L]` (target -1 = ignored), `length` `[B]`,
    `bistream` bool `[B]` (which layout each row took)."""

    ids: np.ndarray
    kind: np.ndarray
    target: np.ndarray
    length: np.ndarray
    bistream: np.ndarray


def row_draws(rng: np.random.Generator, batch: int) -> np.ndarray:
    """The per-row `random.random()` of `prepare_lm_input_target` -> float64 `[B]` (< 0.5: try bistream)."""
    return rng.random(batch)


def _rows(name, a, lens):
    a = np.asarray(a)
    lens = np.asarray(lens).reshape(-1)
    if a.ndim != 2 or lens.shape[0] != a.shape[0]:
        raise LLMBatchError(f"{name} must be [B, T] with lengths [B], got {a.shape} and {lens.shape}")
    if np.any(lens < 0) or np.any(lens > a.shape[1]):
        raise LLMBatchError(f"{name} lengths {lens.tolist()} must lie in [0, {a.shape[1]}]")
    return [a[b, :int(lens[b])].astype(np.int64) for b in range(a.shape[0])]


def _check(name, rows, hi, row_names=None):
    for b, r in enumerate(rows):
        if r.size and (r.min() < 0 or r.max() >= hi):
            who = row_names[b] if row_names else f"row {b}"
            raise LLMBatchError(f"{name} of {who}: ids {r[(r < 0) | (r >= hi)][:5].tolist()} out of range [0, {hi})")


def prepare_lm_input_target(cfg: LLMConfig, text_token, text_token_len, speech_token, speech_token_len,
                            row_uniform, instruct_token=None, instruct_token_len=None, length: int | None = None,
                            row_names=None) -> LMLayout:
    """Upstream `prepare_lm_input_target` on the host.

    text_token [B, Tt], speech_token [B, Ts] (+ lengths [B]); instruct_token [B, Ti] (cosyvoice3: required,
    the upstream batch always has it); row_uniform [B] float (the per-row draws). `length`: pad to this
    many slots (a bucket), default the longest row. -> `LMLayout`.
    """
    text = _rows("text_token", text_token, text_token_len)
    speech = _rows("speech_token", speech_token, speech_token_len)
    B = len(text)
    if len(speech) != B:
        raise LLMBatchError(f"speech_token has batch {len(speech)}, text_token {B}")
    if cfg.version == "cosyvoice3":
        if instruct_token is None:
            raise LLMBatchError("CosyVoice3LM.forward needs instruct_token / instruct_token_len")
        instruct = _rows("instruct_token", instruct_token, instruct_token_len)
    else:
        # Qwen2LM.forward never passes an instruct (upstream builds an empty one)
        instruct = [np.zeros((0,), np.int64)] * B
    _check("text_token", text, cfg.vocab_size, row_names)
    _check("instruct_token", instruct, cfg.vocab_size, row_names)
    _check("speech_token", speech, cfg.speech_token_size, row_names)
    u = np.asarray(row_uniform, np.float64).reshape(-1)
    if u.shape[0] != B:
        raise LLMBatchError(f"row_uniform has {u.shape[0]} draws for {B} rows")
    special = KIND_SPECIAL if cfg.has_llm_embedding else KIND_SPEECH
    m0, m1 = cfg.mix_ratio
    seqs, bistream = [], np.zeros(B, bool)
    for b in range(B):
        t, s, ins = text[b], speech[b], instruct[b]
        if len(t) == 0:
            who = row_names[b] if row_names else f"row {b}"
            raise LLMBatchError(f"text_token of {who} is empty")
        ids, kind, tgt = [cfg.sos_id], [special], [IGNORE_ID]
        ids += ins.tolist()
        kind += [KIND_TEXT] * len(ins)
        tgt += [IGNORE_ID] * len(ins)
        if u[b] < 0.5 and len(s) / len(t) > m1 / m0:
            bistream[b] = True
            for j in range(math.ceil((len(t) + 1) / m0)):
                tj, sj = t[j * m0:(j + 1) * m0], s[j * m1:(j + 1) * m1]
                if len(tj) == m0:
                    ids += tj.tolist() + sj.tolist()
                    kind += [KIND_TEXT] * m0 + [KIND_SPEECH] * m1
                    tgt += [IGNORE_ID] * (m0 - 1) + sj.tolist() + [cfg.fill_id]
                else:
                    rest = s[j * m1:]
                    ids += tj.tolist() + [cfg.task_id] + rest.tolist()
                    kind += [KIND_TEXT] * len(tj) + [special] + [KIND_SPEECH] * len(rest)
                    tgt += [IGNORE_ID] * len(tj) + rest.tolist() + [cfg.eos_id]
        else:
            ids += t.tolist() + [cfg.task_id] + s.tolist()
            kind += [KIND_TEXT] * len(t) + [special] + [KIND_SPEECH] * len(s)
            tgt += [IGNORE_ID] * len(t) + s.tolist() + [cfg.eos_id]  # task_id predicts s0
        seqs.append((ids, kind, tgt))
    n = np.array([len(q[0]) for q in seqs], np.int32)
    L = int(n.max()) if length is None else int(length)
    if L < n.max():
        raise LLMBatchError(f"a row needs {int(n.max())} slots, more than the bucket of {L}")
    ids = np.zeros((B, L), np.int32)
    kind = np.full((B, L), KIND_PAD, np.int32)
    target = np.full((B, L), IGNORE_ID, np.int32)
    for b, (i, k, g) in enumerate(seqs):
        ids[b, :len(i)], kind[b, :len(k)], target[b, :len(g)] = i, k, g
    return LMLayout(ids, kind, target, n, bistream)


def label_smoothing_loss(logits, target, smoothing: float, normalize_length: bool):
    """logits [B, L, V] float32, target [B, L] int (-1 = ignored) -> scalar (upstream `LabelSmoothingLoss`)."""
    B, _, V = logits.shape
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    valid = target != IGNORE_ID
    tgt = jnp.where(valid, target, 0)
    conf, off = 1.0 - smoothing, smoothing / (V - 1)
    logp_t = jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    # KL(true || p) = sum_v q_v (log q_v - log p_v) with q = off everywhere but conf at the target
    kl = -(conf - off) * logp_t - off * jnp.sum(logp, axis=-1)
    const = (conf * math.log(conf) if conf > 0 else 0.0) + ((V - 1) * off * math.log(off) if off > 0 else 0.0)
    per_tok = jnp.where(valid, kl + const, 0.0)
    denom = jnp.sum(valid) if normalize_length else B
    return jnp.sum(per_tok) / denom


def accuracy(logits, target):
    """th_accuracy: fraction of non-ignored slots whose argmax equals the target."""
    valid = target != IGNORE_ID
    hit = (jnp.argmax(logits, axis=-1) == target) & valid
    return jnp.sum(hit) / jnp.maximum(jnp.sum(valid), 1)


def lm_loss(params, cfg: LLMConfig, loss_cfg: LLMLossConfig, ids, kind, target, length):
    """ids, kind, target [B, L] int32, length [B] -> (loss scalar, aux dict: acc, logits [B, L, V],
    lm_input [B, L, H]). Differentiable in `params` (the converter's `SpeechLM` tree)."""
    lm_input = SpeechLM(cfg).apply({"params": params}, ids, kind, method=SpeechLM.embed_prompt)
    _, logits = backbone_forward(params, cfg, lm_input, length)
    loss = label_smoothing_loss(logits, target, loss_cfg.lsm_weight, loss_cfg.length_normalized_loss)
    return loss, {"acc": accuracy(logits, target), "logits": logits, "lm_input": lm_input}
