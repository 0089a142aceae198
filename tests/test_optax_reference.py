"""Float64 NumPy models of the optimizer-state quantization maps and codecs.

Written from the published descriptions, independently of jaxmx.optax:

* bitsandbytes' dynamic map (Dettmers 2016; bitsandbytes ``create_dynamic_map``):
  decade ``d`` of ``E = bits - 1`` holds ``n_d`` equally spaced midpoints
  ``10**(d - E + 1) * (0.1 + (j + 1/2) * 0.9 / n_d)``, with ``n_d = 2**d``
  (signed, mirrored to negative) or ``2**(d + 1)`` (unsigned), plus 0 and 1;
* Li et al. 2023's linear map without zero, ``(i + 1) / 2**bits``;
* nearest rounding in exact arithmetic, ties to the smaller magnitude;
* block-wise absmax scaling (``x * float32(1 / absmax)`` in float32, as the
  bitsandbytes kernel) and rank-1 scaling (``x / min(row max, col max)``).
"""

from __future__ import annotations

import numpy as np


def dynamic_values(signed: bool, bits: int) -> np.ndarray:
    e = bits - 1
    out = [0.0, 1.0]
    for d in range(e):
        n = 2**d if signed else 2 ** (d + 1)
        for j in range(n):
            v = 10.0 ** (d - e + 1) * (0.1 + (j + 0.5) * 0.9 / n)
            out.append(v)
            if signed:
                out.append(-v)
    return np.sort(np.array(out, np.float64))


def linear_values(bits: int) -> np.ndarray:
    return (np.arange(2**bits) + 1.0) / 2**bits


def nearest_codes(n: np.ndarray, values: np.ndarray, allow_zero: bool = True) -> np.ndarray:
    """Index of the value nearest to each ``n`` (float64), ties to the smaller magnitude.

    An unsigned map takes ``|n|``; ``allow_zero=False`` never picks the value 0.
    """
    n = np.asarray(n, np.float64).reshape(-1)
    if values.min() >= 0:
        n = np.abs(n)
    dist = np.abs(n[:, None] - values[None, :])
    if not allow_zero:
        dist[:, values == 0] = np.inf
    best = dist.min(axis=1, keepdims=True)
    magnitude = np.where(dist == best, np.abs(values)[None, :], np.inf)
    return magnitude.argmin(axis=1)


def blockwise(x: np.ndarray, values: np.ndarray, block: int):
    """(codes per block, absmax per block, decoded float32) of the block-wise codec."""
    flat = np.asarray(x, np.float32).reshape(-1)
    pad = -flat.size % block
    blocks = np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1)
    with np.errstate(divide="ignore"):
        recip = np.where(absmax > 0, np.float32(1) / absmax, np.float32(0)).astype(np.float32)
    n = (blocks * recip[:, None]).astype(np.float32)
    codes = nearest_codes(n, values).reshape(blocks.shape)
    decoded = (values.astype(np.float32)[codes] * absmax[:, None]).astype(np.float32)
    return codes, absmax, decoded.reshape(-1)[: flat.size].reshape(np.shape(x))


def rank1(x: np.ndarray, bits: int = 4):
    """(codes, decoded float32) of the rank-1 / linear-map codec for a 2-D array."""
    x = np.asarray(x, np.float32)
    a = np.abs(x)
    scale = np.minimum(a.max(axis=1)[:, None], a.max(axis=0)[None, :]).astype(np.float32)
    n = np.where(scale > 0, x / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    values = linear_values(bits)
    codes = nearest_codes(n, values).reshape(x.shape)
    return codes, (values.astype(np.float32)[codes] * scale).astype(np.float32)


# The models' own sanity: sizes and the end points the papers state.


def test_dynamic_model_sizes_and_ends():
    for signed, bits in ((True, 8), (False, 8), (True, 4)):
        v = dynamic_values(signed, bits)
        assert len(v) == len(np.unique(v)) == 2**bits
        assert v.max() == 1.0 and (v.min() < 0) == signed
    # bitsandbytes' signed map has no -1: its most negative value is -(0.1 + 63.5 * 0.9 / 64).
    assert dynamic_values(True, 8).min() == -(0.1 + 63.5 * 0.9 / 64)
    # Li et al.'s 4-bit first-moment map (their Table/Fig.: 0.0055 is the smallest magnitude).
    np.testing.assert_allclose(dynamic_values(True, 4)[8], 0.0055)


def test_nearest_model_breaks_ties_toward_zero():
    values = np.array([-1.0, 0.0, 0.5, 1.0])
    assert nearest_codes(np.array([0.25, -0.5, 0.75]), values).tolist() == [1, 1, 2]
