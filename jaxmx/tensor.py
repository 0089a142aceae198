"""The MXTensor pytree: element codes plus one scale per block."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxmx._leaf_dtypes import check_leaf_dtypes, is_leaf_array
from jaxmx.blocks import packed_length
from jaxmx.formats import MXFormat, get_family

__all__ = ["MXTensor", "check_leaves"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MXTensor:
    """A tensor in an MX format: element codes and per-block scales.

    Made by :func:`jaxmx.quantize`; read back with :func:`jaxmx.dequantize`.
    The two arrays are pytree leaves, everything else is static metadata, so
    an MXTensor passes through ``jit``, ``vmap``, ``scan`` and sharding like
    any pair of arrays.

    Attributes:
      data: element codes. FP8 and FP4 use their ml_dtypes dtype
        (``float8_e4m3fn``, ``float8_e5m2``, ``float4_e2m1fn``), except FP4
        on CPU, where XLA:CPU mishandles 4-bit arrays and the code is held in
        a uint8 (see :func:`jaxmx.codes.storage_dtype`); FP6 codes (which XLA
        cannot hold) are uint8 with the sign in bit 5; MXINT codes
        are int8 holding the two's-complement integer. When ``packed``, the
        codes of sub-byte formats are packed into uint8 along the quantized
        axis (see :func:`jaxmx.pack`). Codes of a block with a NaN scale are 0.
      scale: per-block scales in the format's scale dtype
        (``float8_e8m0fnu`` for the OCP and BDR formats, ``float8_e4m3fn``
        for NVFP4), shaped like the input with the quantized axis replaced
        by the number of blocks (for 2-D tiles, both tiled axes); ``None``
        for per-tensor formats.
      format: the :class:`~jaxmx.MXFormat`.
      axis: the quantized axis, counted from the end (negative), as it was
        when the tensor was made. ``vmap`` can insert or remove axes anywhere,
        so consumers never trust it blindly: :meth:`block_axis` checks it
        against the shapes of ``data`` and ``scale`` (which differ only along
        the block axis) and finds the block axis from them when it went stale.
      block_size: elements per block along ``axis``; the last block may be
        partial. A pair ``(rows, columns)`` for 2-D tiles over the last two
        axes (NVFP4 weights); ``None`` for per-tensor formats.
      length: size of the quantized axis of the original tensor.
      dtype: dtype of the original tensor.
      packed: whether ``data`` holds packed sub-byte codes.
      tensor_scale: float32 scalar, the per-tensor decode scale of formats
        that have one (NVFP4: ``1 / S_enc``; per-tensor FP8: ``amax /
        max_normal``); ``None`` otherwise.
      micro: uint8 microexponent bits (MX9/MX6/MX4), the quantized axis
        replaced by blocks times groups per block (packed: 8 bits per
        byte); ``None`` otherwise.
      made_ndim: rank of the leaves when the tensor was made (``None``:
        unknown). Only consulted when the block axis holds as many codes (or
        packed bytes) as blocks, e.g. ``block_size=1``: ``vmap`` or ``scan``
        over such an axis leaves leaves whose shapes look like a valid tensor
        of other shape, so a changed rank is refused there instead of guessed.

    Example:

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.linspace(-1.0, 1.0, 64).reshape(2, 32), "mxfp4")
    >>> t.shape, t.scale.shape  # on CPU t.data holds the 4-bit codes in uint8
    ((2, 32), (2, 1))
    """

    data: jax.Array
    scale: jax.Array
    format: MXFormat = dataclasses.field(metadata=dict(static=True))
    axis: int = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))
    length: int = dataclasses.field(metadata=dict(static=True))
    dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
    packed: bool = dataclasses.field(default=False, metadata=dict(static=True))
    made_ndim: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    tensor_scale: jax.Array | None = None
    micro: jax.Array | None = None

    def __post_init__(self):
        # dtypes and presence only, of leaves that are arrays: JAX rebuilds
        # MXTensors with placeholder leaves while it transforms them, and a
        # shape check here would refuse tracers whose batch axes are removed.
        if isinstance(self.format, MXFormat):
            check_leaf_dtypes(self)

    def block_axis(self) -> int:
        """The axis (negative) along which blocks run, read off the leaves' shapes.

        ``data`` and ``scale`` have the same rank and agree on every axis but
        the block axis, where ``data`` holds ``length`` codes (or their packed
        bytes) and ``scale`` one entry per block. Under ``vmap`` the stored
        ``axis`` can point at the wrong axis (a batch axis inserted after the
        block axis shifts it); the shapes cannot, since ``vmap`` inserts and
        removes the same axis in both leaves.

        Raises:
          ValueError: the leaves' shapes fit no block axis, or fit several
            and the stored one is not among them.
        """
        dshape = tuple(self.data.shape)
        nd = len(dshape)
        if self.scale is None or isinstance(self.block_size, tuple):
            return self._fixed_axis(dshape)
        sshape = tuple(self.scale.shape)
        want = (_stored_length(self), self.num_blocks)
        if want[0] == want[1] and self.made_ndim not in (None, nd):
            raise ValueError(
                f"this {self.format.name} MXTensor was made with rank {self.made_ndim} and its "
                f"leaves now have rank {nd} (data {dshape}, scale {sshape}): vmap or scan "
                "removed or added an axis. Its block axis holds as many "
                f"{'packed bytes' if self.packed else 'codes'} as blocks ({want[0]}), so a map "
                "over the block axis cannot be told from one over another axis; quantize "
                "inside the map, or use a block size whose blocks hold more "
                f"{'bytes' if self.packed else 'codes'} than one"
            )
        if len(sshape) == nd and nd > 0:
            fits = [
                a - nd
                for a in range(nd)
                if (dshape[a], sshape[a]) == want
                and all(dshape[i] == sshape[i] for i in range(nd) if i != a)
            ]
            if self.axis in fits:
                return self.axis
            if len(fits) == 1 or (fits and want[0] == want[1] and not self.packed):
                # Several fits with one code per block: every choice decodes alike.
                return fits[0]
        raise ValueError(
            f"cannot tell the block axis of this {self.format.name} MXTensor: data shape "
            f"{dshape} and scale shape {sshape} (length {self.length}, block_size "
            f"{self.block_size}{', packed' if self.packed else ''}) fit "
            f"{'no axis' if not len(sshape) == nd else 'several axes'}; an MXTensor mapped by "
            "vmap over its block axis, or with leaves replaced by other shapes, is not valid"
        )

    def _fixed_axis(self, dshape: tuple[int, ...]) -> int:
        # Per-tensor formats (no block scale) and 2-D tiles (always the last
        # two axes): the axis is the stored one, checked against the leaves.
        nd = len(dshape)
        ok = -nd <= self.axis < 0 and dshape[self.axis] == _stored_length(self)
        if ok and isinstance(self.block_size, tuple):
            want = list(dshape)
            want[-1] = self.num_blocks
            want[-2] = -(-dshape[-2] // self.block_size[0])
            ok = nd >= 2 and self.axis == -1 and tuple(self.scale.shape) == tuple(want)
        if not ok:
            raise ValueError(
                f"this {self.format.name} MXTensor's leaves do not fit its metadata: data "
                f"shape {dshape}, scale shape "
                f"{None if self.scale is None else tuple(self.scale.shape)}, axis {self.axis}, "
                f"length {self.length}, block_size {self.block_size}"
            )
        return self.axis

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the tensor this represents (of the dequantized array)."""
        shape = list(self.data.shape)
        shape[self.block_axis()] = self.length
        return tuple(shape)

    @property
    def ndim(self) -> int:
        return len(self.data.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        """Blocks along the quantized axis (1 for per-tensor formats)."""
        if self.block_size is None:
            return 1
        bs = self.block_size[-1] if isinstance(self.block_size, tuple) else self.block_size
        return -(-self.length // bs)

    @property
    def nbytes(self) -> int:
        """Bytes really held by the leaves: codes, scales, tensor scale, microexponents."""
        leaves = (self.data, self.scale, self.tensor_scale, self.micro)
        return sum(_nbytes(a) for a in leaves if a is not None)

    @property
    def bits_per_element(self) -> float:
        """Stored bits per represented element, scales included."""
        return 8 * self.nbytes / max(self.size, 1)

    def __repr__(self) -> str:
        try:
            shape = self.shape
            nbytes = f", nbytes={self.nbytes}"
        except Exception:  # leaves replaced by placeholders inside JAX transforms
            shape, nbytes = "?", ""
        return (
            f"MXTensor({self.format.name}, shape={shape}, dtype={np.dtype(self.dtype).name}, "
            f"axis={self._axis_for_repr()}, block_size={self.block_size!r}"
            f"{', packed' if self.packed else ''}{nbytes})"
        )

    def _axis_for_repr(self):
        try:
            return self.block_axis()
        except Exception:
            return self.axis

    def canonical(self) -> MXTensor:
        """This tensor with ``axis`` set to the block axis its leaves show."""
        axis = self.block_axis()
        return self if axis == self.axis else dataclasses.replace(self, axis=axis)

    # Array-like operations, exact on codes and scales (rules in jaxmx.array_ops).

    @property
    def T(self) -> MXTensor:
        """The tensor with its axes reversed; the block axis moves with them."""
        return _op("transpose")(self)

    def transpose(self, *axes: int | Sequence[int] | None) -> MXTensor:
        """Permutes axes: ``t.transpose(1, 0)`` or ``t.transpose((1, 0))``."""
        return _op("transpose")(self, _varargs(axes))

    def swapaxes(self, axis1: int, axis2: int) -> MXTensor:
        """Swaps two axes (see :func:`jaxmx.swapaxes`)."""
        return _op("swapaxes")(self, axis1, axis2)

    def reshape(self, *shape: int | Sequence[int]) -> MXTensor:
        """Reshapes keeping blocks whole: ``t.reshape(2, -1)`` (see :func:`jaxmx.reshape`)."""
        return _op("reshape")(self, _varargs(shape))

    def take(
        self, indices: jax.typing.ArrayLike, axis: int | None = None, *, mode: str | None = None
    ) -> MXTensor:
        """Gathers along an axis, e.g. rows of an MX embedding table (see :func:`jaxmx.take`)."""
        return _op("take")(self, indices, axis, mode=mode)

    def __getitem__(self, idx) -> MXTensor:
        return _op("getitem")(self, idx)

    # NumPy operators defer to ours (``np.float32(2) * t`` reaches __rmul__).
    __array_ufunc__ = None

    def __array__(self, *args, **kwargs):
        raise TypeError(
            f"an MXTensor ({self.format.name}) is not a NumPy array: call t.dequantize() "
            "(or jaxmx.dequantize) for its values"
        )

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self):
        # Explicit, so that iteration stops: indexing past the end would not.
        return (self[i] for i in range(len(self)))

    def __neg__(self) -> MXTensor:
        return _op("negative")(self)

    def __pos__(self) -> MXTensor:
        return self

    def __abs__(self) -> MXTensor:
        return _op("absolute")(self)

    def __mul__(self, other) -> MXTensor:
        return _op("multiply")(self, other)

    __rmul__ = __mul__

    def __truediv__(self, other) -> MXTensor:
        return _op("multiply")(self, _reciprocal_pow2(other))

    def ldexp(self, k: jax.typing.ArrayLike) -> MXTensor:
        """``self * 2**k`` exactly, by moving the scales (see :func:`jaxmx.ldexp`)."""
        return _op("ldexp")(self, k)

    def astype(self, dtype: jax.typing.DTypeLike) -> MXTensor:
        """The same codes and scales, standing for ``dtype`` (float32/bfloat16/float16)."""
        return _op("astype")(self, dtype)

    def dequantize(self, dtype: jax.typing.DTypeLike | None = None) -> jax.Array:
        """Decodes to ``dtype``, by default ``self.dtype`` (see :func:`jaxmx.dequantize`)."""
        return _op("dequantize")(self, self.dtype if dtype is None else dtype)


# MXTensor's array-like methods are implemented by the layers above it
# (jaxmx.array_ops, jaxmx.quantize), which register them here when they are
# imported: this module imports nothing above itself.
_OPS: dict[str, Callable] = {}


def register_ops(**fns: Callable) -> None:
    """Attaches implementations of MXTensor's methods (``transpose=...``, ``dequantize=...``)."""
    _OPS.update(fns)


def _op(name: str) -> Callable:
    try:
        return _OPS[name]
    except KeyError:
        raise RuntimeError(
            f"MXTensor.{name} is implemented in jaxmx.array_ops / jaxmx.quantize; import jaxmx"
        ) from None


def _varargs(args: tuple):
    """``f(1, 0)`` and ``f((1, 0))`` alike, as NumPy's methods take them; ``f()`` is None."""
    if not args:
        return None
    return args[0] if len(args) == 1 and not isinstance(args[0], (int, np.integer)) else args


def _reciprocal_pow2(c):
    # Only concrete scalars can be inverted exactly here; everything else is
    # passed on so that multiply's checks report it.
    if isinstance(c, (int, float, np.integer, np.floating)) and not isinstance(c, bool) and c:
        v = float(c)
        if abs(v) != float("inf"):
            m, _ = math.frexp(v)
            if abs(m) == 0.5:
                return 1.0 / v  # exact for a power of two
    return c


def _stored_length(t: MXTensor) -> int:
    """Entries of ``data`` along the block axis: codes, or packed bytes."""
    if not t.packed:
        return t.length
    return packed_length(t.length, t.format.element.bits)


def _nbytes(a) -> int:
    return math.prod(a.shape) * np.dtype(a.dtype).itemsize


# --------------------------------------------------------------------------
# Leaves against the format.
# --------------------------------------------------------------------------


def check_leaves(t: MXTensor) -> None:
    """Checks that the leaves of ``t`` are what its format holds; raises ValueError.

    * dtypes: codes in the element's storage dtype (4-bit float codes also
      in uint8, as CPU holds them; uint8 when ``packed``), block scales in
      the scale format's dtype, ``tensor_scale`` float32, ``micro`` uint8;
    * presence: ``scale``, ``tensor_scale`` and ``micro`` exist exactly when
      the format has block scales, a tensor scale and microexponents;
    * static fields: the block size the format's family takes, ``packed``
      only for formats that pack;
    * shapes: ``data`` and ``scale`` fit one block axis
      (:meth:`MXTensor.block_axis`); ``tensor_scale`` is a scalar, or the
      leading (batch) axes of ``data`` for a tensor made under ``vmap``;
      ``micro`` is ``data`` with the block axis holding the microexponent
      groups (their bytes when packed).

    Shapes and dtypes only, never values: no device sync. Constructing an
    MXTensor checks the dtypes and presence of leaves that are arrays (JAX
    rebuilds MXTensors with placeholder leaves while it transforms them);
    :func:`jaxmx.load` runs the whole check on every MXTensor it rebuilds.

    >>> import dataclasses, jax.numpy as jnp, jaxmx
    >>> from jaxmx.tensor import check_leaves
    >>> t = jaxmx.quantize(jnp.ones((4, 64)), "mxfp8")
    >>> check_leaves(t)
    >>> check_leaves(dataclasses.replace(t, scale=t.scale[:, :1]))
    Traceback (most recent call last):
    ...
    ValueError: cannot tell the block axis of this mxfp8_e4m3 MXTensor: ...
    """
    if not isinstance(t, MXTensor):
        raise TypeError(f"check_leaves expects an MXTensor, got {type(t).__name__}")
    fmt = t.format
    if not isinstance(fmt, MXFormat):
        raise ValueError(f"an MXTensor's format must be an MXFormat, got {type(fmt).__name__}")
    for name in ("data", "scale", "tensor_scale", "micro"):
        leaf = getattr(t, name)
        if leaf is not None and not is_leaf_array(leaf):
            raise ValueError(
                f"this {fmt.name} MXTensor's {name} is a {type(leaf).__name__}, not an array"
            )
    check_leaf_dtypes(t)
    _check_static(t)
    axis = t.block_axis()  # data against scale (or the stored axis, per-tensor)
    shape = tuple(t.data.shape)
    if t.tensor_scale is not None:
        ts = tuple(t.tensor_scale.shape)
        batch = len(shape) + (-2 if isinstance(t.block_size, tuple) else axis)
        if len(ts) > batch or ts != shape[: len(ts)]:
            raise ValueError(
                f"this {fmt.name} MXTensor's tensor_scale has shape {ts}; with data of shape "
                f"{shape} it must be a scalar, or the leading (vmap) axes of data before the "
                f"block axis {axis}"
            )
    if t.micro is not None:
        groups = t.num_blocks * (t.block_size // fmt.micro.group)
        want = list(shape)
        want[axis] = packed_length(groups, 1) if t.packed else groups
        if tuple(t.micro.shape) != tuple(want):
            raise ValueError(
                f"this {fmt.name} MXTensor's micro has shape {tuple(t.micro.shape)}; its "
                f"{groups} microexponent groups along axis {axis} need {tuple(want)}"
                f"{' (packed, 8 per byte)' if t.packed else ''}"
            )


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _whole(v, least: int) -> bool:
    return _is_int(v) and v >= least


def _check_static(t: MXTensor) -> None:
    fmt, bs = t.format, t.block_size
    kind = get_family(fmt).rules.block_sizes

    if kind == "tensor":
        ok = bs is None
    elif kind == "fixed":
        ok = _whole(bs, 1) and bs == fmt.block_size
    elif isinstance(bs, tuple):
        ok = kind == "tiles" and len(bs) == 2 and all(_whole(b, 1) for b in bs)
    else:
        ok = _whole(bs, 1)
    if not ok:
        allowed = {
            "tensor": "None (one scale per tensor)",
            "fixed": f"{fmt.block_size} (the format's own)",
            "tiles": "a positive int or a pair of them (2-D tiles)",
            "any": "a positive int",
        }[kind]
        raise ValueError(
            f"this {fmt.name} MXTensor has block_size {bs!r}; {fmt.name} takes {allowed}"
        )
    if not isinstance(t.packed, (bool, np.bool_)) or (t.packed and not fmt.packable):
        raise ValueError(
            f"this {fmt.name} MXTensor has packed={t.packed!r}; only formats with sub-byte codes "
            "or microexponents pack (packed must be True or False)"
        )
    if not _whole(t.length, 0) or not _is_int(t.axis):
        raise ValueError(
            f"this {fmt.name} MXTensor has length {t.length!r} and axis {t.axis!r}; both must be "
            "ints, the length not negative"
        )
    made = t.made_ndim
    if made is not None and not _whole(made, 0):
        raise ValueError(f"this {fmt.name} MXTensor has made_ndim {made!r}; an int or None")
    try:
        floating = jax.dtypes.issubdtype(np.dtype(t.dtype), np.floating)
    except TypeError:
        floating = False
    if not floating:
        raise ValueError(
            f"this {fmt.name} MXTensor stands for a {t.dtype!r} array; MXTensors stand for "
            "float arrays"
        )


# nnx (Flax) treats attribute values of unregistered types as static: an
# MXTensor assigned to a Module attribute must be data, like an array. The
# core does not import flax; jaxmx.flax registers it on import, and this
# covers flax loaded before jaxmx.
if sys.modules.get("flax.nnx") is not None:
    sys.modules["flax.nnx"].register_data_type(MXTensor)
