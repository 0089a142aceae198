"""The weight-only matmul's tiling and ``pallas_call`` for each Pallas backend.

``y (M, N) = x (M, K) @ W (K, N)`` with ``W`` as stored (codes ``(K, N)``,
or ``(K / 2, N)`` packed, and scales ``(K / block_size, N)``); the decode
of a tile is :mod:`jaxmx.pallas._wdecode`'s, the same for both backends.
What differs is how the contraction is walked:

* ``mosaic_tpu``: a grid ``(M tiles, N tiles, K tiles)``, the K axis last
  and "arbitrary" (a reduction carried across steps in a float32 VMEM
  accumulator, written out at the last step), M and N "parallel". Block
  shapes follow the (8, 128) tiling: a side equal to the array's, or
  multiples of it. M up to 256 (every decode-sized batch) and N up to 256
  are one tile; larger ones take tiles of 256 whose last may run past the
  end (Pallas drops what is written there, and what is read there reaches
  only those dropped rows and columns). K up to 1024 is one step; larger
  K takes steps of 512 to 2048 rows (a multiple of 256, so that ``x``'s
  tile of K / 2 columns when packed is whole lanes, and of 8 blocks, so
  that the scales' tile is whole sublanes), and where none divides K the
  rows past its end are set to zero in the last step (``x`` is padded with
  zeros to the steps; ``W`` never is).
* ``triton``: a grid ``(M tiles, N tiles)``; each program loops over K in
  steps of ``max(64, block_size)`` rows. Triton's tiles have power-of-two
  sides and its matmul needs 16 or more on each, so ``x`` is padded with
  zeros to whole tiles (M to 16, 32 or 64 rows, K to the step) and the
  output computed for whole tiles and sliced. ``W`` is read with masked
  loads: rows past K and columns past N load as zero codes, so no tile
  reads outside ``W``.

None of these sizes has been tuned on hardware.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from jaxmx.pallas import _call
from jaxmx.pallas._wdecode import Weight, finish, product

# Mosaic: the largest M and N tiles, K taken whole up to this, and K steps.
TPU_TILE_M = 256
TPU_TILE_N = 256
TPU_WHOLE_K = 1024
TPU_STEPS_K = (1024, 2048, 512)
# Triton: the largest M and N tiles, and the K step (at least one block).
TRITON_TILE_M = 64
TRITON_TILE_N = 128
TRITON_STEP_K = 64


@dataclasses.dataclass(frozen=True)
class Tiling:
    """One backend's tiles for an ``(M, K) @ (K, N)`` product."""

    tm: int  # rows of x and y per tile
    tn: int  # columns of W and y per tile
    tk: int  # rows of W (columns of x) per step of the contraction
    mp: int  # M, padded for x and y
    np: int  # N, padded for y
    kp: int  # K, padded for x

    @property
    def steps(self) -> int:
        return self.kp // self.tk


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _up(n: int, step: int) -> int:
    return -(-n // step) * step


def tiling(backend: str, w: Weight, m: int, k: int, n: int) -> Tiling:
    """The tiles ``backend`` runs an ``(m, k) @ (k, n)`` product in."""
    bs = w.block_size
    if backend == "mosaic_tpu":
        tm = m if m <= TPU_TILE_M else TPU_TILE_M
        tn = n if n <= TPU_TILE_N else TPU_TILE_N
        if k <= TPU_WHOLE_K:
            tk = k
        else:
            steps = [t for t in TPU_STEPS_K if t % (8 * bs) == 0]
            tk = next((t for t in steps if k % t == 0), steps[-1])
        return Tiling(tm, tn, tk, m, n, _up(k, tk))
    tm = min(TRITON_TILE_M, max(16, _pow2(m)))
    tn = min(TRITON_TILE_N, max(16, _pow2(n)))
    tk = max(TRITON_STEP_K, bs)
    return Tiling(tm, tn, tk, _up(m, tm), _up(n, tn), _up(k, tk))


def _refs(w: Weight, refs: tuple) -> tuple[list, jax.Ref, jax.Ref, jax.Ref | None, tuple]:
    """``(x refs, codes, scales, tensor scale or None, outputs and scratch)``."""
    nx = 2 if w.packed else 1
    xs, (c_ref, s_ref) = list(refs[:nx]), refs[nx : nx + 2]
    rest = refs[nx + 2 :]
    t_ref = rest[0] if w.tensor_scale else None
    return xs, c_ref, s_ref, t_ref, rest[1:] if w.tensor_scale else rest


def _mosaic_body(w: Weight, steps: int, code_rows: int | None, *refs: jax.Ref) -> None:
    """One ``(i, j, k)`` step: the product of one K step added into the accumulator.

    ``code_rows``: the code rows of W when the last step runs past them, else None.
    """
    x_refs, c_ref, s_ref, t_ref, (o_ref, acc_ref) = _refs(w, refs)
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _start() -> None:
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    valid = None
    if code_rows is not None:
        valid = code_rows - k * c_ref.shape[0]
    xs = [r[...] for r in x_refs]
    acc_ref[...] += product(w, xs, c_ref[...], s_ref[...], valid)

    @pl.when(k == steps - 1)
    def _end() -> None:
        ts = None if t_ref is None else t_ref[...]
        o_ref[...] = finish(acc_ref[...], ts, o_ref.dtype)


def _triton_body(w: Weight, steps: int, n: int, *refs: jax.Ref) -> None:
    """One ``(i, j)`` tile of the output: a loop over the K steps."""
    x_refs, c_ref, s_ref, t_ref, (o_ref,) = _refs(w, refs)
    tm, tn = o_ref.shape
    tkx = x_refs[0].shape[1] // steps  # columns of x (of each half) per step
    tkc = tkx  # code rows per step: one per column of x (of its half)
    nb = tkc * w.per_byte // w.block_size  # scale rows per step
    code_rows, scale_rows = c_ref.shape[0], s_ref.shape[0]
    col = pl.program_id(1) * tn + lax.broadcasted_iota(jnp.int32, (1, tn), 1)
    in_n = col < n

    def step(k: jax.Array, acc: jax.Array) -> jax.Array:
        rc = k * tkc + lax.broadcasted_iota(jnp.int32, (tkc, 1), 0)
        rs = k * nb + lax.broadcasted_iota(jnp.int32, (nb, 1), 0)
        codes = pltriton.load(
            c_ref.at[pl.ds(k * tkc, tkc), :], mask=(rc < code_rows) & in_n, other=0
        )
        scales = pltriton.load(
            s_ref.at[pl.ds(k * nb, nb), :], mask=(rs < scale_rows) & in_n, other=0
        )
        xs = [r[:, pl.ds(k * tkx, tkx)] for r in x_refs]
        return acc + product(w, xs, codes, scales)

    acc = lax.fori_loop(0, steps, step, jnp.zeros((tm, tn), jnp.float32))
    ts = None if t_ref is None else t_ref[...]
    o_ref[...] = finish(acc, ts, o_ref.dtype)


def run(
    w: Weight,
    out_dtype: jnp.dtype,
    backend: str,
    interpret: bool,
    x: jax.Array,
    codes: jax.Array,
    scales: jax.Array,
    *tensor_scale: jax.Array,
) -> list[jax.Array]:
    """``[x @ W]`` ``(M, N)`` in ``out_dtype`` by ``backend``'s kernel.

    ``x``: ``(M, K)`` bfloat16 or float32; ``codes``: uint8 raw codes
    (packed or not); ``scales``: uint8 scale bytes; ``tensor_scale``: NVFP4's,
    a ``(1, 1)`` float32 array.
    """
    (m, k), n = x.shape, codes.shape[1]
    t = tiling(backend, w, m, k, n)
    if (t.mp, t.kp) != (m, k):
        x = jnp.pad(x, ((0, t.mp - m), (0, t.kp - k)))
    xs = [x[:, 0::2], x[:, 1::2]] if w.packed else [x]
    tkx, tkc = t.tk // w.per_byte, t.tk // w.per_byte
    nb = t.tk // w.block_size
    whole = lambda *_: (0, 0)  # noqa: E731
    grid: tuple[int, ...]
    if backend == "mosaic_tpu":
        grid = (pl.cdiv(m, t.tm), pl.cdiv(n, t.tn), t.steps)
        code_rows = codes.shape[0] if t.kp != k else None
        body = functools.partial(_mosaic_body, w, t.steps, code_rows)
        in_specs = [pl.BlockSpec((t.tm, tkx), lambda i, j, s: (i, s)) for _ in xs]
        in_specs += [
            pl.BlockSpec((tkc, t.tn), lambda i, j, s: (s, j)),
            pl.BlockSpec((nb, t.tn), lambda i, j, s: (s, j)),
        ]
        out_specs = pl.BlockSpec((t.tm, t.tn), lambda i, j, s: (i, j))
        scratch = [pltpu.VMEM((t.tm, t.tn), jnp.float32)]
        params = _call.compiler_params(backend, ("parallel", "parallel", "arbitrary"))
    else:
        grid = (t.mp // t.tm, t.np // t.tn)
        body = functools.partial(_triton_body, w, t.steps, n)
        in_specs = [pl.BlockSpec((t.tm, t.kp // w.per_byte), lambda i, j: (i, 0)) for _ in xs]
        in_specs += [
            pl.BlockSpec((codes.shape[0], t.tn), lambda i, j: (0, j)),
            pl.BlockSpec((scales.shape[0], t.tn), lambda i, j: (0, j)),
        ]
        out_specs = pl.BlockSpec((t.tm, t.tn), lambda i, j: (i, j))
        scratch = []
        params = _call.compiler_params(backend)
    in_specs += [pl.BlockSpec((1, 1), whole) for _ in tensor_scale]
    call = pl.pallas_call(
        body,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=jax.ShapeDtypeStruct((t.mp, t.np), out_dtype),
        scratch_shapes=scratch,
        interpret=_call.interpreter(backend) if interpret else False,
        compiler_params=params,
        name="mx_weight_only_matmul",
    )
    y = call(*xs, codes, scales, *tensor_scale)
    if (t.mp, t.np) != (m, n):
        y = y[:m, :n]
    return [y]
