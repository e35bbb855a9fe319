"""`Numerics`: the one way numerics reach every component (compute dtype, attention path, matmul precision).

A frozen (hashable) dataclass, passed as a static argument. The policy (issue 11): LLM and flow matmuls
in `dtype` (float32 on CPU for parity, bfloat16 on GPU) with float32 norms, softmax and ODE state;
HiFT convolutions in float32 at `hift_precision` ('highest' unless a faster setting is shown to keep the
waveform within 1e-3 rel-L2); the CosyVoice3 f0 predictor always float64 (upstream precision).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from cosyjax.errors import CosyJaxError

__all__ = ["Numerics", "DTYPES"]

DTYPES = ("float32", "bfloat16")
PRECISIONS = (None, "default", "high", "highest")


@dataclasses.dataclass(frozen=True)
class Numerics:
    dtype: str = "float32"  # LLM + flow matmul/conv compute dtype (also the LLM KV cache)
    attention: str = "auto"  # cosyjax.nn.attention implementation: auto | xla | cudnn | pallas[_interpret][@gpu]
    hift_precision: Optional[str] = "highest"  # HiFT generator conv precision (None = jax's default)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise CosyJaxError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        from cosyjax.nn.attention import parse_implementation

        parse_implementation(self.attention)  # raises CosyJaxError naming the accepted values
        if self.hift_precision not in PRECISIONS:
            raise CosyJaxError(f"hift_precision must be one of {PRECISIONS}, got {self.hift_precision!r}")
