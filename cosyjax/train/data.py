"""Training data: upstream parquet data lists and JSONL manifests -> validated utterances -> bucketed batches.

Sources (`read_dataset(path, ...)`):
* a `.list` / `.txt` file of parquet paths (upstream `data.list`), or one `.parquet` file: columns `utt`,
  `text`, `speech_token` (list[int]), `utt_embedding` / `spk_embedding` (list[float] 192), `audio_data`
  (encoded audio bytes; the flow's mel comes from it), optional `instruct` (CosyVoice3), optional
  precomputed `text_token` / `speech_feat` (list of 80-float frames);
* a `.jsonl` manifest: one object per line with `wav` (path) and `text`; optional `utt`, `instruct`,
  `speech_token`, `embedding`, `text_token`. The frontend extracts the mel from the wav; speech tokens and
  the speaker embedding need the folder's ONNX models (speech_tokenizer_v*.onnx, campplus.onnx) unless
  the manifest gives them (the tiny demo folder has no ONNX models, so its manifests carry `speech_token`
  and `embedding`).

`Batcher` draws a deterministic epoch order per seed, pads each batch to a length bucket (few compiled
shapes) and, for the LLM, lays rows out with upstream's `prepare_lm_input_target`.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os

import numpy as np

from cosyjax.errors import CosyJaxError

__all__ = ["TrainDataError", "Utterance", "read_dataset", "Batcher", "bucket_length"]


class TrainDataError(CosyJaxError):
    """Unusable training data: the message names the file and row."""


@dataclasses.dataclass
class Utterance:
    utt: str
    text: str
    speech_token: np.ndarray  # int32 [N]
    embedding: np.ndarray | None = None  # float32 [192]
    speech_feat: np.ndarray | None = None  # float32 [2N, 80]
    instruct: str | None = None
    text_token: np.ndarray | None = None  # int32 [Tt]
    instruct_token: np.ndarray | None = None


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]


def read_dataset(path: str, component: str, model_config, frontend=None) -> list[Utterance]:
    """All utterances of a data list / parquet file / JSONL manifest, validated for `component`."""
    if not os.path.exists(path):
        raise TrainDataError(f"data list not found: {path}")
    if path.endswith(".jsonl"):
        utts = _read_manifest(path, component, model_config, frontend)
    else:
        files = [path] if path.endswith(".parquet") else [
            p if os.path.isabs(p) else os.path.join(os.path.dirname(path), p) for p in _lines(path)]
        if not files:
            raise TrainDataError(f"{path}: the data list names no parquet file")
        utts = [u for f in files for u in _read_parquet(f, component, model_config)]
    if not utts:
        raise TrainDataError(f"{path}: no utterances")
    _validate(utts, component, model_config, path, frontend)
    return utts


def _required(component):
    return ("utt", "speech_token") + (("text",) if component == "llm" else ())


def _read_parquet(path, component, mc) -> list[Utterance]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # optional extra
        raise TrainDataError("reading parquet data lists needs pyarrow (pip install 'cosyjax[train]')") from e
    if not os.path.isfile(path):
        raise TrainDataError(f"parquet file not found: {path}")
    table = pq.read_table(path)
    cols = set(table.column_names)
    need = list(_required(component))
    if component == "flow":
        if not cols & {"utt_embedding", "spk_embedding"}:
            need.append("utt_embedding")
        if "speech_feat" not in cols:
            need.append("audio_data")
    missing = [c for c in need if c not in cols]
    if missing:
        raise TrainDataError(f"{path}: missing column(s) {', '.join(missing)} (have {sorted(cols)})")
    rows = table.to_pylist()
    if not rows:
        raise TrainDataError(f"{path}: the parquet file has no rows")
    out = []
    for i, r in enumerate(rows):
        who = f"{path} row {i} (utt {r.get('utt')!r})"
        emb = r.get("utt_embedding", r.get("spk_embedding"))
        feat = r.get("speech_feat")
        if feat is None and component == "flow":
            feat = _mel_from_bytes(r["audio_data"], mc, who)
        out.append(Utterance(
            utt=str(r["utt"]), text=str(r.get("text") or ""), speech_token=_ints(r["speech_token"], "speech_token", who),
            embedding=None if emb is None else np.asarray(emb, np.float32),
            speech_feat=None if feat is None else np.asarray(feat, np.float32).reshape(-1, 80),
            instruct=r.get("instruct"),
            text_token=None if r.get("text_token") is None else _ints(r["text_token"], "text_token", who)))
    return out


def _ints(v, name, who):
    a = np.asarray(v)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise TrainDataError(f"{who}: {name} must be a list of integer ids")
    return a.astype(np.int32)


def _mel_from_bytes(data, mc, who):
    import soundfile as sf

    from cosyjax.frontend.audio import load_wav
    from cosyjax.frontend.features import MelConfig, prompt_mel

    if not data:
        raise TrainDataError(f"{who}: audio_data is empty")
    try:
        samples, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except RuntimeError as e:
        raise TrainDataError(f"{who}: audio_data cannot be decoded ({e})") from e
    mel_cfg = MelConfig.from_model_config(mc)
    wav = load_wav((samples.mean(axis=1), sr), mel_cfg.sampling_rate)
    return prompt_mel(wav, mel_cfg)[0]


def _read_manifest(path, component, mc, frontend) -> list[Utterance]:
    out = []
    for i, line in enumerate(_lines(path)):
        who = f"{path} line {i + 1}"
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainDataError(f"{who}: not JSON ({e})") from e
        missing = [k for k in ("wav", "text") if k not in r]
        if missing:
            raise TrainDataError(f"{who}: missing field(s) {', '.join(missing)}")
        wav = r["wav"] if os.path.isabs(r["wav"]) else os.path.join(os.path.dirname(os.path.abspath(path)), r["wav"])
        if not os.path.isfile(wav):
            raise TrainDataError(f"{who}: wav not found: {wav}")
        fe = frontend
        tokens = r.get("speech_token")
        if tokens is None:
            if fe is None or not _has_onnx(mc, "speech_tokenizer"):
                raise TrainDataError(f"{who}: no speech_token, and {mc.model_dir} has no speech tokenizer ONNX to "
                                     "extract them (add speech_token to the manifest)")
            tokens = fe.extract_speech_token(wav, what="training utterance")[0][0]
        emb, feat = r.get("embedding"), None
        if component == "flow":
            if fe is None:
                raise TrainDataError(f"{who}: extracting the mel needs the frontend")
            feat = fe.extract_speech_feat(wav)[0][0]
            if emb is None:
                if not _has_onnx(mc, "campplus"):
                    raise TrainDataError(f"{who}: no embedding, and {mc.model_dir} has no campplus.onnx to extract it")
                emb = fe.extract_spk_embedding(wav)[0]
        out.append(Utterance(utt=str(r.get("utt", f"line{i + 1}")), text=str(r["text"]),
                             speech_token=_ints(tokens, "speech_token", who),
                             embedding=None if emb is None else np.asarray(emb, np.float32).reshape(-1),
                             speech_feat=feat, instruct=r.get("instruct"),
                             text_token=None if r.get("text_token") is None else _ints(r["text_token"], "text_token", who)))
    return out


def _has_onnx(mc, stem):
    return any(f.startswith(stem) and f.endswith(".onnx") for f in os.listdir(mc.model_dir))


def _validate(utts, component, mc, path, frontend):
    from convert.registry import component_module

    cfg = component_module(component).config_from(mc)
    n_ids = cfg.speech_token_size if component == "llm" else cfg.vocab_size
    ratio = 2 if component == "llm" else cfg.token_mel_ratio
    tok = None
    for i, u in enumerate(utts):
        who = f"{path}: utterance {i} ({u.utt})"
        if u.speech_token.size == 0:
            raise TrainDataError(f"{who}: speech_token is empty")
        bad = u.speech_token[(u.speech_token < 0) | (u.speech_token >= n_ids)]
        if bad.size:
            raise TrainDataError(f"{who}: speech_token ids {bad[:5].tolist()} out of range [0, {n_ids})")
        if component == "flow":
            if u.embedding is None or u.embedding.shape != (cfg.spk_embed_dim,):
                got = None if u.embedding is None else u.embedding.shape
                raise TrainDataError(f"{who}: embedding must have {cfg.spk_embed_dim} values, got {got}")
            n, f = len(u.speech_token), u.speech_feat.shape[0]
            # upstream pads the audio to whole tokens, so frames = ratio x tokens up to rounding
            if abs(f - ratio * n) > 2 * ratio:
                raise TrainDataError(f"{who}: {f} mel frames do not match {n} speech tokens "
                                     f"(token_mel_ratio {ratio}: expected about {ratio * n})")
            n = min(n, f // ratio)
            u.speech_token, u.speech_feat = u.speech_token[:n], u.speech_feat[:ratio * n]
        else:
            if u.text_token is None:
                if tok is None:
                    tok = _tokenizer(mc, frontend, who)
                if not u.text:
                    raise TrainDataError(f"{who}: text is empty")
                u.text_token = np.asarray(tok.encode(u.text), np.int32)
            if mc.version == "cosyvoice3" and u.instruct_token is None:
                if tok is None:
                    tok = _tokenizer(mc, frontend, who)
                # CosyVoice3LM.forward needs an instruct ending in <|endofprompt|> (151646)
                u.instruct_token = np.asarray(tok.encode((u.instruct or "") + "<|endofprompt|>"), np.int32)
            bad = u.text_token[(u.text_token < 0) | (u.text_token >= cfg.vocab_size)]
            if bad.size or u.text_token.size == 0:
                raise TrainDataError(f"{who}: text_token ids {bad[:5].tolist()} out of range [0, {cfg.vocab_size}) "
                                     "or empty")


def _tokenizer(mc, frontend, who):
    if frontend is not None:
        return frontend.tokenizer
    from cosyjax.frontend.tokenizer import TextTokenizer

    try:
        return TextTokenizer.from_model_dir(mc.model_dir)
    except (OSError, ValueError) as e:
        raise TrainDataError(f"{who}: text needs the folder's tokenizer ({e}); or give text_token") from e


def bucket_length(n: int, quantum: int) -> int:
    """Round up to a multiple of `quantum` doubling with size (quantum, 2q, 4q, ... then steps of 4q)."""
    q = quantum
    while n > 4 * q and q < 4 * quantum * 8:
        q *= 2
    return int(math.ceil(max(n, 1) / q) * q)


class Batcher:
    """step -> (batch of numpy arrays, streaming flag); deterministic in (seed, step).

    Epoch e visits the utterances in `default_rng([seed, e]).permutation`; batch s takes positions
    s*B .. s*B+B-1 of the concatenated epochs. LLM rows take upstream's per-row bistream draw and the
    flow its streaming choice from `default_rng([seed, step, 1])` (or a fixed `streaming`: one compiled
    mask variant instead of two).
    """

    def __init__(self, utts, task, batch_size: int, seed: int = 0, quantum: int = 16, streaming: bool | None = None):
        if not utts:
            raise TrainDataError("no utterances to batch")
        self.utts, self.task, self.B, self.seed, self.quantum = utts, task, int(batch_size), int(seed), quantum
        self.streaming = streaming  # None: upstream's per-step random choice; True/False: always that
        self._orders: dict[int, np.ndarray] = {}

    def _index(self, i):
        e, j = divmod(i, len(self.utts))
        if e not in self._orders:
            self._orders = {e: np.random.default_rng([self.seed, e]).permutation(len(self.utts))}
        return int(self._orders[e][j])

    def rows(self, step: int) -> list[Utterance]:
        return [self.utts[self._index(step * self.B + b)] for b in range(self.B)]

    def __call__(self, step: int):
        rows = self.rows(step)
        rng = np.random.default_rng([self.seed, step, 1])
        if self.task.component == "llm":
            return self._llm(rows, rng), False
        streaming = bool(rng.random() < 0.5)
        return self._flow(rows), streaming if self.streaming is None else bool(self.streaming)

    def _llm(self, rows, rng):
        from cosyjax.train.llm_loss import prepare_lm_input_target, row_draws

        cfg = self.task.model_cfg
        text, tl = _pad([r.text_token for r in rows], np.int32)
        sp, sl = _pad([r.speech_token for r in rows], np.int32)
        ins, il = (None, None)
        if cfg.version == "cosyvoice3":
            ins, il = _pad([r.instruct_token for r in rows], np.int32)
        n_max = int(max(1 + (0 if il is None else il[b]) + tl[b] + 1 + sl[b] for b in range(len(rows))))
        lay = prepare_lm_input_target(cfg, text, tl, sp, sl, row_draws(rng, len(rows)), ins, il,
                                      length=bucket_length(n_max, self.quantum),
                                      row_names=[f"utterance {r.utt}" for r in rows])
        return {"ids": lay.ids, "kind": lay.kind, "target": lay.target, "length": lay.length}

    def _flow(self, rows):
        r = self.task.model_cfg.token_mel_ratio
        N = bucket_length(max(len(u.speech_token) for u in rows), self.quantum)
        tok, tl = _pad([u.speech_token for u in rows], np.int32, N)
        feat, fl = _pad([u.speech_feat for u in rows], np.float32, r * N)
        return {"speech_token": tok, "speech_token_len": tl, "speech_feat": feat, "speech_feat_len": fl,
                "embedding": np.stack([u.embedding for u in rows]).astype(np.float32)}


def _pad(arrays, dtype, length=None):
    n = np.array([a.shape[0] for a in arrays], np.int32)
    L = int(n.max()) if length is None else length
    out = np.zeros((len(arrays), L) + arrays[0].shape[1:], dtype)
    for b, a in enumerate(arrays):
        out[b, :len(a)] = a
    return out, n
