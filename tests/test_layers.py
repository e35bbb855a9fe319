"""`cosyjax.nn.layers.RowStableConv`: `nn.Conv`'s parameters and values, and output frames whose bits do
not depend on how many frames the call has (XLA's CPU convolution does not give that on every CPU; the
exact incremental streaming of both flows relies on it)."""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from cosyjax.nn.layers import RowStableConv


@pytest.mark.parametrize("channels,groups,k", [(64, 16, 31), (80, 1, 4), (32, 1, 3), (16, 1, 1)])
def test_row_stable_conv_is_nn_conv_and_length_independent(channels, groups, k):
    rng = np.random.default_rng(channels + k)
    x = rng.standard_normal((2, 1230 + k - 1, channels)).astype(np.float32)
    ref_mod = nn.Conv(channels, (k,), padding="VALID", feature_group_count=groups)
    mod = RowStableConv(channels, k, groups)
    params = ref_mod.init(jax.random.PRNGKey(0), x)
    own = mod.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(own) == jax.tree_util.tree_structure(params)
    assert [a.shape for a in jax.tree_util.tree_leaves(own)] == [a.shape for a in jax.tree_util.tree_leaves(params)]
    f = jax.jit(lambda p, x: mod.apply(p, x))
    full = np.asarray(f(params, x))
    ref = np.asarray(ref_mod.apply(params, x))
    assert full.shape == ref.shape == (2, 1230, channels) and full.dtype == np.float32
    assert np.linalg.norm(full - ref) <= 1e-6 * np.linalg.norm(ref)
    for start, n in ((0, 200), (200, 100), (300, 200), (700, 400), (1150, 50)):  # >= 100 rows (2 x >= 50)
        part = np.asarray(f(params, x[:, start:start + n + k - 1]))
        assert np.array_equal(part, full[:, start:start + n]), (start, n)


def test_row_stable_conv_rejects_bad_shapes():
    x = np.zeros((1, 10, 6), np.float32)
    with pytest.raises(ValueError, match="divide by groups"):
        RowStableConv(8, 3, groups=4).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="fewer than the kernel size"):
        RowStableConv(6, 31).init(jax.random.PRNGKey(0), x)
