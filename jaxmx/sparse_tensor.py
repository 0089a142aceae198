"""N:M-sparse weights as stored: the kept values (an MXTensor) plus their positions.

A weight made N:M sparse along its contraction axis keeps ``n`` of every
``m`` consecutive elements of that axis. :class:`NMSparseTensor` stores only
what is kept:

* ``values``: an :class:`~jaxmx.MXTensor` of the kept values, in order,
  shaped like the weight with the contraction axis ``length * n / m`` long
  and blocked along it. A block counts **kept** values: with MXFP4 and the
  default block of 32, one E8M0 scale covers 32 kept values, which stand
  for 64 elements of the weight under 2:4 (128 under 1:4).
* ``indices``: the position (``0 .. m - 1``) of each kept value within its
  group, ``b = ceil(log2 m)`` bits each (2 for 2:4, 3 for 4:8, 4 for 8:16),
  in ascending order within a group, packed along the same axis as a
  little-endian bit stream (:mod:`jaxmx.bitstream`'s layout: for 2:4 four
  indices per byte, the first in the low bits). This is the layout of
  NVIDIA's 2:4 metadata (2 bits per kept value, 4 bits per group), not the
  shortest one (a 2:4 group has 6 patterns, so 3 bits would do).

Bits per element of the weight, scales and indices included, for a long
axis: ``n / m * bits(element) + n / m * bits(scale) / block + n / m * b``.
2:4 MXFP4 is ``2 + 0.125 + 1 = 3.125`` (dense MXFP4: 4.25); the table is in
docs/sparsity.md. :attr:`NMSparseTensor.nbytes` counts the bytes the leaves
hold, padding of a last partial index byte included.

:meth:`NMSparseTensor.densify` puts the codes back in their places, giving
the dense :class:`~jaxmx.MXTensor` whose blocks are ``block * m / n``
elements long (the same kept values, zeros between them): bit for bit the
``jaxmx.quantize`` of the sparsified weight with that block size, since a
block's zeros change neither its scale nor its other codes.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmx.bitstream import unpack_codes
from jaxmx.blocks import packed_length
from jaxmx.formats import MXFormat
from jaxmx.packing import unpack
from jaxmx.tensor import MXTensor

__all__ = ["NMSparseTensor", "index_bits"]


def index_bits(m: int) -> int:
    """Bits of one stored position within a group of ``m``: ``ceil(log2 m)``.

    >>> index_bits(4), index_bits(8), index_bits(16)
    (2, 3, 4)
    """
    return max(1, (int(m) - 1).bit_length())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NMSparseTensor:
    """An N:M-sparse tensor stored as its kept values and their positions.

    Made by :func:`jaxmx.quantize_sparse` (and by
    :func:`jaxmx.quantize_params` with ``sparsity=``); served by
    :func:`jaxmx.intercept`, which keeps it compact (through casts and
    control flow: a scan over stacked layers slices it) and densifies it
    where an operation reads it, handing a matmul the dense
    :class:`~jaxmx.MXTensor` of :meth:`densify`. ``values`` and ``indices``
    are pytree leaves (``values`` an MXTensor of two or more arrays),
    everything else is static, so it passes through ``jit`` like an array.

    Attributes:
      values: the kept values, an :class:`~jaxmx.MXTensor` blocked along the
        sparse axis, which holds ``length * n // m`` of them (a block counts
        kept values).
      indices: uint8, the position within its group of each kept value,
        :func:`index_bits` ``(m)`` bits each, ascending within a group,
        packed along the sparse axis as a little-endian bit stream; the other
        axes are those of ``values``.
      n: values kept per group.
      m: group length along the sparse axis.
      length: length of the sparse axis of the dense tensor.

    >>> import jax.numpy as jnp, jaxmx
    >>> w = jnp.arange(1.0, 129.0).reshape(128, 1) * jnp.ones((1, 4))
    >>> t = jaxmx.quantize_sparse(w, "mxfp4", jaxmx.NMSparsity(2, 4), axis=0)
    >>> t
    NMSparseTensor(2:4 mxfp4_e2m1, shape=(128, 4), dtype=float32, axis=-2, block_size=32,
    nbytes=200)
    >>> t.values.shape, t.indices.shape  # 64 kept values, 64 two-bit indices per column
    ((64, 4), (16, 4))
    >>> t.values.nbytes, t.indices.nbytes  # 64 * 4 FP4 codes and 2 * 4 scales; 16 * 4 bytes
    (136, 64)
    """

    values: MXTensor
    indices: jax.Array
    n: int = dataclasses.field(metadata=dict(static=True))
    m: int = dataclasses.field(metadata=dict(static=True))
    length: int = dataclasses.field(metadata=dict(static=True))

    def __post_init__(self) -> None:
        for name in ("n", "m", "length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"NMSparseTensor.{name} must be a non-negative int, got {v!r}")
        if not 0 < self.n < self.m:
            raise ValueError(f"NMSparseTensor needs 0 < n < m, got n={self.n}, m={self.m}")
        if self.length % self.m:
            raise ValueError(f"NMSparseTensor.length {self.length} is not a multiple of m={self.m}")
        # Only the static fields here: JAX rebuilds the record with
        # placeholder leaves while it transforms it (check_sparse_leaves
        # checks the leaves).
        if isinstance(self.values, MXTensor) and self.values.length != self.kept:
            raise ValueError(
                f"NMSparseTensor: values hold {self.values.length} kept values along the sparse "
                f"axis; {self.n}:{self.m} of {self.length} keeps {self.kept}"
            )

    @property
    def kept(self) -> int:
        """Kept values along the sparse axis: ``length * n // m``."""
        return self.length * self.n // self.m

    @property
    def format(self) -> MXFormat:
        """The format of the kept values."""
        return self.values.format

    @property
    def block_size(self) -> Any:
        """Kept values per block (``None`` for per-tensor formats)."""
        return self.values.block_size

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    def sparse_axis(self) -> int:
        """The sparse (and block) axis, negative, read off the values' leaves."""
        return self.values.block_axis()

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense tensor this stands for."""
        shape = list(self.values.shape)
        shape[self.sparse_axis()] = self.length
        return tuple(shape)

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by the leaves: the kept values' codes and scales, and the indices."""
        return (
            self.values.nbytes
            + math.prod(self.indices.shape) * np.dtype(self.indices.dtype).itemsize
        )

    @property
    def bits_per_element(self) -> float:
        """Stored bits per element of the dense tensor, scales and indices included."""
        return 8 * self.nbytes / max(self.size, 1)

    def __repr__(self) -> str:
        try:
            shape: object = self.shape
            axis, nbytes = self.sparse_axis(), f", nbytes={self.nbytes}"
        except Exception:  # leaves replaced by placeholders inside JAX transforms
            shape, axis, nbytes = "?", self.values.axis, ""
        return (
            f"NMSparseTensor({self.n}:{self.m} {self.format.name}, shape={shape}, "
            f"dtype={np.dtype(self.dtype).name}, axis={axis}, block_size={self.block_size!r}"
            f"{nbytes})"
        )

    __array_ufunc__ = None

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "an NMSparseTensor is not a NumPy array: call t.dequantize() for its values"
        )

    def positions(self) -> jax.Array:
        """The position within its group of each kept value (uint8, like ``values``)."""
        axis = self.sparse_axis()
        return unpack_codes(self.indices, index_bits(self.m), axis, self.kept)

    def densify(self) -> MXTensor:
        """The dense :class:`~jaxmx.MXTensor`: every code in its place, code 0 (+0)
        elsewhere, blocks of ``block_size * m // n`` elements (per-tensor
        formats: no blocks), unpacked; scales as stored.

        Bit for bit ``jaxmx.quantize(sparse, format, axis=..., block_size=
        block_size * m // n)`` of the sparse dense tensor the values came from.
        """
        return _densify(self)

    def dequantize(self, dtype: jax.typing.DTypeLike | None = None) -> jax.Array:
        """The dense values, in ``dtype`` (by default the tensor's)."""
        return self.densify().dequantize(dtype)


@jax.jit
def _densify(t: NMSparseTensor) -> MXTensor:
    values = unpack(t.values).canonical()
    axis = values.axis
    nd = values.ndim
    codes = jnp.moveaxis(values.data, axis, -1)
    pos = jnp.moveaxis(t.positions(), axis, -1)
    groups = t.length // t.m
    codes = codes.reshape(*codes.shape[:-1], groups, t.n)
    pos = pos.reshape(*pos.shape[:-1], groups, t.n)
    zero = jnp.zeros_like(codes[..., 0])
    # Slot j of a group holds the kept code whose position is j, if any:
    # positions within a group are distinct, so at most one matches.
    slots = []
    for j in range(t.m):
        slot = zero
        for i in range(t.n):
            slot = jnp.where(pos[..., i] == j, codes[..., i], slot)
        slots.append(slot)
    dense = jnp.stack(slots, axis=-1).reshape(*codes.shape[:-2], t.length)
    dense = jnp.moveaxis(dense, -1, nd + axis)
    bs = values.block_size
    return dataclasses.replace(
        values,
        data=dense,
        block_size=None if bs is None else bs * t.m // t.n,
        length=t.length,
        packed=False,
    )


def check_sparse_leaves(t: NMSparseTensor) -> None:
    """Checks that the leaves of ``t`` fit each other; raises ValueError.

    ``values`` is an MXTensor (checked by :func:`jaxmx.tensor.check_leaves`'s
    rules through its block axis), ``indices`` uint8 with the shape of
    ``values`` but for the sparse axis, which holds the packed bytes of
    ``length * n // m`` indices.
    """
    if not isinstance(t.values, MXTensor):
        raise ValueError(f"NMSparseTensor.values must be an MXTensor, got {type(t.values)}")
    axis = t.sparse_axis()
    want = list(t.values.shape)
    want[axis] = packed_length(t.kept, index_bits(t.m))
    got = tuple(getattr(t.indices, "shape", ()))
    if np.dtype(getattr(t.indices, "dtype", None)) != np.uint8 or got != tuple(want):
        raise ValueError(
            f"NMSparseTensor.indices must be uint8 of shape {tuple(want)} ({t.kept} indices of "
            f"{index_bits(t.m)} bits packed along axis {axis}), got "
            f"{getattr(t.indices, 'dtype', type(t.indices))} {got}"
        )


# As MXTensor (jaxmx.tensor): an NMSparseTensor on an nnx Module is data.
if sys.modules.get("flax.nnx") is not None:
    sys.modules["flax.nnx"].register_data_type(NMSparseTensor)
