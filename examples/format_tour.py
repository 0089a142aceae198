"""A tour of the MX formats: what each one costs and what it keeps.

Quantizes two realistic tensors, a Gaussian one (like weights) and a
heavy-tailed one (like activations with outlier channels), to every
registered format along the last axis, and prints for each: bits per
element including the shared scale, bytes really held (packed), QSNR
(signal-to-quantization-noise ratio, dB), the largest relative error of a
nonzero element, and the largest error relative to its block's max.

    python examples/format_tour.py [--size 1024]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jaxmx


def tensors(size: int, seed: int = 0) -> dict[str, jax.Array]:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    normal = jax.random.normal(k1, (size, size), jnp.float32) * 0.02
    # Student-t (3 dof) values with 1% of columns scaled 30x: the outlier
    # channels seen in transformer activations.
    t = jax.random.t(k2, 3.0, (size, size), jnp.float32)
    outlier_cols = jax.random.bernoulli(k3, 0.01, (1, size))
    heavy = t * jnp.where(outlier_cols, 30.0, 1.0)
    return {"normal": normal, "heavy-tailed": heavy}


def stats(x: jax.Array, fmt: str, block_size: int | None) -> dict[str, float]:
    """``block_size``: the format's block (None: the whole tensor is one block)."""
    t = jaxmx.quantize(x, fmt, packed=True)
    q = jaxmx.dequantize(t)
    x64, q64 = np.asarray(x, np.float64), np.asarray(q, np.float64)
    err = np.abs(q64 - x64)
    nz = x64 != 0
    if block_size is None:
        amax = np.full_like(x64, np.abs(x64).max())
    else:
        blocks = np.abs(x64).reshape(x64.shape[0], -1, block_size).max(-1)
        amax = np.repeat(blocks, block_size, axis=-1)
    return {
        "bits": 8 * t.nbytes / x.size,
        "bytes": t.nbytes,
        "qsnr": 10 * np.log10(np.sum(x64**2) / np.sum(err**2)),
        "max_rel": float(np.max(err[nz] / np.abs(x64[nz]))),
        "max_blk": float(np.max(err / np.where(amax > 0, amax, 1))),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--size", type=int, default=1024, help="each of the two tensors is size x size float32"
    )
    args = p.parse_args()
    print(
        f"jaxmx {jaxmx.__version__}: {args.size}x{args.size} float32 tensors "
        f"({args.size * args.size * 4:,} bytes), each format's blocks along the last axis\n"
    )
    header = (
        f"{'format':<16} {'bits/elem':>9} {'bytes':>10} {'QSNR dB':>8} {'max rel err':>12} "
        f"{'max err/blk max':>16}"
    )
    for name, x in tensors(args.size).items():
        print(f"{name} tensor")
        print(header)
        print("-" * len(header))
        for fmt in jaxmx.list_formats():
            s = stats(x, fmt, jaxmx.get_format(fmt).block_size)
            print(
                f"{fmt:<16} {s['bits']:>9.2f} {s['bytes']:>10,} {s['qsnr']:>8.1f} "
                f"{s['max_rel']:>12.3g} {s['max_blk']:>16.3g}"
            )
        print()
    print("QSNR: 10 log10(sum x^2 / sum (q - x)^2); every ~6 dB is one more bit of precision.")
    print("Max rel err reaches 1 where a small element rounds to zero beside a large block max.")


if __name__ == "__main__":
    main()
