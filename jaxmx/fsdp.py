"""Fully-sharded data parallelism with MX weights: gather codes and scales, not floats.

Under FSDP every device holds a slice of each weight, and a matmul first
all-gathers the whole weight. When the matmul multiplies MX values anyway,
what needs to cross the wire is the MX copy: each device quantizes its own
slice (blocks along the matmul's contraction axis, every block inside the
slice), the codes (packed for sub-byte formats) and the block scales are
all-gathered, and the whole weight is decoded only after the gather. An
MXFP8 weight then moves about 8.25 bits per element instead of bfloat16's
16, an MXFP4 weight about 4.25.

Quantizing per slice is quantizing the whole: a block is quantized from its
own values only, and no block straddles two slices (checked; the error names
the slice length and the block size). So the gathered MX weight equals the
MX weight quantized unsharded, code for code.

* :func:`fsdp_gather` does this for one weight, explicitly.
* ``DotConfig(fsdp="data")`` makes :func:`jaxmx.dot_general` (and
  :func:`jaxmx.einsum`) do it for the weight (``rhs``) of the forward and of
  the input-gradient matmul, each quantized along its own contraction. The
  weight-gradient matmul does not read the weight.
* :func:`fsdp_shardings` lays out parameters (and optimizer state) the way
  the quantized dot expects them: each array cut along :func:`fsdp_axis`.

The mesh is the one set with ``jax.set_mesh`` (or given as ``mesh=``);
collectives are JAX's (``jax.shard_map`` and ``lax.all_gather``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from jaxmx._bitmove import move
from jaxmx._operand import operand_implementation, operand_spec, random_bits
from jaxmx.config import DotConfig
from jaxmx.formats import MXFormat
from jaxmx.packing import pack, unpack
from jaxmx.quantize import check_array, dequantize, quantize_spec
from jaxmx.shards import mx_shardings
from jaxmx.spec import QuantSpec
from jaxmx.tensor import MXTensor

__all__ = ["FSDP_GRANULE", "fsdp_axis", "fsdp_shardings", "fsdp_gather"]

FSDP_GRANULE = 32
"""A sharded axis is cut into slices whose length is a multiple of this (the
MX block size of the OCP formats), so that blocks of 32 (or of any divisor
of 32) along it stay whole."""


def fsdp_axis(shape: Sequence[int], shards: int, granule: int = FSDP_GRANULE) -> int | None:
    """The axis FSDP cuts an array of ``shape`` along, over ``shards`` devices.

    The longest axis whose length is a multiple of ``shards * granule`` (the
    first of equals); ``None`` when no axis is, and the array stays whole on
    every device. A function of the shape alone, so a parameter, its Adam
    moments and the quantized dot that gathers it agree without being told.

    >>> from jaxmx.fsdp import fsdp_axis
    >>> fsdp_axis((128, 512), 4), fsdp_axis((2, 64, 128), 4), fsdp_axis((65,), 4)
    (1, 2, None)
    """
    best = None
    for i, n in enumerate(shape):
        if n % (shards * granule) == 0 and n > 0 and (best is None or n > shape[best]):
            best = i
    return best


def _spec(ndim: int, axis: int | None, mesh_axis: str) -> PartitionSpec:
    if axis is None:
        return PartitionSpec()
    return PartitionSpec(*(mesh_axis if i == axis else None for i in range(ndim)))


def fsdp_shardings(tree: Any, mesh: jax.sharding.Mesh, mesh_axis: str = "data") -> Any:
    """A ``NamedSharding`` per array leaf of ``tree``: cut along :func:`fsdp_axis`.

    Leaves with no such axis (biases shorter than ``shards * 32``, scalars
    such as an optimizer's step count) are replicated. An MXTensor is cut
    as a whole, along the :func:`fsdp_axis` of its shape, its codes and
    scales alike (:func:`jaxmx.mx_shardings`, which keeps blocks whole).

    Args:
      tree: a pytree of arrays, ``jax.ShapeDtypeStruct`` or MXTensors
        (parameters, quantized weights, optimizer state).
      mesh: the device mesh.
      mesh_axis: the mesh axis to shard over (FSDP shares it with data
        parallelism).

    Returns:
      A pytree of ``NamedSharding`` of the same structure.

    >>> import jax, jax.numpy as jnp, jaxmx
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> s = jaxmx.fsdp_shardings({"kernel": jnp.zeros((64, 8)), "bias": jnp.zeros(8)}, mesh)
    >>> s["kernel"].spec, s["bias"].spec
    (P('data', None), P())
    """
    shards = _axis_size(mesh, mesh_axis)

    def one(leaf):
        shape = tuple(leaf.shape) if isinstance(leaf, MXTensor) else tuple(jnp.shape(leaf))
        spec = _spec(len(shape), fsdp_axis(shape, shards), mesh_axis)
        if isinstance(leaf, MXTensor):
            return mx_shardings(leaf, mesh, spec)
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, MXTensor))


def _axis_size(mesh, mesh_axis: str) -> int:
    names = tuple(getattr(mesh, "axis_names", ()))
    if mesh_axis not in names:
        raise ValueError(
            f"mesh axis {mesh_axis!r} is not an axis of the mesh; its axes are {names or 'none'}"
            + ("" if names else " (no mesh is set: call under `with jax.set_mesh(mesh):`)")
        )
    return int(dict(zip(names, mesh.axis_sizes, strict=True))[mesh_axis])


def _context_mesh(mesh, mesh_axis: str, who: str):
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if not getattr(mesh, "axis_names", ()):
            raise ValueError(
                f"{who} shards over mesh axis {mesh_axis!r}, but no mesh is set: run it under "
                "`with jax.set_mesh(mesh):` (or pass mesh=)"
            )
    _axis_size(mesh, mesh_axis)
    return mesh


def _check_cut(shape, spec: QuantSpec, shard_axis: int, shards: int, mesh_axis: str, who: str):
    ndim = len(shape)
    length = shape[shard_axis]
    if length % shards:
        raise ValueError(
            f"{who}: axis {shard_axis} of the weight (shape {tuple(shape)}) has length {length}, "
            f"which the {shards} devices of mesh axis {mesh_axis!r} do not divide; allowed: an "
            f"axis whose length is a multiple of {shards}"
        )
    if spec.tiles:
        raise ValueError(
            f"{who}: 2-D tiles (block_size {spec.block_size}) are not gathered per shard; "
            "allowed: blocks along one axis (an int block size)"
        )
    if shard_axis == spec.axis + ndim and spec.block_size is not None:
        piece = length // shards
        if piece % spec.block_size:
            raise ValueError(
                f"{who}: the weight (shape {tuple(shape)}) is quantized in blocks of "
                f"{spec.block_size} along axis {shard_axis}, which mesh axis {mesh_axis!r} "
                f"cuts into {shards} shards of {piece}: a block would straddle two shards. "
                f"Allowed: shard lengths that are multiples of the block size {spec.block_size} "
                f"(an axis length that is a multiple of {shards * spec.block_size}), a block size "
                f"dividing {piece}, or a shard axis that is not the block axis"
            )


def _all_gather(a, mesh_axis: str, axis: int):
    """``lax.all_gather`` of ``a``'s bits: floats (FP8 codes, E8M0 scales,
    bfloat16) travel as unsigned integers of their width (:mod:`jaxmx._bitmove`)."""
    return move(a, lambda b: lax.all_gather(b, mesh_axis, axis=axis, tiled=True))


def _gather(
    x,
    rbits,
    spec: QuantSpec,
    shard_axis: int,
    mesh_axis: str,
    mesh,
    packed: bool,
    who,
    implementation: str = "xla",
):
    """Quantizes each shard of ``x`` (cut along ``shard_axis``) with ``spec``,
    all-gathers its codes and scales, and returns the whole MXTensor
    (replicated, packed if ``packed``)."""
    shards = _axis_size(mesh, mesh_axis)
    _check_cut(x.shape, spec, shard_axis, shards, mesh_axis, who)
    ndim = x.ndim
    block_axis = spec.axis + ndim
    in_spec = _spec(ndim, shard_axis, mesh_axis)

    def local(xs, bits):
        t = quantize_spec(xs, bits, None, spec, implementation)
        if t.tensor_scale is not None:
            raise ValueError(
                f"{who}: {spec.format.name} has a per-tensor scale, computed from the whole "
                "tensor, so a shard cannot be quantized on its own; allowed: formats with "
                "block scales only (the OCP MX formats, MX9/MX6/MX4)"
            )
        if packed:
            t = pack(t)
        whole = jax.tree.map(lambda a: _all_gather(a, mesh_axis, shard_axis), t)
        length = t.length * shards if shard_axis == block_axis else t.length
        return dataclasses.replace(whole, length=length)

    # Every device ends with the same gathered arrays, which shard_map cannot
    # infer for lax.all_gather: check_vma=False and out_specs P().
    kwargs = dict(mesh=mesh, out_specs=PartitionSpec(), check_vma=False)
    if rbits is None:
        return jax.shard_map(lambda xs: local(xs, None), in_specs=(in_spec,), **kwargs)(x)
    return jax.shard_map(local, in_specs=(in_spec, in_spec), **kwargs)(x, rbits)


def _gather_plain(x, shard_axis: int, mesh_axis: str, mesh):
    """``x`` all-gathered as it is (no quantization), replicated."""
    shards = _axis_size(mesh, mesh_axis)
    if x.shape[shard_axis] % shards:
        raise ValueError(
            f"jaxmx.fsdp_gather: axis {shard_axis} of the weight (shape {tuple(x.shape)}) has "
            f"length {x.shape[shard_axis]}, which the {shards} devices of mesh axis "
            f"{mesh_axis!r} do not divide; allowed: an axis whose length is a multiple of {shards}"
        )
    in_spec = _spec(x.ndim, shard_axis, mesh_axis)
    gather = functools.partial(_all_gather, mesh_axis=mesh_axis, axis=shard_axis)
    kwargs = dict(mesh=mesh, in_specs=(in_spec,), out_specs=PartitionSpec(), check_vma=False)
    return jax.shard_map(gather, **kwargs)(x)


def fsdp_gather(
    w: jax.typing.ArrayLike,
    format: str | MXFormat | None,
    *,
    axis: int | None = None,
    mesh_axis: str = "data",
    shard_axis: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    block_size: int | None = None,
    scale_mode: str = "floor",
    rounding: str = "nearest_even",
    key: jax.Array | None = None,
    packed: bool = True,
    dtype: jax.typing.DTypeLike | None = None,
    decode: bool = True,
) -> jax.Array | MXTensor:
    """All-gathers a sharded weight as MX codes and scales; decodes after the gather.

    Each device quantizes its own shard of ``w`` along ``axis`` (blocks
    inside the shard), the codes (packed two per byte for FP4, four per three
    bytes for FP6) and the scales are all-gathered over ``mesh_axis``, and
    the whole weight is decoded only then. The result equals
    ``jaxmx.dequantize(jaxmx.quantize(w, format, axis=axis, ...))`` of the
    unsharded weight, code for code. ``format=None`` gathers ``w`` in
    ``dtype`` without quantizing it (the high-precision baseline).

    Args:
      w: the weight, a float array cut along ``shard_axis`` over
        ``mesh_axis`` (any other layout is moved there first, by XLA).
      format: an MX format with block scales (no per-tensor scale), or None.
      axis: the axis to quantize along (the matmul's contraction axis);
        required with a format.
      mesh_axis: the mesh axis the weight is sharded over.
      shard_axis: the axis of ``w`` that is cut; default :func:`fsdp_axis`
        (as :func:`fsdp_shardings` lays parameters out).
      mesh: the mesh; default the one set with ``jax.set_mesh``.
      block_size, scale_mode, rounding: as for :func:`jaxmx.quantize`.
      key: PRNG key for ``rounding="stochastic"``.
      packed: gather sub-byte codes packed (the point: fewer bytes).
      dtype: dtype of the decoded weight (with ``format=None``: the dtype
        gathered); default ``w``'s.
      decode: False returns the gathered :class:`~jaxmx.MXTensor` instead.

    Returns:
      The whole quantized weight, replicated on every device of the mesh:
      an array (``decode=True``) or an MXTensor. The array's gradient is
      passed to ``w`` as it is (straight through the quantization, as the
      quantized dot's weight gradient is).

    Raises:
      ValueError: no mesh, or ``mesh_axis`` is not one of its axes; the shard
        length along the block axis is not a multiple of the block size (a
        block would straddle two shards); a format with a per-tensor scale;
        no axis of ``w`` fits :func:`fsdp_axis` and ``shard_axis`` is None.

    >>> import jax, jax.numpy as jnp, numpy as np, jaxmx
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    >>> w = jnp.linspace(-1, 1, 64 * 8).reshape(64, 8)
    >>> w = jax.device_put(w, NamedSharding(mesh, P("data")))
    >>> y = jaxmx.fsdp_gather(w, "mxfp4", axis=0, mesh=mesh)
    >>> bool((y == jaxmx.fake_quantize(w, "mxfp4", axis=0)).all())
    True
    """
    w = check_array(w, "w")
    who = "jaxmx.fsdp_gather"
    mesh = _context_mesh(mesh, mesh_axis, who)
    if format is not None and axis is None:
        raise ValueError(f"{who}: quantizing to {format!r} needs axis= (the contraction axis)")
    if shard_axis is None:
        shard_axis = fsdp_axis(w.shape, _axis_size(mesh, mesh_axis))
        if shard_axis is None:
            raise ValueError(
                f"{who}: no axis of the weight (shape {tuple(w.shape)}) is a multiple of "
                f"{_axis_size(mesh, mesh_axis)} shards x {FSDP_GRANULE}; pass shard_axis="
            )
    elif not -w.ndim <= shard_axis < w.ndim:
        raise ValueError(f"{who}: shard_axis {shard_axis} is out of range for rank {w.ndim}")
    shard_axis %= w.ndim
    out_dtype = jnp.dtype(dtype or w.dtype)
    if format is None:
        static = _GatherStatic(None, shard_axis, mesh_axis, mesh, packed, out_dtype, w.dtype, who)
        return _gather_decoded(w, None, static)
    spec = QuantSpec.make(
        format, w.ndim, axis=axis, block_size=block_size, scale_mode=scale_mode, rounding=rounding
    )
    rbits = None
    if spec.random_bits:
        if key is None:
            raise ValueError(f"{who}: rounding={rounding!r} needs a key")
        rbits = jax.random.bits(key, w.shape, jnp.uint32)
    if not decode:
        return _gather(w, rbits, spec, shard_axis, mesh_axis, mesh, packed, who)
    static = _GatherStatic(spec, shard_axis, mesh_axis, mesh, packed, out_dtype, w.dtype, who)
    return _gather_decoded(w, rbits, static)


class _GatherStatic(NamedTuple):
    spec: QuantSpec | None  # None: gather as it is, in dtype
    shard_axis: int
    mesh_axis: str
    mesh: object
    packed: bool
    dtype: jax.typing.DTypeLike  # of the result
    w_dtype: jax.typing.DTypeLike  # of the weight (and its gradient)
    who: str


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gather_decoded(w, rbits, static: _GatherStatic):
    """The whole weight, decoded; its gradient is the cotangent itself (the
    straight-through estimator of the quantization), in the global view where
    a gather is the identity: XLA cuts it back to ``w``'s shards."""
    if static.spec is None:
        return _gather_plain(
            w.astype(static.dtype), static.shard_axis, static.mesh_axis, static.mesh
        )
    t = _gather(
        w,
        rbits,
        static.spec,
        static.shard_axis,
        static.mesh_axis,
        static.mesh,
        static.packed,
        static.who,
    )
    return dequantize(unpack(t), static.dtype)


def _gather_decoded_fwd(w, rbits, static):
    return _gather_decoded(w, rbits, static), None


def _gather_decoded_bwd(static, _, ct):
    return ct.astype(static.w_dtype), None


_gather_decoded.defvjp(_gather_decoded_fwd, _gather_decoded_bwd)


_WEIGHT_ROLES = ("rhs", "rhs_bwd")


def operand(x, fmt: MXFormat | None, contracting, config: DotConfig, rounding, key, role: str):
    """The weight of one matmul of :func:`jaxmx.dot_general`, gathered as MX
    when ``config.fsdp`` asks for it; ``x`` as it is otherwise.

    Blocks run along the last contracting axis; the random bits of stochastic
    rounding are drawn from the whole weight (as unsharded), then cut with it.
    A weight with no :func:`fsdp_axis` (one :func:`fsdp_shardings` leaves
    whole) is left to the matmul as it is.
    """
    if config.fsdp is None or role not in _WEIGHT_ROLES or isinstance(x, MXTensor):
        return x
    who = f"DotConfig(fsdp={config.fsdp!r})"
    mesh = _context_mesh(None, config.fsdp, who)
    shard_axis = fsdp_axis(x.shape, _axis_size(mesh, config.fsdp))
    if shard_axis is None:
        return x
    if fmt is None or not contracting:  # high precision: the weight in compute_dtype
        return _gather_plain(
            x.astype(config.compute_dtype or x.dtype), shard_axis, config.fsdp, mesh
        )
    spec = operand_spec(x.ndim, fmt, contracting[-1], config, rounding, role=role)
    rbits = random_bits(x, spec, key, role)
    t = _gather(
        x, rbits, spec, shard_axis, config.fsdp, mesh, fmt.packable, who,
        operand_implementation(config),
    )  # fmt: skip
    return unpack(t)
