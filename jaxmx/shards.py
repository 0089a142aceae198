"""Sharding an MXTensor so that every block stays whole on one device.

An MXTensor is two (or more) arrays: codes and one scale per block. Sharded
over devices, each array is cut on its own, so a device can decode the
codes it holds only if it also holds the scale of each of their blocks and
no block is cut in two. That holds when the codes and the scales are cut
along the same axes over the same mesh axes, and along the block axis at
block boundaries: a shard of the block axis then holds a whole number of
blocks (a whole number of packed bytes per block, for packed codes).

:func:`mx_shardings` gives such shardings from one ``PartitionSpec`` of the
tensor's shape and refuses a spec that cuts a block; :func:`check_blocks_whole`
checks the shardings an MXTensor (or a tree of ``jax.ShapeDtypeStruct``
targets shaped like one) already carries; :func:`jaxmx.load` runs it on every
MXTensor of a ``target``.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxmx.tensor import MXTensor

__all__ = ["check_blocks_whole", "mx_shardings"]

_FIELDS = ("data", "scale", "tensor_scale", "micro")


def _units_per_block(t: MXTensor, field: str) -> tuple[dict[int, int | None], int]:
    """For one leaf: {axis: stored units per block} along the blocked axes
    (None: a block does not end on a unit boundary), and the leaf's rank."""
    leaf = getattr(t, field)
    nd = len(leaf.shape)
    if field == "scale":
        return {}, nd
    bs = t.block_size
    axes = {}
    if isinstance(bs, tuple):  # 2-D tiles over the last two axes
        axes[nd - 2] = bs[0]
        axes[nd - 1] = bs[1]
    else:
        axis = t.block_axis() + nd
        if field == "micro":
            groups = bs // t.format.micro.group
            axes[axis] = (groups // 8 if groups % 8 == 0 else None) if t.packed else groups
        else:
            bits = bs * t.format.element.bits
            axes[axis] = (bits // 8 if bits % 8 == 0 else None) if t.packed else bs
    return axes, nd


def check_blocks_whole(t: MXTensor, what: str = "MXTensor") -> None:
    """Checks that the shardings of ``t``'s leaves keep every block on one device.

    ``t``'s leaves are ``jax.Array`` or ``jax.ShapeDtypeStruct`` with a
    ``sharding`` (leaves without one are not checked). For each device, the
    slice of the codes it holds must be exactly the codes of the blocks whose
    scales it holds: along the block axis the cut falls on block boundaries,
    along every other axis codes and scales are cut alike.

    Args:
      t: the MXTensor (or MXTensor of ``ShapeDtypeStruct``) to check.
      what: how to name it in an error, e.g. ``"target params/w"``.

    Raises:
      ValueError: a cut splits a block, or the codes and the scales of a
        block lie on different devices; the message names the axis, the
        shard length and the block size.

    >>> import jax, jax.numpy as jnp, numpy as np, jaxmx
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    >>> t = jaxmx.quantize(jnp.ones((64, 8)), "mxfp8", axis=0)
    >>> t = jax.device_put(t, jaxmx.mx_shardings(t, mesh, P("data", None)))
    >>> jaxmx.check_blocks_whole(t)  # one device holds every block whole: no error
    """
    if not isinstance(t, MXTensor):
        raise TypeError(f"check_blocks_whole takes an MXTensor, got {type(t).__name__}")
    scale = t.scale
    s_sharding = getattr(scale, "sharding", None) if scale is not None else None
    if s_sharding is None or t.block_size is None:
        return  # no block scale (per-tensor formats) or nothing placed yet
    s_map = s_sharding.devices_indices_map(tuple(scale.shape))
    for field in ("data", "micro"):
        leaf = getattr(t, field)
        sharding = getattr(leaf, "sharding", None)
        if leaf is None or sharding is None:
            continue
        shape = tuple(leaf.shape)
        d_map = sharding.devices_indices_map(shape)
        if set(d_map) != set(s_map):
            raise ValueError(
                f"{what}: its {field} and its scales are placed on different devices "
                f"({len(d_map)} and {len(s_map)}); give every leaf of an MXTensor a sharding "
                "over the same devices (jaxmx.mx_shardings builds them from one PartitionSpec)"
            )
        units, _ = _units_per_block(t, field)
        for device, index in d_map.items():
            s_index = s_map[device]
            for axis, (dsl, ssl) in enumerate(zip(index, s_index, strict=True)):
                d0, d1, _ = dsl.indices(shape[axis])
                s0, s1, _ = ssl.indices(scale.shape[axis])
                u = units.get(axis, 1)
                if u is None:
                    ok = (d0, d1) == (0, shape[axis]) and (s0, s1) == (0, scale.shape[axis])
                else:
                    ok = d0 == s0 * u and d1 == min(s1 * u, shape[axis])
                if not ok:
                    raise ValueError(_straddle_message(t, what, field, axis, device, (d0, d1)))


def _straddle_message(t: MXTensor, what, field, axis, device, cut) -> str:
    nd = len(getattr(t, field).shape)
    bs = t.block_size
    blocked = axis in _units_per_block(t, field)[0]
    size = (bs[0] if axis == nd - 2 else bs[1]) if isinstance(bs, tuple) else bs
    unit = "packed bytes" if t.packed else "codes"
    if blocked:
        return (
            f"{what}: {t.format.name} MXTensor of shape {t.shape} has blocks of {size} along "
            f"axis {axis}, and its sharding gives device {device} the {unit} {cut[0]}:{cut[1]} "
            f"of that axis ({cut[1] - cut[0]} of {getattr(t, field).shape[axis]}), which is not "
            "a whole number of blocks: a block would straddle two shards. Allowed: cuts of the "
            f"block axis at multiples of {size} elements (an axis length that is a multiple of "
            f"{size} x the number of shards) or no cut of that axis, with the codes and the "
            "scales of each block on one device (jaxmx.mx_shardings gives both from one "
            "PartitionSpec)"
        )
    return (
        f"{what}: its {field} and its scales are cut differently along axis {axis} (device "
        f"{device} holds {field} {cut[0]}:{cut[1]}); codes and scales must be cut alike along "
        "every axis but the block axis: give them the same PartitionSpec (jaxmx.mx_shardings)"
    )


def mx_shardings(t: MXTensor, mesh: jax.sharding.Mesh, spec: PartitionSpec) -> MXTensor:
    """Shardings for ``t``'s leaves from one ``PartitionSpec`` of its shape, blocks kept whole.

    The codes, the scales and the microexponents get ``spec`` (their axes
    are the tensor's, the block axis counting blocks instead of elements);
    a per-tensor scale is replicated. The result is an MXTensor whose leaves
    are ``NamedSharding`` objects: pass it to ``jax.device_put(t, result)``,
    or use it for the ``ShapeDtypeStruct`` of a :func:`jaxmx.load` target.

    Args:
      t: an MXTensor (or one of ``jax.ShapeDtypeStruct`` leaves).
      mesh: the device mesh.
      spec: a ``PartitionSpec`` over ``t.shape`` (at most ``t.ndim`` entries).

    Returns:
      An MXTensor of ``NamedSharding`` leaves.

    Raises:
      ValueError: ``spec`` cuts the block axis inside a block (the message
        names the axis, the shard length and the block size), or has more
        entries than ``t`` has axes.

    >>> import jax, jax.numpy as jnp, numpy as np, jaxmx
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    >>> t = jaxmx.quantize(jnp.ones((64, 8)), "mxfp8", axis=0)
    >>> jaxmx.mx_shardings(t, mesh, P("data", None)).scale.spec
    P('data', None)
    """
    if not isinstance(t, MXTensor):
        raise TypeError(f"mx_shardings takes an MXTensor, got {type(t).__name__}")
    spec = PartitionSpec() if spec is None else spec
    if len(spec) > t.ndim:
        raise ValueError(
            f"mx_shardings: spec {spec} has {len(spec)} entries, the {t.format.name} MXTensor "
            f"of shape {t.shape} has {t.ndim} axes"
        )
    named = NamedSharding(mesh, spec)
    out = {
        f: (None if getattr(t, f) is None else NamedSharding(mesh, PartitionSpec()))
        if f == "tensor_scale"
        else (None if getattr(t, f) is None else named)
        for f in _FIELDS
    }
    shardings = dataclasses.replace(t, **out)
    placed = dataclasses.replace(
        t,
        **{
            f: jax.ShapeDtypeStruct(getattr(t, f).shape, getattr(t, f).dtype, sharding=s)
            for f, s in out.items()
            if s is not None
        },
    )
    _check_even(placed, mesh, spec)
    check_blocks_whole(placed, f"mx_shardings({spec})")
    return shardings


def _check_even(t: MXTensor, mesh, spec) -> None:
    """A NamedSharding cuts an axis into equal shards only if the mesh axes divide it."""
    for field in _FIELDS:
        leaf = getattr(t, field)
        if leaf is None or field == "tensor_scale":
            continue
        for axis, names in enumerate(spec):
            if names is None:
                continue
            names = (names,) if isinstance(names, str) else tuple(names)
            n = int(np.prod([mesh.shape[a] for a in names]))
            if leaf.shape[axis] % n:
                raise ValueError(
                    f"mx_shardings({spec}): the {t.format.name} MXTensor's {field} has "
                    f"{leaf.shape[axis]} entries along axis {axis}, not a multiple of the {n} "
                    f"shards of mesh axes {names}; blocks of {t.block_size} along axis "
                    f"{t.block_axis() + t.ndim} need an axis length that is a multiple of "
                    f"{t.block_size} x {n} to be cut at block boundaries"
                )
