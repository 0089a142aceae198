"""The :func:`mx` state codec: any jaxmx format along the last axis, every leaf kept."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxmx
from jaxmx.optax._state import StateCodec, _check_rounding

__all__ = ["MX", "mx"]


@dataclasses.dataclass(frozen=True)
class MX(StateCodec):
    """A jaxmx format along the last axis, every MXTensor leaf kept (see :func:`mx`)."""

    # A registered format name, e.g. "mxfp8_e4m3", "nvfp4", "mx6", "tensor_fp8_e4m3"
    # (an unregistered MXFormat is held as the record itself).
    format: str
    # Elements per block along the last axis; None (given) means the format's
    # own (32 OCP, 16 NVFP4 and MX9/MX6/MX4/MSFP); stays None for per-tensor FP8.
    block_size: int | None = None
    scale_mode: str = "floor"  # jaxmx.quantize scale rule ("floor", "rceil", ...)
    rounding: str = "nearest_even"  # "nearest_even" (alias "nearest") or "stochastic"

    def __post_init__(self):
        fmt = jaxmx.get_format(self.format)  # ValueError names the known formats
        try:
            registered = jaxmx.get_format(fmt.name) == fmt
        except ValueError:
            registered = False
        object.__setattr__(self, "format", fmt.name if registered else fmt)
        if isinstance(self.block_size, tuple):
            raise ValueError(
                f"the state codec blocks along the last axis; got block_size={self.block_size!r} "
                "(2-D tiles are for matmul operands): pass an int or None (the format's own)"
            )
        _check_rounding(self)
        bs = fmt.block_size if self.block_size is None else self.block_size
        # Every other check is jaxmx.quantize's own, on a probe of one block.
        probe = jnp.zeros((bs if isinstance(bs, int) and bs > 0 else 1,), jnp.float32)
        jax.eval_shape(lambda: self._quantize(probe, self._probe_key(), bs))
        object.__setattr__(self, "block_size", None if bs is None else int(bs))

    def _probe_key(self):
        return jax.random.key(0) if self.stochastic else None

    def _quantize(self, x, key, block_size=None):
        return jaxmx.quantize(
            x,
            self.format,
            axis=-1,
            block_size=self.block_size if block_size is None else block_size,
            scale_mode=self.scale_mode,
            rounding=self.rounding if key is not None else "nearest_even",
            key=key,
            packed=True,
        )

    def _encode(self, x, key):
        if x.size == 0:  # nothing to store (per-tensor formats have no amax of nothing)
            return jnp.zeros(x.shape, jnp.uint8), ()
        t = self._quantize(_mx_input(self, x), key)
        data, *rest = jax.tree.leaves(t)  # data, then scale / tensor_scale / micro if present
        # Bytes, not float8/E8M0 arrays: every checkpoint backend stores uint8.
        return _as_bytes(data), tuple(_as_bytes(a) for a in rest)

    def _decode(self, codes, scales, shape):
        if math.prod(shape) == 0:
            return jnp.zeros(shape, jnp.float32)
        like_leaves, treedef = jax.tree.flatten(_mx_like(self, _mx_shape(self, shape)))
        leaves = [
            a if a.dtype == like.dtype else lax.bitcast_convert_type(a, like.dtype)
            for a, like in zip((codes, *scales), like_leaves, strict=True)
        ]
        y = jaxmx.dequantize(jax.tree.unflatten(treedef, leaves))
        n = shape[-1] if shape else 1
        if y.shape[-1] != n:  # zero padding of a partial block
            y = y[..., :n]
        return y.reshape(shape)


def _as_bytes(a: jax.Array) -> jax.Array:
    # One-byte codes of any dtype (float8, E8M0, int8) as uint8; the float32
    # tensor scale stays float32.
    if a.dtype == jnp.uint8 or np.dtype(a.dtype).itemsize != 1:
        return a
    return lax.bitcast_convert_type(a, jnp.uint8)


@functools.cache
def _full_blocks(codec: MX) -> bool:
    """Whether ``codec``'s format refuses a partial last block (NVFP4 does)."""
    bs = codec.block_size
    if bs is None:
        return False
    try:
        probe = jnp.zeros((bs + 1,), jnp.float32)
        jax.eval_shape(lambda: codec._quantize(probe, codec._probe_key()))
    except ValueError:  # every other argument passed the probe in __post_init__
        return True
    return False


def _mx_shape(codec: MX, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape handed to jaxmx.quantize: scalars as one element; for formats
    without partial blocks, the last axis zero-padded to whole blocks."""
    shape = tuple(shape) or (1,)
    if _full_blocks(codec) and shape[-1] % codec.block_size:
        shape = (*shape[:-1], shape[-1] + -shape[-1] % codec.block_size)
    return shape


def _mx_input(codec: MX, x: jax.Array) -> jax.Array:
    shape = _mx_shape(codec, x.shape)
    x = x.reshape(shape[:-1] + (x.shape[-1] if x.ndim else 1,))
    if x.shape[-1] != shape[-1]:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, shape[-1] - x.shape[-1])])
    return x


@functools.cache
def _mx_like(codec: MX, shape: tuple[int, ...]) -> jaxmx.MXTensor:
    # The static metadata (and leaf dtypes) of the MXTensor this codec writes.
    return jax.eval_shape(lambda: codec._quantize(jnp.zeros(shape, jnp.float32), None))


def mx(
    format: str = "mxfp8",
    *,
    block_size: int | None = None,
    scale_mode: str = "floor",
    rounding: str = "nearest",
) -> MX:
    """Any jaxmx format (``jaxmx.quantize`` along the last axis, codes packed).

    Decoding gives ``jaxmx.dequantize(jaxmx.quantize(x, format, axis=-1,
    block_size=block_size, ...))`` bit for bit: every leaf of the
    ``MXTensor`` is stored (codes, block scales, NVFP4's and per-tensor FP8's
    float32 tensor scale, MX9/MX6/MX4's microexponents). Shapes
    ``jaxmx.quantize`` does not take are stored as follows: a scalar as a
    one-element vector; a format without partial blocks (NVFP4) gets its
    last axis zero-padded to whole blocks, which is how jaxmx defines a
    partial block for the other formats (zeros change neither a block's nor
    the tensor's amax), the padding cropped on decode; a tensor with no
    elements stores nothing.

    Args:
      format: any :func:`jaxmx.list_formats` name or alias (or a registered
        :class:`~jaxmx.MXFormat`).
      block_size: elements per shared scale; None (default) is the format's
        own: 32 for the OCP formats, 16 for NVFP4 and MX9/MX6/MX4/MSFP, none
        for per-tensor FP8. The OCP formats and NVFP4 take other sizes.
      scale_mode: the shared-exponent rule of :func:`jaxmx.quantize` (the
        OCP formats; the others have their own rule and take ``"floor"``).
      rounding: ``"nearest_even"`` (alias ``"nearest"``) or ``"stochastic"``
        (OCP formats and NVFP4).

    Returns:
      The codec.

    Raises:
      ValueError / TypeError: what :func:`jaxmx.quantize` refuses for this
        format (a block size its family does not take, a rounding or scale
        rule it does not define), or an unknown format.

    >>> import jax.numpy as jnp
    >>> c = mx("mxint8").encode(jnp.linspace(-1.0, 1.0, 64))
    >>> c.nbytes  # 64 one-byte codes and 2 scale bytes
    66
    >>> c = mx("nvfp4").encode(jnp.linspace(-1.0, 1.0, 64))
    >>> c.nbytes  # 32 bytes of 4-bit codes, 4 E4M3 scales, a float32 tensor scale
    40
    """
    return MX(format=format, block_size=block_size, scale_mode=scale_mode, rounding=rounding)
