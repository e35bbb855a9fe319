"""`LLMConfig`: everything the speech-token LM needs, read from a model folder.

Qwen2 sizes come from `CosyVoice-BlankEN/config.json` (`ModelConfig.qwen`), the head/embedding
layout from the yaml's `llm:` section, and the version is an explicit field (no class-name
branching). The config is frozen and hashable: it is passed to `jax.jit` as a static argument.

Id layout (SPEC §3.2/§3.3), with `S = speech_token_size` (6561):
* cosyvoice2 (`Qwen2LM`): speech vocab S+3, sos/task_id are rows 0/1 of `llm_embedding`,
  eos S, fill S+2, stop set {S, S+1, S+2}; `llm_decoder` has a bias.
* cosyvoice3 (`CosyVoice3LM`): speech vocab S+200, sos/eos/task_id/fill = S/S+1/S+2/S+3 are rows
  of `speech_embedding`, stop set S..S+199; `llm_decoder` has no bias; the text must contain
  `<|endofprompt|>` (151646).
"""
from __future__ import annotations
from cosyjax.errors import CosyJaxError

import dataclasses
from typing import Literal

__all__ = ["LLMConfig", "LLMConfigError", "MIN_LEN_MASK_MODES", "CV2", "CV3"]

CV2 = "cosyvoice2"
CV3 = "cosyvoice3"

MIN_LEN_MASK_MODES = ("upstream", "stop_set")
"""How stop ids are suppressed while fewer than `min_len` tokens exist.

* 'upstream' (default, parity): mask only index `speech_token_size` (6561) as
  `TransformerLM.sampling_ids(ignore_eos=True)` does (cosyvoice/llm/llm.py). For cosyvoice3 that
  id is *sos*, not eos, so 6562..6760 can still end decoding early (SPEC §3.8).
* 'stop_set': mask every stop id (the evident intent; in bistream the fill id stays allowed).
"""

_ENDOFPROMPT = 151646  # <|endofprompt|> in the CosyVoice3 tokenizer (upstream hard-codes it too)
_CV3_SILENT_TOKENS = (1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323)  # cli/model.py CosyVoice3Model


class LLMConfigError(CosyJaxError):
    """A model folder whose llm section cannot be used."""


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Sizes, special ids and sampling parameters of `Qwen2LM` / `CosyVoice3LM`."""

    version: str  # 'cosyvoice2' | 'cosyvoice3'
    # Qwen2 backbone
    vocab_size: int  # text vocabulary (rows of embed_tokens)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    # speech head / embeddings
    speech_token_size: int  # 6561: number of real speech tokens
    num_special: int  # 3 (cv2) | 200 (cv3)
    llm_input_size: int
    llm_output_size: int
    # sampling (yaml `sampling: !name:...ras_sampling`)
    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1
    # lengths (Qwen2LM.inference defaults)
    min_token_text_ratio: float = 2.0
    max_token_text_ratio: float = 20.0
    mix_ratio: tuple[int, int] = (5, 15)
    # behaviour flags
    min_len_mask: Literal["upstream", "stop_set"] = "upstream"
    silent_tokens: tuple[int, ...] = ()
    max_silent_tokens: int = 5
    # numerics
    dtype: str = "float32"  # compute dtype of the backbone (and of the KV cache unless kv_cache_dtype)
    attention_impl: str = "auto"
    kv_cache_dtype: str | None = None  # KV cache storage dtype, e.g. 'bfloat16' to halve its memory traffic
    fused_qkv: bool = False  # one q|k|v matmul: params from `speech_lm.fuse_qkv` (the converter tree is unfused)

    # ---- derived ids ------------------------------------------------------------------------
    @property
    def speech_vocab_size(self) -> int:
        return self.speech_token_size + self.num_special

    @property
    def has_llm_embedding(self) -> bool:
        """cosyvoice2 keeps sos/task_id in a separate 2-row `llm_embedding`."""
        return self.version == CV2

    @property
    def decoder_bias(self) -> bool:
        return self.version == CV2

    @property
    def sos_id(self) -> int:
        """Row of `llm_embedding` (cv2) or `speech_embedding` (cv3)."""
        return 0 if self.version == CV2 else self.speech_token_size

    @property
    def task_id(self) -> int:
        return 1 if self.version == CV2 else self.speech_token_size + 2

    @property
    def eos_id(self) -> int:
        return self.speech_token_size if self.version == CV2 else self.speech_token_size + 1

    @property
    def fill_id(self) -> int:
        return self.speech_token_size + (2 if self.version == CV2 else 3)

    @property
    def stop_ids(self) -> tuple[int, int]:
        """Half-open range [lo, hi) of ids that end decoding."""
        return self.speech_token_size, self.speech_token_size + self.num_special

    @property
    def endofprompt_id(self) -> int | None:
        return _ENDOFPROMPT if self.version == CV3 else None

    @property
    def ras_threshold(self) -> float:
        """Repetition count that triggers the RAS fallback (`win_size * tau_r`, a Python float as upstream)."""
        return self.win_size * self.tau_r

    def replace(self, **changes) -> "LLMConfig":
        return dataclasses.replace(self, **changes)

    def __post_init__(self):
        if self.version not in (CV2, CV3):
            raise LLMConfigError(f"unsupported LLM version {self.version!r}")
        if self.min_len_mask not in MIN_LEN_MASK_MODES:
            raise LLMConfigError(f"min_len_mask must be one of {MIN_LEN_MASK_MODES}, got {self.min_len_mask!r}")
        if self.num_heads % self.num_kv_heads:
            raise LLMConfigError(f"{self.num_heads} attention heads not divisible by {self.num_kv_heads} KV heads")
        if self.llm_input_size != self.hidden_size or self.llm_output_size != self.hidden_size:
            raise LLMConfigError(
                f"llm_input_size {self.llm_input_size} / llm_output_size {self.llm_output_size} must equal the "
                f"Qwen2 hidden_size {self.hidden_size} (CosyVoice feeds embeddings straight into Qwen2)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise LLMConfigError(f"unsupported LLM dtype {self.dtype!r}")
        if self.kv_cache_dtype not in (None, "float32", "bfloat16", "float16"):
            raise LLMConfigError(f"unsupported LLM kv_cache_dtype {self.kv_cache_dtype!r}")

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_model_config(cls, cfg, **overrides) -> "LLMConfig":
        """Build from a `cosyjax.config.ModelConfig` (yaml `llm:` section + BlankEN config.json)."""
        if cfg.qwen is None:
            raise LLMConfigError(f"{cfg.model_dir}: Qwen2 config (CosyVoice-BlankEN/config.json) is required")
        y = cfg.yaml["llm"]
        q = cfg.qwen
        version = cfg.version
        expected = {CV2: "Qwen2LM", CV3: "CosyVoice3LM"}[version]
        if y.class_name != expected:
            raise LLMConfigError(f"{cfg.model_dir}: llm is {y.class_name}, expected {expected} for {version}")
        sampling = y.get("sampling")
        skw = {}
        if sampling is not None:
            name = getattr(sampling, "class_name", "")
            if name != "ras_sampling":
                raise LLMConfigError(f"{cfg.model_dir}: llm sampling {name!r} unsupported (only ras_sampling)")
            skw = dict(sampling.kwargs)
        if q.hidden_size % q.num_attention_heads:
            raise LLMConfigError(f"Qwen2 hidden_size {q.hidden_size} not divisible by {q.num_attention_heads} heads")
        mix = tuple(int(v) for v in y.get("mix_ratio", (5, 15)))
        kw = dict(
            version=version,
            vocab_size=int(q.vocab_size), hidden_size=int(q.hidden_size),
            intermediate_size=int(q.intermediate_size), num_layers=int(q.num_hidden_layers),
            num_heads=int(q.num_attention_heads), num_kv_heads=int(q.num_key_value_heads),
            head_dim=int(q.hidden_size // q.num_attention_heads), rms_norm_eps=float(q.rms_norm_eps),
            rope_theta=float(q.rope_theta), max_position_embeddings=int(q.max_position_embeddings),
            speech_token_size=int(y["speech_token_size"]), num_special=3 if version == CV2 else 200,
            llm_input_size=int(y["llm_input_size"]), llm_output_size=int(y["llm_output_size"]),
            top_p=float(skw.get("top_p", 0.8)), top_k=int(skw.get("top_k", 25)),
            win_size=int(skw.get("win_size", 10)), tau_r=float(skw.get("tau_r", 0.1)),
            mix_ratio=(mix[0], mix[1]),
            silent_tokens=_CV3_SILENT_TOKENS if version == CV3 else (),
        )
        kw.update(overrides)
        return cls(**kw)
