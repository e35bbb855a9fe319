"""A tiny, self-contained demo model folder: tiny random weights + a tiny byte-level BPE tokenizer.

The golden model folders (`tests/golden/<v>/modeldir`) hold tiny random weights but no tokenizer files
and no ONNX models. `build_demo_model_dir` copies one and writes into `CosyVoice-BlankEN/` a small
Qwen2-format tokenizer (`vocab.json`, `merges.txt`, `tokenizer_config.json`) whose ids fit the tiny
model's text vocabulary:

* CosyVoice2 tiny (2048 text rows): 256 byte symbols + a few hundred merges; the CosyVoice specials
  follow right after (`<|endoftext|>`, `<|im_start|>`, ..., `[mn]`), all below 2048.
* CosyVoice3 (151936 text rows): the base vocabulary is padded to the real Qwen2 size (151643
  entries) so that the CosyVoice3 specials land on their real ids (`<|endofprompt|>` = 151646).

Because there are no campplus / speech-tokenizer ONNX models, the folder also gets `demo_prompt.npz`
(prompt speech tokens, prompt mel, speaker embedding from the golden e2e inputs) which the API and
the CLI accept in place of a prompt wav (`prompt_wav='…/demo_prompt.npz'`, `--prompt-wav`).
Synthesised audio is noise-like: the weights are random.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import numpy as np

__all__ = ["build_demo_model_dir", "golden_root", "DEMO_PROMPT", "DEMO_PROMPT_TEXT"]

DEMO_PROMPT = "demo_prompt.npz"
DEMO_PROMPT_TEXT = "Hello, this is the prompt voice."
_TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. Hello world, this is a tiny text to speech demo. "
    "CosyVoice converts text into speech tokens, the flow turns tokens into mel frames and the vocoder "
    "turns mel frames into a waveform. She sells sea shells by the sea shore. Streaming synthesis "
    "starts speaking before the whole sentence is generated. 你好，世界。今天天气很好。我们一起说话。"
)
_MARKER = ".cosyjax_demo"


def golden_root() -> str:
    """Where the tiny golden model folders live (`$COSYJAX_GOLDEN` or the repository's tests/golden)."""
    env = os.environ.get("COSYJAX_GOLDEN")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(os.path.dirname(here), "tests", "golden")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / Qwen2 byte -> printable unicode symbol table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _train_merges(n_merges: int) -> list[tuple[str, str]]:
    """Greedy byte-pair merges learned from a short built-in text (deterministic)."""
    from tokenizers import Regex, pre_tokenizers

    from cosyjax.frontend.tokenizer import QWEN2_SPLIT_PATTERN

    b2u = _bytes_to_unicode()
    words: dict[tuple[str, ...], int] = {}
    split = pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated")  # Qwen2's pre-tokenizer split
    for piece, _ in split.pre_tokenize_str(_TRAIN_TEXT):
        w = tuple(b2u[b] for b in piece.encode("utf-8"))
        words[w] = words.get(w, 0) + 1
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        counts: dict[tuple[str, str], int] = {}
        for w, c in words.items():
            for a, b in zip(w[:-1], w[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + c
        if not counts:
            break
        best = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
        if counts[best] < 2:
            break
        merges.append(best)
        new_words: dict[tuple[str, ...], int] = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    return merges


def write_demo_tokenizer(blank_en_dir: str, version: str, text_vocab_size: int) -> None:
    """Write vocab.json / merges.txt / tokenizer_config.json whose ids stay below `text_vocab_size`."""
    from cosyjax.frontend.tokenizer import QWEN2_BASE_VOCAB_SIZE, special_tokens_for

    n_specials = 1 + len(special_tokens_for(version))  # <|endoftext|> + CosyVoice's list
    merges = _train_merges(200)
    b2u = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for b in range(256):
        vocab[b2u[b]] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    if version == "cosyvoice3":
        if text_vocab_size < QWEN2_BASE_VOCAB_SIZE + n_specials:
            raise ValueError(f"CosyVoice3 text vocabulary {text_vocab_size} is smaller than the Qwen2 ids it needs")
        # pad to the real base size so <|endofprompt|> gets 151646 (hard-coded in the CosyVoice3 LLM)
        i = 0
        while len(vocab) < QWEN2_BASE_VOCAB_SIZE:
            vocab[f"<unused_{i}>"] = len(vocab)
            i += 1
    elif len(vocab) + n_specials > text_vocab_size:
        raise ValueError(f"text vocabulary {text_vocab_size} too small for the demo tokenizer")
    os.makedirs(blank_en_dir, exist_ok=True)
    with open(os.path.join(blank_en_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(blank_en_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    config = {
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "tokenizer_class": "Qwen2Tokenizer",
        "errors": "replace",
    }
    with open(os.path.join(blank_en_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)


def _write_demo_prompt(model_dir: str, version: str, source_root: str) -> None:
    """Prompt speech tokens / mel / embedding (what campplus + the speech tokenizer would give)."""
    inputs = os.path.join(source_root, version, "e2e", "inputs.npz")
    if os.path.isfile(inputs):
        with np.load(inputs) as z:
            tokens = z["flow_prompt_speech_token"][0].astype(np.int32)
            feat = z["prompt_speech_feat"][0].astype(np.float32)
            emb = z["flow_embedding"][0].astype(np.float32)
    else:  # any fixture set: a deterministic random prompt
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 6561, 16).astype(np.int32)
        feat = (rng.standard_normal((32, 80)) * 2 - 5).astype(np.float32)
        emb = rng.standard_normal(192).astype(np.float32)
    np.savez(os.path.join(model_dir, DEMO_PROMPT), speech_token=tokens, speech_feat=feat, embedding=emb,
             prompt_text=np.array(DEMO_PROMPT_TEXT))


def build_demo_model_dir(version: str = "cosyvoice3", out_dir: Optional[str] = None,
                         source_root: Optional[str] = None, overwrite: bool = False) -> str:
    """Copy the tiny golden model folder of `version` to `out_dir` and add a demo tokenizer + prompt.

    Returns the folder path. Default `out_dir`: `<cache root>/demo/<version>` (`$COSYJAX_CACHE` or `~/.cache/cosyjax`). An existing demo
    folder is reused unless `overwrite`.
    """
    if version not in ("cosyvoice2", "cosyvoice3"):
        raise ValueError(f"version must be 'cosyvoice2' or 'cosyvoice3', got {version!r}")
    source_root = source_root or golden_root()
    src = os.path.join(source_root, version, "modeldir")
    if not os.path.isdir(src):
        raise FileNotFoundError(f"tiny model folder not found: {src} (set COSYJAX_GOLDEN to the fixture root)")
    from cosyjax.model_cache import cache_root

    out_dir = os.path.abspath(out_dir or os.path.join(cache_root(), "demo", version))
    marker = os.path.join(out_dir, _MARKER)
    if os.path.isfile(marker) and not overwrite:
        return out_dir
    if os.path.exists(out_dir) and os.listdir(out_dir) and not os.path.isfile(marker):
        raise FileExistsError(f"{out_dir} exists and is not a cosyjax demo folder")
    # built in a scratch folder beside it and renamed into place: another process (a second test worker,
    # a second server) never sees a half-written folder, and when two build at once the first rename wins
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the folder it becomes is an ordinary one
    try:
        for name in os.listdir(src):
            s, d = os.path.join(src, name), os.path.join(tmp, name)
            if os.path.isdir(s):
                shutil.copytree(s, d)
            else:
                shutil.copy2(s, d)
        from cosyjax.config import QwenConfig

        qwen = QwenConfig.from_json(os.path.join(tmp, "CosyVoice-BlankEN", "config.json"))
        write_demo_tokenizer(os.path.join(tmp, "CosyVoice-BlankEN"), version, qwen.vocab_size)
        _write_demo_prompt(tmp, version, source_root)
        with open(os.path.join(tmp, _MARKER), "w") as f:
            f.write(version + "\n")
        if overwrite and os.path.isfile(marker):
            shutil.rmtree(out_dir)
        try:
            os.rename(tmp, out_dir)  # onto a missing or empty folder
        except OSError:
            if not os.path.isfile(marker):  # not another builder's finished folder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
