"""State codecs: how one optimizer-state tensor is stored compressed.

A codec turns a float32 tensor into a :class:`Compressed` pytree (codes plus
scales, with the codec and the shape as static metadata) and back. Four are
provided:

* :func:`blockwise` -- blocks of consecutive elements of the flattened
  tensor, each scaled by its absolute maximum and coded through a
  :class:`~jaxmx.optax.maps.QuantMap`. ``blockwise(dynamic_map(signed=True),
  256)`` and ``blockwise(dynamic_map(signed=False), 256)`` are the 8-bit
  optimizer states of bitsandbytes (Dettmers et al. 2022, "8-bit Optimizers
  via Block-wise Quantization", ICLR); ``blockwise(dynamic_map(signed=True,
  bits=4), 128)`` is the first moment of Li et al. 2023.
* :func:`rank1` -- the second moment of Li et al. 2023 ("Memory Efficient
  Optimizers with 4-bit States", NeurIPS, section 4.3): every element is
  scaled by the smallest of the maxima of its row and its column (for rank
  > 2, of every axis-slice through it), then coded with the linear map
  without zero. One-dimensional tensors fall back to blocks of 128, as in
  the reference implementation.
* :func:`mx` -- any registered jaxmx format (``jaxmx.quantize`` along the
  last axis): the OCP formats (MXFP8, MXINT8, ...), NVFP4, the shared
  microexponent formats (MX9, MX6, MX4, MSFP) and per-tensor FP8, each with
  its own default block size; every leaf of the ``MXTensor`` is kept.
* :func:`cast` -- a plain narrower float (bfloat16, float16), the precedent
  of optax's ``scale_by_adam(mu_dtype=...)``.

Every codec rounds to nearest (``rounding="nearest_even"``, the core's
name; ``"nearest"`` is an alias) or, where its format allows it,
stochastically (``rounding="stochastic"``); its :meth:`encode` then takes a
PRNG key. The map codecs (:func:`blockwise`, :func:`rank1`) have no "even"
value on their non-uniform tables: an exact tie goes to the smaller
magnitude, as in bitsandbytes and lpmm. Sub-byte codes are packed two per
byte. :class:`StateCodec` is the base class (``Codec`` is its old name).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxmx
from jaxmx.optax._mx_codec import mx
from jaxmx.optax._state import (
    Codec,
    Compressed,
    StateCodec,
    _check_block,
    _check_rounding,
)
from jaxmx.optax.maps import QuantMap, dynamic_map, linear_map

__all__ = ["StateCodec", "Codec", "Compressed", "blockwise", "rank1", "mx", "cast"]

_FLT_MIN = float(np.finfo(np.float32).tiny)  # 2**-126: smaller scales are treated as 0


def _rbits(key, shape):
    return None if key is None else jax.random.bits(key, shape, jnp.uint32)


def _encode_codes(qmap: QuantMap, n: jax.Array, rbits) -> jax.Array:
    """Codes of ``n`` along its last axis (even length); 4-bit codes two per byte.

    Two 4-bit codes share a byte, the even element in the low nibble. The
    pairs are formed by viewing the byte codes as uint16 (a bitcast, which
    XLA fuses into the encoding loop); strided slices of the codes run about
    ten times slower on XLA:CPU.
    """
    codes = qmap.encode(n, rbits)
    if qmap.bits != 4:
        return codes
    pairs = lax.bitcast_convert_type(codes.reshape(*codes.shape[:-1], -1, 2), jnp.uint16)
    return ((pairs & 0xF) | ((pairs >> 4) & 0xF0)).astype(jnp.uint8)


def _decode_codes(qmap: QuantMap, codes: jax.Array) -> jax.Array:
    """Map values of :func:`_encode_codes`' output (last axis doubled for 4 bits)."""
    if qmap.bits != 4:
        return qmap.decode(codes)
    pair = jnp.stack([qmap.decode(codes & 15), qmap.decode(codes >> 4)], axis=-1)
    return pair.reshape(*codes.shape[:-1], -1)


def _to_blocks(x: jax.Array, block: int) -> jax.Array:
    flat = x.reshape(-1)
    pad = -flat.size % block
    if pad:
        flat = jnp.pad(flat, (0, pad))
    return flat.reshape(-1, block)


def _from_blocks(blocks: jax.Array, shape) -> jax.Array:
    return blocks.reshape(-1)[: math.prod(shape)].reshape(shape)


def _absmax_encode(qmap: QuantMap, blocks: jax.Array, key):
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    # Multiply by the reciprocal, as bitsandbytes' kernel does; a block whose
    # maximum is below the float32 normal range holds nothing XLA:CPU does
    # not flush, so it codes as zeros.
    ok = absmax >= _FLT_MIN
    recip = jnp.where(ok, 1.0 / jnp.where(ok, absmax, 1.0), 0.0)
    codes = _encode_codes(qmap, blocks * recip[:, None], _rbits(key, blocks.shape))
    return codes, absmax


def _absmax_decode(qmap: QuantMap, codes, absmax):
    return _decode_codes(qmap, codes) * absmax[:, None]


@dataclasses.dataclass(frozen=True)
class Blockwise(StateCodec):
    """Block-wise absmax scaling with a quantization map (see :func:`blockwise`)."""

    qmap: QuantMap  # the value table codes index
    block_size: int  # consecutive elements of the flattened tensor sharing one scale
    rounding: str = "nearest_even"  # "nearest_even" (alias "nearest") or "stochastic"

    def __post_init__(self):
        if not isinstance(self.qmap, QuantMap):
            raise TypeError(f"qmap must be a QuantMap, got {type(self.qmap).__name__}")
        if self.qmap.bits not in (4, 8):
            raise ValueError(f"blockwise stores 4- or 8-bit codes, got a {self.qmap.bits}-bit map")
        _check_block(self.block_size)
        _check_rounding(self)

    def _encode(self, x, key):
        codes, absmax = _absmax_encode(self.qmap, _to_blocks(x, self.block_size), key)
        return codes, (absmax,)

    def _decode(self, codes, scales, shape):
        return _from_blocks(_absmax_decode(self.qmap, codes, scales[0]), shape)


@dataclasses.dataclass(frozen=True)
class Rank1(StateCodec):
    """Rank-1 normalization with the linear map without zero (see :func:`rank1`)."""

    bits: int = 4  # code width of the linear map
    block_size: int = 128  # block size used for 1-D tensors
    rounding: str = "nearest_even"  # "nearest_even" (alias "nearest") or "stochastic"

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"rank1 stores 4- or 8-bit codes, got bits={self.bits!r}")
        _check_block(self.block_size)
        _check_rounding(self)

    @property
    def qmap(self) -> QuantMap:
        return linear_map(bits=self.bits)

    def _encode(self, x, key):
        if x.ndim < 2 or x.size == 0:  # (no maxima of an empty axis-slice either)
            codes, absmax = _absmax_encode(self.qmap, _to_blocks(x, self.block_size), key)
            return codes, (absmax,)
        # Second moments are non-negative, so the maxima are taken of x itself:
        # an |x| pass would be a full extra read and write (XLA:CPU does not fuse
        # it into the reductions). Negative entries are taken as 0.
        maxima = tuple(
            jnp.max(x, axis=tuple(j for j in range(x.ndim) if j != i)) for i in range(x.ndim)
        )
        scale = _rank1_scale(maxima)
        ok = scale >= _FLT_MIN
        n = jnp.where(ok, jnp.maximum(x, 0.0) / jnp.where(ok, scale, 1.0), 0.0)
        if x.shape[-1] % 2:  # an odd last axis gets one zero column, cropped on decode
            n = jnp.pad(n, [(0, 0)] * (x.ndim - 1) + [(0, 1)])
        return _encode_codes(self.qmap, n, _rbits(key, n.shape)), maxima

    def _decode(self, codes, scales, shape):
        if len(shape) < 2 or math.prod(shape) == 0:
            return _from_blocks(_absmax_decode(self.qmap, codes, scales[0]), shape)
        n = _decode_codes(self.qmap, codes)[..., : shape[-1]]
        return n * _rank1_scale(scales)


def _rank1_scale(maxima) -> jax.Array:
    """``min_i maxima[i]`` broadcast along axis ``i``: the rank-1 scale of each element."""
    ndim = len(maxima)
    scale = None
    for i, m in enumerate(maxima):
        m = m.reshape((1,) * i + (-1,) + (1,) * (ndim - i - 1))
        scale = m if scale is None else jnp.minimum(scale, m)
    return scale


@dataclasses.dataclass(frozen=True)
class Cast(StateCodec):
    """A narrower float, elementwise (see :func:`cast`)."""

    dtype: jax.typing.DTypeLike = "bfloat16"  # "bfloat16" or "float16", kept as the name
    rounding: str = "nearest_even"  # "nearest_even" (alias "nearest") or "stochastic"

    def __post_init__(self):
        allowed = ("bfloat16", "float16")
        name = jnp.dtype(self.dtype).name if not isinstance(self.dtype, str) else self.dtype
        if name not in allowed:
            raise ValueError(f"cast stores {', '.join(allowed)}; got dtype {self.dtype!r}")
        object.__setattr__(self, "dtype", name)
        _check_rounding(self)

    def _encode(self, x, key):
        if key is not None:
            x = jaxmx.round_to(x, self.dtype, rounding="stochastic", key=key)
        return x.astype(self.dtype), ()

    def _decode(self, codes, scales, shape):
        return codes.astype(jnp.float32)


def blockwise(qmap: QuantMap, block_size: int = 256, *, rounding: str = "nearest") -> Blockwise:
    """Block-wise dynamic quantization (bitsandbytes; Li et al. for 4 bits).

    The tensor is flattened and cut into blocks of ``block_size`` (the last
    one zero-padded); each block stores its absolute maximum (float32) and
    one code per element: the map value nearest to ``x / absmax``.

    Args:
      qmap: a :func:`~jaxmx.optax.maps.dynamic_map` (or any 4/8-bit map).
      block_size: elements per block (256 in bitsandbytes, 128 in Li et al.).
      rounding: ``"nearest_even"`` (alias ``"nearest"``: the nearest map value,
        an exact tie to the smaller magnitude) or ``"stochastic"`` (unbiased
        between the two neighbouring map values).

    Returns:
      The codec.

    >>> import jax.numpy as jnp
    >>> codec = blockwise(dynamic_map(signed=True), 256)
    >>> x = jnp.linspace(-1.0, 1.0, 4096)
    >>> float(jnp.abs(codec.decode(codec.encode(x)) - x).max()) < 0.008
    True
    """
    return Blockwise(qmap=qmap, block_size=block_size, rounding=rounding)


def rank1(bits: int = 4, *, block_size: int = 128, rounding: str = "nearest") -> Rank1:
    """Rank-1 normalization plus the linear map without zero (Li et al. 2023).

    For a matrix, element ``(i, j)`` is scaled by ``min(max_k |x_ik|, max_k
    |x_kj|)`` and coded as the nearest of ``1/16, 2/16, ..., 1`` (4 bits).
    Inputs are second moments, non-negative; a negative entry is stored as 0
    (Li et al. take ``|x|``, which costs one more pass over the tensor here).
    Only the row and column maxima are stored besides the codes. Meant for
    second moments (non-negative); zero is not representable, so a tiny
    second moment decodes to at least 1/16 of its scale, never to 0.

    Args:
      bits: 4 (the paper) or 8.
      block_size: block size for 1-D tensors.
      rounding: ``"nearest_even"`` (alias ``"nearest"``) or ``"stochastic"``.

    Returns:
      The codec.

    >>> import jax.numpy as jnp
    >>> codec = rank1()
    >>> v = jnp.array([[4.0, 1.0], [0.01, 2.0]])
    >>> codec.decode(codec.encode(v))  # 0.01 keeps 1/16 of min(0.01's row max 2, col max 4)
    Array([[4.   , 1.   ],
           [0.125, 2.   ]], dtype=float32)
    """
    return Rank1(bits=bits, block_size=block_size, rounding=rounding)


def cast(dtype: jax.typing.DTypeLike = "bfloat16", *, rounding: str = "nearest") -> Cast:
    """A narrower float per element (bfloat16 or float16).

    >>> import jax.numpy as jnp
    >>> cast("bfloat16").encode(jnp.ones(3)).codes.dtype
    dtype(bfloat16)
    """
    return Cast(dtype=dtype, rounding=rounding)


# Presets: the codecs of each published scheme and the size rule it uses.
PRESETS: dict[str, dict] = {
    # bitsandbytes' Adam8bit: tensors with fewer than 4096 elements stay float32.
    "8bit": {
        "codecs": {
            "mu": blockwise(dynamic_map(signed=True, bits=8), 256),
            "nu": blockwise(dynamic_map(signed=False, bits=8), 256),
        },
        "min_size": 4096,
        "min_ndim": 0,
    },
    # Li et al. 2023 (lpmm defaults): more than 4096 elements and at least 2-D.
    "4bit": {
        "codecs": {"mu": blockwise(dynamic_map(signed=True, bits=4), 128), "nu": rank1(4)},
        "min_size": 4097,
        "min_ndim": 2,
    },
    # jaxmx: MX first moments, float32 second moments.
    "mxfp8": {"codecs": {"mu": mx("mxfp8")}, "min_size": 4096, "min_ndim": 1},
    "mxint8": {"codecs": {"mu": mx("mxint8")}, "min_size": 4096, "min_ndim": 1},
    # optax's mu_dtype precedent, both moments.
    "bf16": {
        "codecs": {"mu": cast("bfloat16"), "nu": cast("bfloat16")},
        "min_size": 1,
        "min_ndim": 0,
    },
}
