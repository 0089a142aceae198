"""An independent float64 NumPy model of MX quantization, for tests.

It shares no code with jaxmx: element grids come from ml_dtypes (or the
integer definition), exponents from ``np.frexp``, and rounding from a search
in the sorted grid. It is slow and simple on purpose.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

import jaxmx

_ML_DTYPES = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}


# The formats this model describes: the OCP MX family (one E8M0 power-of-two
# scale per block). NVFP4, the BDR formats and per-tensor FP8 have their own
# models in tests/reference_blockformats.py.
OCP_FORMATS = [f for f in jaxmx.list_formats() if jaxmx.get_format(f).family == "ocp"]


@functools.cache
def grid(elem: jaxmx.ElementFormat) -> np.ndarray:
    """Sorted nonnegative magnitudes of an element format; index = code."""
    codes = np.arange(elem.max_code + 1, dtype=np.uint8)
    if elem.kind == "int":
        return codes.astype(np.float64) * 2.0**-elem.mantissa_bits
    return codes.view(_ML_DTYPES[elem.name]).astype(np.float64)


def floor_log2(a: np.ndarray) -> np.ndarray:
    _, k = np.frexp(a)
    return k - 1


def shared_exponent(amax: float, elem, mode: str) -> int:
    if amax == 0:
        return -127
    fl = int(floor_log2(np.float64(amax)))
    emax = int(floor_log2(np.float64(elem.max_normal)))
    if mode == "floor":
        e = fl - emax
    elif mode == "ceil":
        e = fl + (amax != 2.0**fl) - emax
    elif mode == "rceil":
        r = amax / elem.max_normal  # float64: exact enough to decide the ceiling
        e = int(np.ceil(np.log2(r))) if r != 2.0 ** floor_log2(r) else int(floor_log2(r))
    elif mode == "even":
        m = elem.mantissa_bits
        scaled = np.round(amax / 2.0 ** (fl - m))  # half to even
        e = fl + (scaled >= 2.0 ** (m + 1)) - emax
    else:
        raise ValueError(mode)
    return int(np.clip(e, -127, 127))


def round_to_grid(y: np.ndarray, g: np.ndarray, rounding: str, u=None) -> np.ndarray:
    """Rounds nonnegative ``y`` onto grid ``g`` (saturating at its max)."""
    idx = np.clip(np.searchsorted(g, y, side="right") - 1, 0, len(g) - 1)
    lo = g[idx]
    hi = g[np.minimum(idx + 1, len(g) - 1)]
    exact = y == lo
    if rounding == "toward_zero":
        out = lo
    elif rounding == "stochastic":
        frac = np.where(hi > lo, (y - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
        out = np.where(u < frac, hi, lo)
    else:
        d_lo, d_hi = y - lo, hi - y
        tie = d_lo == d_hi
        if rounding == "nearest_even":
            tie_pick = np.where(idx % 2 == 0, lo, hi)
        elif rounding == "nearest_away":
            tie_pick = hi
        else:
            raise ValueError(rounding)
        out = np.where(tie, tie_pick, np.where(d_lo < d_hi, lo, hi))
    out = np.where(exact, lo, out)
    return np.where(y >= g[-1], g[-1], out)


def fake_quantize(
    x,
    fmt,
    *,
    axis=-1,
    block_size=None,
    scale_mode="floor",
    rounding="nearest_even",
    flush_subnormals=False,
):
    """Float64 reference of ``jaxmx.fake_quantize`` (deterministic roundings).

    Returns ``(values, exponents)`` with exponents NaN for NaN-scale blocks.
    """
    fmt = jaxmx.get_format(fmt)
    elem = fmt.element
    bs = block_size or fmt.block_size
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    n = x.shape[-1]
    nb = -(-n // bs)
    out = np.empty_like(x)
    exps = np.empty(x.shape[:-1] + (nb,))
    g = grid(elem)
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx]
        for b in range(nb):
            blk = row[b * bs : (b + 1) * bs]
            if flush_subnormals and np.max(np.abs(blk)) < 2.0**-126:
                # The emulator: shared exponent before clamping <= -127 zeroes the block.
                blk = 0.0 * blk
            if not np.all(np.isfinite(blk)):
                out[idx + (slice(b * bs, (b + 1) * bs),)] = np.nan
                exps[idx + (b,)] = np.nan
                continue
            e = shared_exponent(float(np.max(np.abs(blk))), elem, scale_mode)
            q = round_to_grid(np.abs(blk) / 2.0**e, g, rounding)
            out[idx + (slice(b * bs, (b + 1) * bs),)] = np.copysign(q, blk) * 2.0**e
            exps[idx + (b,)] = e
    # MX values can exceed float32 (448 * 2^127): float32 holds Inf there.
    with np.errstate(over="ignore"):
        out = out.astype(np.float32)
    return np.moveaxis(out, -1, axis), np.moveaxis(exps, -1, axis)
