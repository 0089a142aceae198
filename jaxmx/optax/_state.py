"""The state codec base: :class:`StateCodec` and the :class:`Compressed` pytree it writes."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxmx.optax import _util

__all__ = ["Codec", "Compressed", "StateCodec"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Compressed:
    """One compressed state tensor: a pytree of codes and scales.

    Attributes:
      codes: uint8 codes (sub-byte codes packed two per byte), or the
        narrower float values for :func:`~jaxmx.optax.cast`.
      scales: the scale arrays: per-block absolute maxima (float32), the
        per-axis maxima of a rank-1 codec, or for :func:`~jaxmx.optax.mx` the other leaves
        of the ``MXTensor`` in its order: the block scale bytes (absent for
        per-tensor FP8), the float32 tensor scale (NVFP4, per-tensor FP8) and
        the microexponent bytes (MX9, MX6, MX4).
      codec: the :class:`StateCodec` that wrote it (static).
      shape: shape of the tensor it stands for (static).

    >>> import jax.numpy as jnp, jaxmx.optax as jo
    >>> c = jo.blockwise(jo.dynamic_map(signed=True), 256).encode(jnp.ones((64, 64)))
    >>> c.codes.shape, c.codes.dtype, c.scales[0].shape, c.nbytes
    ((16, 256), dtype('uint8'), (16,), 4160)
    """

    codes: jax.Array
    scales: tuple[jax.Array, ...]
    codec: StateCodec = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    @property
    def nbytes(self) -> int:
        """Bytes held by the codes and scales."""
        return sum(_nbytes(a) for a in (self.codes, *self.scales))

    @property
    def size(self) -> int:
        """Elements of the tensor it stands for."""
        return math.prod(self.shape)


def _nbytes(a) -> int:
    return math.prod(a.shape) * np.dtype(a.dtype).itemsize


def _check_rounding(codec) -> None:
    # Canonical name stored, so that "nearest" and "nearest_even" make equal codecs.
    object.__setattr__(codec, "rounding", _util.rounding(codec.rounding))


def _check_block(block_size, what="block_size") -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(f"{what} must be a positive int, got {block_size!r}")
    if block_size < 2 or block_size % 2:
        raise ValueError(f"{what} must be an even int >= 2, got {block_size}")
    return int(block_size)


class StateCodec:
    """Base class of the state codecs (frozen dataclasses, hashable).

    ``Codec`` is the same class under its earlier name.

    Subclasses implement ``_encode(x, rbits_or_key) -> (codes, scales)`` and
    ``_decode(codes, scales, shape) -> float32``; :meth:`encode` and
    :meth:`decode` add the checks and the :class:`Compressed` wrapper.
    """

    rounding: str

    @property
    def stochastic(self) -> bool:
        """Whether encoding needs a PRNG key."""
        return self.rounding == "stochastic"

    def encode(self, x: jax.Array, key: jax.Array | None = None) -> Compressed:
        """Compresses a float tensor.

        Args:
          x: float32 (or narrower float) array.
          key: PRNG key, required when the codec rounds stochastically.

        Returns:
          A :class:`Compressed` pytree.
        """
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{type(self).__name__} encodes float arrays, got dtype {x.dtype}")
        if self.stochastic and key is None:
            raise ValueError(f"{self!r} rounds stochastically: pass key=jax.random.key(...)")
        codes, scales = _encode(self, x.astype(jnp.float32), key if self.stochastic else None)
        return Compressed(codes=codes, scales=tuple(scales), codec=self, shape=tuple(x.shape))

    def decode(self, c: Compressed) -> jax.Array:
        """The float32 tensor a :class:`Compressed` stands for."""
        if not isinstance(c, Compressed):
            raise TypeError(f"decode expects a Compressed, got {type(c).__name__}")
        return _decode(self, c.codes, c.scales, c.shape)

    def _encode(self, x, key):
        raise NotImplementedError

    def _decode(self, codes, scales, shape):
        raise NotImplementedError


Codec = StateCodec  # the earlier name, kept


# Jitted entry points (inlined under an outer jit): called eagerly, e.g. by an
# optimizer's init, each codec compiles once instead of dispatching op by op.
@functools.partial(jax.jit, static_argnums=0)
def _encode(codec: StateCodec, x, key):
    return codec._encode(x, key)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _decode(codec: StateCodec, codes, scales, shape):
    return codec._decode(codes, scales, shape)
