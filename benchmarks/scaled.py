"""Speed of NVFP4 and per-tensor FP8 fake_quantize against a jitted copy.

For a 4096 x 4096 float32 array under ``jit``, the median time of each
fake_quantize is divided by the median time of a jitted elementwise pass
over the same array (``x * 1.0001``, which reads and writes the array once),
the two measured interleaved in one run (see ``common.compare``). The
per-tensor amax makes every one of these two passes over x (a reduction,
then the elementwise pass), so about 1.5x is the floor on a CPU.

    python benchmarks/scaled.py               # NVFP4 1x16 and 16x16, tensor FP8
    python benchmarks/scaled.py --size 1024 --repeats 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common

from jaxmx.families.nvfp4._kernels import nvfp4_fake_quantize
from jaxmx.families.tensor_fp8._kernels import tensor_fp8_fake_quantize
from tests import _torchao_nvfp4 as torchao

GOAL = 1.6


def cases():
    yield "nvfp4 1x16, axis -1", lambda v: nvfp4_fake_quantize(v)
    yield "nvfp4 1x16, axis 0", lambda v: nvfp4_fake_quantize(v, axis=0)
    yield "nvfp4 16x16 tiles", lambda v: nvfp4_fake_quantize(v, block_size=(16, 16))
    yield "nvfp4 1x16, torchao", lambda v: torchao.fake_quantize(v)
    yield "tensor fp8 e4m3", lambda v: tensor_fp8_fake_quantize(v, "e4m3")
    yield "tensor fp8 e5m2", lambda v: tensor_fp8_fake_quantize(v, "e5m2")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=4096, help="the array is size x size float32")
    p.add_argument("--repeats", type=int, default=20, help="timed calls of each")
    p.add_argument("--only", default="", help="substring of the case names to run")
    args = p.parse_args()

    x = jax.random.normal(jax.random.key(0), (args.size, args.size), jnp.float32)
    copy = jax.jit(lambda v: v * 1.0001)
    rows = []
    for label, fn in cases():
        if args.only not in label:
            continue
        t, base = common.compare(jax.jit(fn), copy, (x,), repeats=args.repeats)
        rows.append([label, f"{t * 1e3:.1f}", f"{base * 1e3:.1f}", f"{t / base:.2f}x"])
    print(common.machine())
    print(common.load())
    print(f"{args.size}x{args.size} float32, goal <= {GOAL}x the copy\n")
    print(common.table(["fake_quantize", "ms", "copy ms", "ratio"], rows))


if __name__ == "__main__":
    main()
