"""cosyjax.flow.noise: torch-free torch.randn (CPU, float32) and upstream's seed-0 flow noise buffer.

Fixtures: /work/shared/golden/common/cfm_rand_noise.npy (the full buffer, when present) and the
``*__noise_z`` arrays of tests/golden/<version>/flow/inference.npz (always present).
"""
from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pytest

from cosyjax.flow.noise import (CFM_NOISE_FRAMES, NoiseRequestError, _fma_f32, cfm_noise,
                                torch_randn_cpu)

from .conftest import GOLDEN

# The buffer is not copied into tests/golden (size); it lives next to the repo in ../shared/golden.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL_BUFFER_CANDIDATES = [p for p in (
    os.environ.get("COSYJAX_CFM_NOISE"),
    os.path.join(GOLDEN, "common", "cfm_rand_noise.npy"),
    os.path.join(os.path.dirname(_REPO), "shared", "golden", "common", "cfm_rand_noise.npy"),
) if p]


def _full_buffer_path() -> str | None:
    return next((p for p in FULL_BUFFER_CANDIDATES if os.path.isfile(p)), None)


def _assert_bits_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.float32 and expected.dtype == np.float32
    assert actual.shape == expected.shape
    mismatched = int(np.count_nonzero(actual.view(np.uint32) != expected.view(np.uint32)))
    assert mismatched == 0, f"{mismatched} of {actual.size} values differ in their bits"


def test_full_buffer_bit_exact_against_torch_recording():
    path = _full_buffer_path()
    if path is None:
        pytest.skip("cfm_rand_noise.npy (torch.manual_seed(0); torch.randn(1, 80, 15000)) not available")
    _assert_bits_equal(torch_randn_cpu(0, (1, 80, CFM_NOISE_FRAMES)), np.load(path))
    _assert_bits_equal(cfm_noise(CFM_NOISE_FRAMES), np.load(path))


@pytest.mark.parametrize("version", ["cosyvoice2", "cosyvoice3"])
def test_matches_flow_inference_noise_z(version):
    path = os.path.join(GOLDEN, version, "flow", "inference.npz")
    if not os.path.isfile(path):
        pytest.skip(f"{path} missing")
    fixture = np.load(path)
    keys = [k for k in fixture.files if k.endswith("__noise_z")]
    assert keys, "inference.npz holds no __noise_z arrays"
    for key in keys:
        noise_z = fixture[key]
        _assert_bits_equal(cfm_noise(noise_z.shape[-1]), noise_z)


def test_torch_documented_first_values():
    # torch.manual_seed(0); torch.randn(4, 4)[0] as printed by torch (4 decimals).
    first_row = torch_randn_cpu(0, (4, 4))[0]
    np.testing.assert_allclose(first_row, [-1.1258, -1.1524, -0.2506, -0.4339], atol=1e-4)


def test_tail_reuses_prefix_and_redraws_last_16():
    aligned = torch_randn_cpu(3, (64,))
    with_tail = torch_randn_cpu(3, (5, 11))  # 55 = 3 blocks of 16 + 7
    assert with_tail.shape == (5, 11) and with_tail.dtype == np.float32
    flat = with_tail.reshape(-1)
    # the 3 full blocks are transformed as usual, then slots 39..54 are overwritten by a fresh block
    _assert_bits_equal(flat[:39], aligned[:39])
    assert not np.any(flat[39:] == aligned[39:55])
    assert np.all(np.isfinite(flat))


def test_statistics_and_seed_dependence():
    a = torch_randn_cpu(1, (200_000,))
    assert abs(float(a.mean())) < 0.01 and abs(float(a.std()) - 1.0) < 0.01
    assert not np.array_equal(a[:64], torch_randn_cpu(2, (64,)))
    _assert_bits_equal(torch_randn_cpu(1 + 2 ** 32, (64,)), a[:64])  # torch keeps the low 32 bits


def _correctly_rounded(a: float, b: float, c: float, got: np.float32) -> bool:
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    err = abs(Fraction(float(got)) - exact)
    neighbours = (np.nextafter(got, np.float32(-np.inf)), np.nextafter(got, np.float32(np.inf)))
    return all(abs(Fraction(float(n)) - exact) > err or
               (abs(Fraction(float(n)) - exact) == err and got.view(np.uint32) % 2 == 0)
               for n in neighbours)


def test_fma_is_single_rounded():
    # Double rounding trap: exact = (256 + 2**-15) + 2**-16 - 2**-46 must round down to 256 + 2**-15;
    # rounding to float64 first lands on the float32 midpoint, which ties to even: 256 + 2**-14.
    a = np.float32(2.0 ** -8 * (1 + 2.0 ** -15))
    b = np.float32(2.0 ** -8 * (1 - 2.0 ** -15))
    c = np.float32(256 + 2.0 ** -15)
    assert np.float32(float(a) * float(b) + float(c)) == np.float32(256 + 2.0 ** -14)  # the naive way
    assert _fma_f32(a, b, c) == np.float32(256 + 2.0 ** -15)
    rng = np.random.default_rng(0)
    a = rng.standard_normal(2000).astype(np.float32)
    b = rng.standard_normal(2000).astype(np.float32)
    c = (rng.standard_normal(2000) * 10.0 ** rng.integers(-8, 8, 2000)).astype(np.float32)
    got = _fma_f32(a, b, c)
    assert got.dtype == np.float32
    assert all(_correctly_rounded(float(x), float(y), float(z), g) for x, y, z, g in zip(a, b, c, got))


def test_cfm_noise_prefix_shape_and_copy():
    short = cfm_noise(7)
    assert short.shape == (1, 80, 7) and short.dtype == np.float32
    _assert_bits_equal(short, cfm_noise(50)[:, :, :7])
    short[...] = 0  # a copy: the cached buffer is untouched
    assert np.any(cfm_noise(7) != 0)
    assert cfm_noise(0).shape == (1, 80, 0)


def test_errors():
    with pytest.raises(NoiseRequestError, match="15000"):
        cfm_noise(CFM_NOISE_FRAMES + 1)
    with pytest.raises(NoiseRequestError, match="n_frames"):
        cfm_noise(-1)
    with pytest.raises(NoiseRequestError, match="80 mel"):
        cfm_noise(10, n_mels=100)
    with pytest.raises(NoiseRequestError, match="numel >= 16"):
        torch_randn_cpu(0, (3, 5))
    with pytest.raises(NoiseRequestError, match="negative"):
        torch_randn_cpu(0, (4, -4))
    with pytest.raises(ValueError, match="seed"):
        torch_randn_cpu(-1, (16,))
