"""Model-folder discovery and the top-level configuration.

A model folder is what users download (`cosyvoice2.yaml` | `cosyvoice3.yaml`, `llm.pt`, `flow.pt`,
`hift.pt`, `CosyVoice-BlankEN/config.json`, ...). `ModelConfig.from_dir` reads it without
importing upstream code; component configs (`HiFTConfig`, `FlowConfig`, `LLMConfig`) are frozen
dataclasses built from `ModelConfig.yaml` by their own packages.
"""
from __future__ import annotations
from cosyjax.errors import CosyJaxError

import dataclasses
import json
import os
from typing import Any

from cosyjax.io.hyperyaml import YamlCall, load_hyperyaml

__all__ = ["ModelConfig", "ModelFolderError", "QwenConfig", "VERSIONS", "detect_version"]

# Upstream AutoModel checks the yamls in this order (cosyvoice/cli/cosyvoice.py).
VERSIONS = ("cosyvoice", "cosyvoice2", "cosyvoice3")

# (llm, flow, hift) class triples asserted by upstream `get_model_type`.
_CLASS_TRIPLES = {
    "cosyvoice2": ("Qwen2LM", "CausalMaskedDiffWithXvec", "HiFTGenerator"),
    "cosyvoice3": ("CosyVoice3LM", "CausalMaskedDiffWithDiT", "CausalHiFTGenerator"),
}


class ModelFolderError(CosyJaxError):
    """A model folder that is missing files or does not describe a supported model."""


def detect_version(model_dir: str | os.PathLike) -> str:
    """Return 'cosyvoice2' or 'cosyvoice3' from the yaml present in `model_dir`."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise ModelFolderError(f"model folder not found: {model_dir}")
    for v in VERSIONS:
        if os.path.isfile(os.path.join(model_dir, f"{v}.yaml")):
            if v == "cosyvoice":
                raise ModelFolderError(
                    f"{model_dir}: cosyvoice.yaml (CosyVoice-300M) is not supported yet; "
                    "cosyjax supports CosyVoice2 and CosyVoice3 folders")
            return v
    raise ModelFolderError(
        f"{model_dir}: no cosyvoice2.yaml or cosyvoice3.yaml found (is this a CosyVoice model folder?)")


@dataclasses.dataclass(frozen=True)
class QwenConfig:
    """Qwen2 backbone sizes from `CosyVoice-BlankEN/config.json`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "QwenConfig":
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except OSError as e:
            raise ModelFolderError(f"cannot read Qwen2 config {path}: {e}") from e
        except json.JSONDecodeError as e:
            raise ModelFolderError(f"Qwen2 config {path} is not valid JSON: {e}") from e
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names[:9] if n not in d]
        if missing:
            raise ModelFolderError(f"Qwen2 config {path} lacks {', '.join(missing)}")
        if d.get("hidden_act", "silu") != "silu":
            raise ModelFolderError(f"Qwen2 config {path}: hidden_act {d['hidden_act']!r} unsupported")
        return cls(**{n: d[n] for n in names if n in d})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything read from a model folder: version, parsed yaml, file paths, Qwen2 sizes."""

    model_dir: str
    version: str  # 'cosyvoice2' | 'cosyvoice3'
    yaml: dict = dataclasses.field(repr=False, compare=False, hash=False)
    qwen: QwenConfig | None = None
    sample_rate: int = 24000
    token_frame_rate: int = 25
    token_mel_ratio: int = 2
    chunk_size: int = 25

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, need_qwen: bool = True) -> "ModelConfig":
        model_dir = os.path.abspath(os.fspath(model_dir))
        version = detect_version(model_dir)
        blank_en = os.path.join(model_dir, "CosyVoice-BlankEN")
        y = load_hyperyaml(os.path.join(model_dir, f"{version}.yaml"),
                           overrides={"qwen_pretrain_path": blank_en})
        for section in ("llm", "flow", "hift"):
            if not isinstance(y.get(section), YamlCall):
                raise ModelFolderError(f"{model_dir}/{version}.yaml has no '{section}: !new:...' section")
        triple = (y["llm"].class_name, y["flow"].class_name, y["hift"].class_name)
        if triple != _CLASS_TRIPLES[version]:
            raise ModelFolderError(
                f"{model_dir}/{version}.yaml builds {triple}, expected {_CLASS_TRIPLES[version]} for {version}")
        qwen = None
        qpath = os.path.join(blank_en, "config.json")
        if os.path.isfile(qpath):
            qwen = QwenConfig.from_json(qpath)
        elif need_qwen:
            raise ModelFolderError(f"{model_dir}: missing CosyVoice-BlankEN/config.json (Qwen2 sizes)")
        return cls(
            model_dir=model_dir, version=version, yaml=y, qwen=qwen,
            sample_rate=int(y.get("sample_rate", 24000)),
            token_frame_rate=int(y.get("token_frame_rate", 25)),
            token_mel_ratio=int(y.get("token_mel_ratio", 2)),
            chunk_size=int(y.get("chunk_size", 25)),
        )

    def path(self, name: str, required: bool = True) -> str:
        """Absolute path of a file in the model folder; a clear error when it is missing."""
        p = os.path.join(self.model_dir, name)
        if required and not os.path.exists(p):
            raise ModelFolderError(f"{self.model_dir}: missing {name}")
        return p

    def section(self, name: str) -> YamlCall:
        return self.yaml[name]

    def get(self, key: str, default: Any = None) -> Any:
        return self.yaml.get(key, default)
