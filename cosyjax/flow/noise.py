"""Torch-free regeneration of torch's CPU ``randn`` (float32), for the flow's fixed seed-0 noise.

Upstream's flow-matching decoder (``cosyvoice/flow/flow_matching.py``, ``CausalConditionalCFM.__init__``)
seeds with ``set_all_random_seed(0)`` (``torch.manual_seed(0)``), draws
``rand_noise = torch.randn([1, 80, 50 * 300])`` once and uses ``rand_noise[:, :, :T] * temperature``
as the initial ODE state. The buffer is in no checkpoint, and shipping it costs 4.8 MB, so we
regenerate it bit-exactly with numpy:

1. torch's CPU generator is mt19937 seeded with ``init_genrand(seed & 0xffffffff)``: the same
   engine and seeding as numpy's legacy ``RandomState(int)``, so ``np.random.MT19937`` with legacy
   seeding yields identical raw 32-bit outputs.
2. Each float uniform takes the low 24 bits of one output: ``(x & (2**24 - 1)) * 2**-24``.
3. ``normal_kernel`` for a contiguous float32 tensor with ``numel >= 16`` (torch
   ``aten/src/ATen/native/cpu/DistributionTemplates.h``, ``normal_fill_AVX2``) fills all ``numel``
   uniforms, then applies Box-Muller per block of 16 (``u1 = 1 - d[0:8]``, ``u2 = d[8:16]``,
   ``d[0:8] = r cos(2 pi u2)``, ``d[8:16] = r sin(2 pi u2)``, ``r = sqrt(-2 log u1)``). A tail
   (``numel % 16 != 0``) draws 16 *fresh* uniforms into the last 16 slots and transforms them again.
   On x86 torch runs the AVX2 path, whose log/sincos are the Cephes-style float32 polynomials of
   ``avx_mathfun.h`` (``log256_ps``, ``sincos256_ps``), not libm, and torch's build contracts each
   ``mul`` feeding an ``add`` into one fused multiply-add. We evaluate those polynomials operation by
   operation in float32 numpy arithmetic, with the same FMAs (emulated with a single rounding), which
   reproduces torch 2.3.1's output bit for bit: the recorded seed-0 buffer, 1.2 M values, 0
   mismatches. (Without the FMAs ~1 % of values differ by up to 3 ulp.) torch builds without AVX2
   (e.g. non-x86) use libm in ``normal_fill_16`` and may differ from this in the last bits.

``numel < 16`` uses a different, stateful double-precision path in torch; it is not implemented.
"""
from __future__ import annotations
from cosyjax.errors import CosyJaxError

import functools
import math

import numpy as np

__all__ = ["torch_randn_cpu", "cfm_noise", "CFM_NOISE_FRAMES", "NoiseRequestError"]

# Upstream's buffer: torch.randn(1, 80, 15000) = 300 s of mel frames at 50 Hz.
CFM_NOISE_FRAMES = 15000
CFM_NOISE_MELS = 80
CFM_NOISE_SEED = 0


class NoiseRequestError(CosyJaxError):
    """A noise request that torch's buffer (or this reimplementation) cannot satisfy."""


_F = np.float32


def _raw_mt19937_uint32(seed: int, n: int) -> np.ndarray:
    """First ``n`` raw 32-bit outputs of mt19937 seeded like torch's CPU generator -> uint32 [n]."""
    key = [seed & 0xFFFFFFFF]  # init_genrand, as torch's at::mt19937 (and numpy's legacy seeding) does
    for i in range(1, 624):
        prev = key[-1]
        key.append((1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF)
    bitgen = np.random.MT19937()
    # pos = 624: the whole state is regenerated ("twisted") before the first output, as in torch
    bitgen.state = {"bit_generator": "MT19937", "state": {"key": np.array(key, dtype=np.uint32), "pos": 624}}
    return bitgen.random_raw(n).astype(np.uint32)


def _uniform24(raw: np.ndarray) -> np.ndarray:
    """torch ``uniform_real_distribution<float>(0, 1)``: low 24 bits * 2**-24 (exact) -> float32."""
    return ((raw & np.uint32((1 << 24) - 1)).astype(np.float64) * 2.0 ** -24).astype(_F)


# --- avx_mathfun.h log256_ps, evaluated in float32 -------------------------------------------------
_LOG_P = [_F(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                          1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                          3.3333331174e-1)]
_LOG_Q1 = _F(-2.12194440e-4)
_LOG_Q2 = _F(0.693359375)
_SQRTHF = _F(0.707106781186547524)


def _fma_f32(a, b, c) -> np.ndarray:
    """Single-rounded float32 ``a * b + c`` (like ``vfmadd``) -> float32.

    ``a * b`` is exact in float64; the float64 sum is made round-to-odd (TwoSum error term) so that
    the final rounding to float32 is correctly rounded, with no double-rounding error.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    p = a * b
    s = p + c
    t = s - p
    err = (p - (s - t)) + (c - t)
    inexact_even = (err != 0) & ((s.view(np.int64) & 1) == 0)
    s = np.where(inexact_even, np.nextafter(s, np.copysign(np.inf, err)), s)
    return s.astype(_F)


def _log_cephes_f32(x: np.ndarray) -> np.ndarray:
    """Natural log of positive normal float32 ``x``, as torch's AVX2 ``log256_ps`` -> float32.

    torch's build contracts every ``mul`` whose only use is an ``add`` into an FMA (the recorded buffer
    matches only with the polynomial and ``y * z`` products fused; ``e * q2`` and ``z * 0.5`` are exact
    products, so fusing them or not changes nothing).
    """
    bits = x.view(np.uint32)
    e = ((bits >> np.uint32(23)).astype(np.int32) - 127).astype(_F) + _F(1)
    # mantissa in [0.5, 1): keep the fraction bits, force the exponent of 0.5
    m = ((bits & np.uint32(~0x7F800000 & 0xFFFFFFFF)) | np.float32(0.5).view(np.uint32)).view(_F)
    small = m < _SQRTHF
    e = e - np.where(small, _F(1), _F(0))
    m = (m - _F(1)) + np.where(small, m, _F(0))
    z = m * m
    y = np.full_like(m, _LOG_P[0])
    for c in _LOG_P[1:]:
        y = _fma_f32(y, m, c)
    y = y * m
    y = _fma_f32(y, z, e * _LOG_Q1)
    y = _fma_f32(z, _F(-0.5), y)
    return _fma_f32(e, _LOG_Q2, m + y)


# --- avx_mathfun.h sincos256_ps, evaluated in float32 ----------------------------------------------
_FOPI = _F(1.27323954473516)
_DP = (_F(-0.78515625), _F(-2.4187564849853515625e-4), _F(-3.77489497744594108e-8))
_SINCOF = (_F(-1.9515295891e-4), _F(8.3321608736e-3), _F(-1.6666654611e-1))
_COSCOF = (_F(2.443315711809948e-005), _F(-1.388731625493765e-003), _F(4.166664568298827e-002))


def _sincos_cephes_f32(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sin x, cos x) for non-negative float32 ``x`` (< 8192), as torch's AVX2 ``sincos256_ps``."""
    j = (x * _FOPI).astype(np.int32)  # truncation, like cvttps
    j = (j + 1) & ~1
    y = j.astype(_F)
    sin_negate = (j & 4) != 0
    sin_from_cos_poly = (j & 2) != 0  # octants where sin comes from the cosine polynomial and vice versa
    cos_negate = ((j - 2) & 4) == 0
    # extended-precision range reduction x - y * pi/4 in three pieces; fused like torch's build (on the
    # recorded buffer fused and unfused agree bit for bit; the cos/sin polynomial FMAs are required)
    r = x
    for dp in _DP:
        r = _fma_f32(y, dp, r)
    z = r * r
    pc = _fma_f32(z, _COSCOF[0], _COSCOF[1])
    pc = _fma_f32(pc, z, _COSCOF[2])
    pc = pc * z
    pc = _fma_f32(pc, z, -(z * _F(0.5))) + _F(1)  # the first product (pc * z) is the fused one
    ps = _fma_f32(z, _SINCOF[0], _SINCOF[1])
    ps = _fma_f32(ps, z, _SINCOF[2])
    ps = ps * z
    ps = _fma_f32(ps, r, r)
    sin = np.where(sin_from_cos_poly, pc, ps)
    cos = np.where(sin_from_cos_poly, ps, pc)
    return np.where(sin_negate, -sin, sin), np.where(cos_negate, -cos, cos)


_TWO_PI = _F(2.0 * math.pi)  # torch: _mm256_set1_ps(2.0f * c10::pi<double>)


def _box_muller_blocks(u: np.ndarray) -> np.ndarray:
    """torch ``normal_fill_16_AVX2`` on each row: uniforms [N, 16] -> standard normals [N, 16]."""
    u1 = _F(1) - u[:, :8]  # [0, 1) -> (0, 1]; exact in float32
    radius = np.sqrt(_F(-2) * _log_cephes_f32(u1))
    sin, cos = _sincos_cephes_f32(_TWO_PI * u[:, 8:])
    # torch stores fmadd(n, std=1, mean=0): identical to n except that -0.0 becomes +0.0
    return np.concatenate([radius * cos, radius * sin], axis=1) + _F(0)


def torch_randn_cpu(seed: int, shape) -> np.ndarray:
    """``torch.manual_seed(seed); torch.randn(*shape)`` on CPU (float32, x86/AVX2) -> float32 ``shape``.

    Bit-exact for ``numel >= 16`` (torch's vectorised Box-Muller path). ``seed`` is taken modulo
    2**32 like torch's mt19937 does; torch's other generator state (e.g. an earlier draw) is not
    modelled: this is the *first* draw after ``manual_seed``.
    """
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise NoiseRequestError(f"negative dimension in shape {shape}")
    if not 0 <= int(seed) < 2 ** 64:
        raise NoiseRequestError(f"seed must be in [0, 2**64), got {seed}")
    n = math.prod(shape)
    if n < 16:
        raise NoiseRequestError(
            f"torch_randn_cpu needs numel >= 16 (got shape {shape}, numel {n}): torch draws smaller "
            "tensors with a different, stateful float64 algorithm that is not reimplemented here")
    tail = n % 16
    raw = _raw_mt19937_uint32(int(seed), n + (16 if tail else 0))
    u = _uniform24(raw)
    out = np.empty(n, dtype=_F)
    full = n - tail
    out[:full] = _box_muller_blocks(u[:full].reshape(-1, 16)).reshape(-1)
    if tail:
        # torch overwrites the last 16 slots with 16 fresh uniforms (drawn after all n) and transforms them
        out[n - 16:] = _box_muller_blocks(u[n:].reshape(1, 16)).reshape(-1)
    return out.reshape(shape)


@functools.lru_cache(maxsize=1)
def _cfm_noise_buffer() -> np.ndarray:
    buf = torch_randn_cpu(CFM_NOISE_SEED, (1, CFM_NOISE_MELS, CFM_NOISE_FRAMES))
    buf.setflags(write=False)
    return buf


def cfm_noise(n_frames: int, n_mels: int = CFM_NOISE_MELS) -> np.ndarray:
    """Upstream's flow initial noise ``rand_noise[:, :, :n_frames]`` -> float32 [1, n_mels, n_frames].

    (Upstream multiplies it by ``temperature``; that is the caller's job.)
    The full seed-0 buffer [1, 80, 15000] is generated once (~0.3 s) and cached; the returned
    array is a fresh copy.
    """
    n_frames = int(n_frames)
    if n_mels != CFM_NOISE_MELS:
        raise NoiseRequestError(f"upstream's noise buffer has {CFM_NOISE_MELS} mel bins, got n_mels={n_mels}")
    if n_frames < 0:
        raise NoiseRequestError(f"n_frames must be >= 0, got {n_frames}")
    if n_frames > CFM_NOISE_FRAMES:
        raise NoiseRequestError(
            f"n_frames={n_frames} exceeds upstream's fixed noise buffer of {CFM_NOISE_FRAMES} frames "
            f"(300 s of mel at 50 Hz); upstream cannot synthesise longer segments either")
    return np.array(_cfm_noise_buffer()[:, :, :n_frames])
