"""Measuring what a format keeps: quantization signal-to-noise ratio (QSNR).

QSNR is the ratio of a tensor's energy to the energy of its quantization
error, in decibels::

    QSNR(x) = -10 log10( ||Q(x) - x||^2 / ||x||^2 )

It is the figure of merit the BDR paper uses to compare block formats at
equal storage (Rouhani et al., "With Shared Microexponents, A Little
Shifting Goes a Long Way", ISCA 2023, section 5 and figure 7): higher is
better, and one more bit of mantissa is worth about 6.02 dB. It needs no
model, only a tensor, which makes it the first thing to look at when
choosing a format for weights or activations.

These are host-side measurements: they return Python floats and cannot run
under ``jit``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmx.formats import MXFormat, get_format
from jaxmx.quantize import fake_quantize

__all__ = ["qsnr", "snr_db"]

# Keyword options fake_quantize accepts (axis, block_size, scale_mode, ...):
# read from its signature, so options it gains later are accepted here too.
_OPTIONS = tuple(
    name
    for name, p in inspect.signature(fake_quantize).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)


def _host_array(a: jax.typing.ArrayLike, what: str) -> np.ndarray:
    if isinstance(a, jax.core.Tracer):
        raise TypeError(
            f"{what} is a traced value: QSNR is a host-side measurement that returns a "
            "Python float; call it outside jit/vmap/grad"
        )
    a = np.asarray(a)
    # Real numbers only: ints and every float (bfloat16 and float8 included).
    if a.dtype == np.bool_ or not (
        jnp.issubdtype(a.dtype, jnp.floating) or jnp.issubdtype(a.dtype, jnp.integer)
    ):
        raise TypeError(f"{what} must be a real (float or integer) array, got dtype {a.dtype}")
    return a.astype(np.float64)


def _log10_energy(a: np.ndarray) -> float:
    # log10(sum a^2), exact in range whatever the magnitudes: scale by the
    # largest |a| first, so no square overflows or underflows to zero.
    top = float(np.max(np.abs(a)))
    if top == 0.0:
        return -math.inf
    return 2.0 * math.log10(top) + math.log10(float(np.sum(np.square(a / top))))


def snr_db(x: jax.typing.ArrayLike, approx: jax.typing.ArrayLike) -> float:
    """Signal-to-noise ratio of ``approx`` as an approximation of ``x``, in dB.

    ``-10 log10(||approx - x||^2 / ||x||^2)``, computed in float64 after
    scaling each term by its largest magnitude, so it is exact in range for
    any float32 data (values near FLT_MAX or deep in the subnormals).

    Args:
      x: the reference, a float array with at least one nonzero element and
        no NaN or Inf.
      approx: an array of the same shape (any float dtype).

    Returns:
      The SNR in dB as a Python float: ``inf`` if ``approx == x`` exactly,
      ``-inf`` if ``approx`` holds an Inf, NaN if it holds a NaN.

    Raises:
      ValueError: the shapes differ, ``x`` is all zeros (the ratio is 0/0),
        or ``x`` holds NaN or Inf.
      TypeError: an argument is not a real array, or is traced under jit.

    >>> from jaxmx import analysis
    >>> round(analysis.snr_db([1.0, 1.0], [1.1, 0.9]), 9)  # noise 0.02 against signal 2
    20.0
    """
    x64 = _host_array(x, "x")
    y64 = _host_array(approx, "approx")
    if x64.shape != y64.shape:
        raise ValueError(f"x has shape {x64.shape} but approx has shape {y64.shape}")
    if not np.all(np.isfinite(x64)):
        raise ValueError("x holds NaN or Inf: the signal energy is undefined; pass finite data")
    signal = _log10_energy(x64)
    if signal == -math.inf:
        raise ValueError("x is all zeros: it has no energy, so the SNR is undefined (0/0)")
    if np.any(np.isnan(y64)):
        return math.nan
    if np.any(np.isinf(y64)):
        return -math.inf
    return 10.0 * (signal - _log10_energy(y64 - x64))


def qsnr(x: jax.typing.ArrayLike, format: str | MXFormat, **options: Any) -> float:
    """Quantization signal-to-noise ratio of ``x`` in ``format``, in dB.

    ``-10 log10(||Q(x) - x||^2 / ||x||^2)`` with ``Q = jaxmx.fake_quantize``
    (quantize then dequantize) under the given options. Higher is better;
    a format that represents ``x`` exactly gives ``inf``, and each further
    bit of element precision adds about 6 dB. The BDR paper (Rouhani et al.,
    ISCA 2023, figure 7) compares formats by QSNR at equal bits per element.

    Args:
      x: a float32, bfloat16 or float16 array with at least one nonzero
        element and no NaN or Inf (QSNR is a property of finite data).
      format: a name from :func:`jaxmx.list_formats` (or an alias), or an
        :class:`~jaxmx.MXFormat`.
      **options: passed to :func:`jaxmx.fake_quantize`: ``axis``,
        ``block_size``, ``scale_mode``, ``rounding``, ``flush_subnormals``,
        ``key``.

    Returns:
      The QSNR in dB as a Python float (``inf`` if quantization is exact,
      ``-inf`` if a value overflows to Inf).

    Raises:
      ValueError: unknown format name, ``x`` all zeros or non-finite, or an
        option value :func:`jaxmx.fake_quantize` rejects.
      TypeError: ``format`` is neither a name nor an MXFormat, an option is
        not one of ``fake_quantize``'s, or ``x`` is traced under jit.

    >>> import jax, jaxmx
    >>> from jaxmx import analysis
    >>> x = jax.random.normal(jax.random.key(0), (64, 256))
    >>> [round(analysis.qsnr(x, f), 1) for f in ("mxint8", "mxfp8", "mxfp6", "mxfp4")]
    [41.8, 30.6, 25.4, 18.9]
    >>> # Smaller blocks track the data more closely.
    >>> round(analysis.qsnr(x, "mxint8", block_size=16) - analysis.qsnr(x, "mxint8"), 1)
    1.1
    """
    if not isinstance(format, (str, MXFormat)):
        raise TypeError(f"format must be a format name or an MXFormat, got {type(format).__name__}")
    fmt = get_format(format)
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for qsnr; "
            f"jaxmx.fake_quantize takes: {', '.join(_OPTIONS)}"
        )
    _host_array(x, "x")  # refuses tracers before any work
    return snr_db(x, fake_quantize(x, fmt, **options))
