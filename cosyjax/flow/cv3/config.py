"""`FlowCV3Config`: sizes of upstream's `CausalMaskedDiffWithDiT` read from `cosyvoice3.yaml`."""
from __future__ import annotations

import dataclasses

from cosyjax.config import ModelConfig, ModelFolderError

__all__ = ["FlowCV3Config"]


@dataclasses.dataclass(frozen=True)
class FlowCV3Config:
    """CosyVoice3 flow: token embedding -> PreLookaheadLayer -> x2 repeat -> CFM with a DiT estimator."""

    version: str = "cosyvoice3"
    vocab_size: int = 6561
    input_size: int = 80  # token embedding width (= mel bins; CV3 has no encoder)
    output_size: int = 80  # mel bins
    spk_embed_dim: int = 192
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    pre_lookahead_channels: int = 1024
    # DiT estimator (`cosyvoice/flow/DiT/dit.py:DiT`)
    dim: int = 1024
    depth: int = 22
    heads: int = 16
    dim_head: int = 64
    ff_mult: int = 2
    mel_dim: int = 80
    mu_dim: int = 80
    spk_dim: int = 80
    static_chunk_size: int = 50  # mel frames per streaming chunk
    time_freq_dim: int = 256  # `TimestepEmbedding(freq_embed_dim=256)` default
    conv_pos_kernel: int = 31  # `CausalConvPositionEmbedding` defaults
    conv_pos_groups: int = 16
    rope_base: float = 10000.0  # x-transformers `RotaryEmbedding` default
    # CFM (`CausalConditionalCFM`)
    inference_cfg_rate: float = 0.7
    t_scheduler: str = "cosine"
    n_timesteps: int = 10  # hard-coded in `CausalMaskedDiffWithDiT.inference`
    noise_frames: int = 15000  # `rand_noise` buffer length (300 s)

    @property
    def inner_dim(self) -> int:
        return self.heads * self.dim_head

    @classmethod
    def from_model_config(cls, cfg: ModelConfig) -> "FlowCV3Config":
        if cfg.version != "cosyvoice3":
            raise ModelFolderError(f"FlowCV3Config needs a cosyvoice3 model folder, got {cfg.version}")
        flow = cfg.section("flow")
        pre = flow["pre_lookahead_layer"]
        dec = flow["decoder"]
        est = dec["estimator"]
        cfm = dec["cfm_params"]
        cfm = cfm.get("content", cfm) if hasattr(cfm, "get") else cfm
        if est.class_name != "DiT":
            raise ModelFolderError(f"cosyvoice3 flow estimator is {est.class_name}, expected DiT")
        if est.get("long_skip_connection", False):
            raise ModelFolderError("DiT long_skip_connection=True is not supported (no released model uses it)")
        if pre["in_channels"] != flow["input_size"]:
            raise ModelFolderError(f"pre_lookahead_layer in_channels {pre['in_channels']} != flow input_size "
                                   f"{flow['input_size']}")
        if int(pre["pre_lookahead_len"]) != int(flow.get("pre_lookahead_len", 3)):
            raise ModelFolderError("pre_lookahead_layer and flow disagree on pre_lookahead_len")
        if cfm.get("solver", "euler") != "euler":
            raise ModelFolderError(f"CFM solver {cfm.get('solver')!r} unsupported (upstream only has 'euler')")
        mel_dim = int(est.get("mel_dim", 80))
        return cls(
            vocab_size=int(flow["vocab_size"]),
            input_size=int(flow["input_size"]),
            output_size=int(flow["output_size"]),
            spk_embed_dim=int(flow["spk_embed_dim"]),
            token_mel_ratio=int(flow.get("token_mel_ratio", cfg.token_mel_ratio)),
            pre_lookahead_len=int(pre["pre_lookahead_len"]),
            pre_lookahead_channels=int(pre["channels"]),
            dim=int(est["dim"]),
            depth=int(est.get("depth", 8)),
            heads=int(est.get("heads", 8)),
            dim_head=int(est.get("dim_head", 64)),
            ff_mult=int(est.get("ff_mult", 4)),
            mel_dim=mel_dim,
            mu_dim=int(est.get("mu_dim") or mel_dim),
            spk_dim=int(est.get("spk_dim") or 0),
            static_chunk_size=int(est.get("static_chunk_size", 50)),
            inference_cfg_rate=float(cfm.get("inference_cfg_rate", 0.7)),
            t_scheduler=str(cfm.get("t_scheduler", "cosine")),
        )
