"""The quantized dot_general: MX in every matmul of the forward and backward pass.

``jaxmx.dot_general`` is a drop-in for ``jax.lax.dot_general`` whose operands
are quantized to MX formats along the axis each matmul contracts, with a
``custom_vjp`` so that the two backward matmuls quantize their own operands
along *their* contraction axes (MX paper, Rouhani et al. 2023,
arXiv:2310.10537; OCP MX v1.0 section 6.4):

* forward ``Y = Q(A) . Q(B)``, blocks along the contracting axes;
* dgrad ``dA = Q(dY) . Q(B)``, blocks along B's free axes, B re-quantized
  from its high-precision value (an MX copy quantized along K holds other
  numbers than one quantized along N);
* wgrad ``dB = Q(A) . Q(dY)``, blocks along A's free (batch/token) axes.

With N:M sparsity (``DotConfig.lhs_sparsity`` / ``rhs_sparsity``, see
:mod:`jaxmx.sparsity`) ``A`` and ``B`` are sparsified before they are
quantized, and the three matmuls use the sparsified operands.

With several axes to contract, blocks run along the last of them and the
others are iterated over. An operand with no axis to contract (an outer
product) is quantized with one element per block, as if its contraction
axis of length 1 were padded with zeros to a block.

Compute: operands are dequantized exactly (every MX value is exact in
bfloat16) and multiplied with float32 accumulation, so every product is
exact; see :mod:`jaxmx.native` for block-scaled hardware matmuls.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxmx import _hadamard, fsdp, native, pallas
from jaxmx._operand import (
    check_key,
    check_operands,
    dot_compute_dtype,
    fake_operand,
    lax_dot,
    operand_block_size,
    operand_implementation,
    operand_spec,
    product,
    random_bits,
)
from jaxmx._pallas_operand import Copy, both_copies, weight_only
from jaxmx._sparse_operand import check_sparsity, sparsify_operands
from jaxmx.config import DotConfig, as_dot_config
from jaxmx.formats import MXFormat
from jaxmx.packing import unpack
from jaxmx.platforms import PLATFORMS, forced, per_platform
from jaxmx.quantize import dequantize, quantize_spec
from jaxmx.sparsity import apply_mask
from jaxmx.tensor import MXTensor

__all__ = ["dot_general"]

DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]


class _Dims(NamedTuple):
    """Canonical (tuple) dimension numbers of one dot_general."""

    lc: tuple[int, ...]  # lhs contracting
    rc: tuple[int, ...]  # rhs contracting
    lb: tuple[int, ...]  # lhs batch
    rb: tuple[int, ...]  # rhs batch
    lf: tuple[int, ...]  # lhs free, ascending
    rf: tuple[int, ...]  # rhs free, ascending


def canonical_dimension_numbers(dimension_numbers, lhs_shape, rhs_shape):
    """``dimension_numbers`` as ``lax.dot_general`` reads them, as tuples of ints.

    Takes what lax takes: ``None`` for a plain matrix/vector product, and a
    bare int where lax allows one index group of one axis. The ranges,
    duplicates and sizes are left to lax's shape rule (see ``dot_general``).
    """
    if dimension_numbers is None:
        if 1 <= len(lhs_shape) <= 2 and 1 <= len(rhs_shape) <= 2 and lhs_shape[-1] == rhs_shape[0]:
            return ((len(lhs_shape) - 1,), (0,)), ((), ())
        raise ValueError(
            "dimension_numbers=None is only allowed for an un-batched matrix-matrix, "
            f"matrix-vector or vector-vector product; got lhs shape {tuple(lhs_shape)} and "
            f"rhs shape {tuple(rhs_shape)}: give ((lhs_contracting, rhs_contracting), "
            "(lhs_batch, rhs_batch))"
        )

    def group(g):
        if isinstance(g, (str, bytes)):
            raise TypeError
        try:
            return (operator.index(g),)
        except TypeError:
            return tuple(operator.index(d) for d in g)

    try:
        if isinstance(dimension_numbers, (str, bytes)):
            raise TypeError
        (lc, rc), (lb, rb) = dimension_numbers
        return (group(lc), group(rc)), (group(lb), group(rb))
    except (TypeError, ValueError):
        raise ValueError(
            "dimension_numbers must be ((lhs_contracting, rhs_contracting), (lhs_batch, "
            "rhs_batch)), each a tuple of axis indices (or one int), as lax.dot_general "
            f"takes; got {dimension_numbers!r}"
        ) from None


def _dims(dimension_numbers, lhs_ndim: int, rhs_ndim: int) -> _Dims:
    """Canonical dimension numbers (already checked) with the free axes listed."""
    (lc, rc), (lb, rb) = dimension_numbers
    lf = tuple(d for d in range(lhs_ndim) if d not in lc and d not in lb)
    rf = tuple(d for d in range(rhs_ndim) if d not in rc and d not in rb)
    return _Dims(lc, rc, lb, rb, lf, rf)


class _Static(NamedTuple):
    """Everything about one call that is not an array (hashable)."""

    dims: _Dims
    config: DotConfig
    precision: object
    out_dtype: object
    out_sharding: object
    prequantized: tuple[bool, bool] = (False, False)  # lhs, rhs given as MXTensors


# --------------------------------------------------------------------------
# Quantizing one operand for one matmul.
# --------------------------------------------------------------------------


def _last(axes: tuple[int, ...]) -> int | None:
    return axes[-1] if axes else None


class _Side(NamedTuple):
    """One operand of one of the three matmuls."""

    x: jax.Array
    fmt: MXFormat | None
    contracting: tuple[int, ...]
    rounding: str
    role: str


def _qmatmul(a: _Side, b: _Side, dims, static: _Static, key, out_dtype, out_sharding=None):
    """``Q(a) . Q(b)`` with blocks along the last contracting axis of each side,
    as the platform the program is lowered for runs it."""
    cfg = static.config
    # With config.fsdp the weight (b) arrives gathered as an MXTensor (jaxmx.fsdp).
    b = b._replace(x=fsdp.operand(b.x, b.fmt, b.contracting, cfg, b.rounding, key, b.role))
    if a.role == "lhs" and a.fmt is None and weight_only(a.x, b.x, dims, cfg):
        return pallas.weight_only_matmul(a.x, b.x, out_dtype=out_dtype, implementation="pallas")
    reason = _native_reason(a, b, cfg)
    records = [forced()] if forced() is not None else PLATFORMS.values()
    natives = {native.use_native(cfg, reason, p) for p in records}
    if natives == {True}:  # native everywhere: nothing depends on the platform
        ta, tb = (_mx_tensor(s, cfg, key) for s in (a, b))
        return native.scaled_dot(ta, tb, dims, out_dtype)
    if natives == {False}:
        # Quantized once, in float32 (exact); each platform's branch only casts
        # to its compute dtype and multiplies.
        qa, qb = (_fake(s, cfg, key) for s in (a, b))

        def emulated(platform):
            cdt = dot_compute_dtype(cfg, platform)
            ca, cb = (q.astype(cdt) if _quantized(s) else q for q, s in ((qa, a), (qb, b)))
            return _matmul(ca, cb, dims, static.precision, out_dtype, cdt, platform, out_sharding)

        return per_platform(emulated)

    def run(platform):
        if native.use_native(cfg, reason, platform):
            ta, tb = (_mx_tensor(s, cfg, key) for s in (a, b))
            return native.scaled_dot(ta, tb, dims, out_dtype)
        cdt = dot_compute_dtype(cfg, platform)
        qa = fake_operand(a.x, a.fmt, _last(a.contracting), cfg, a.rounding, key, a.role, cdt)
        qb = fake_operand(b.x, b.fmt, _last(b.contracting), cfg, b.rounding, key, b.role, cdt)
        return _matmul(qa, qb, dims, static.precision, out_dtype, cdt, platform, out_sharding)

    return per_platform(run)


def _quantized(s: _Side) -> bool:
    """Whether fake_operand decodes this side into the compute dtype (else: as given)."""
    return isinstance(s.x, MXTensor) or s.fmt is not None


def _fake(s: _Side, cfg: DotConfig, key):
    return fake_operand(s.x, s.fmt, _last(s.contracting), cfg, s.rounding, key, s.role, jnp.float32)


def _matmul(qa, qb, dims, precision, out_dtype, cdt, platform, out_sharding=None):
    """float32-accumulating dot_general of two dequantized operands, multiplied
    in ``cdt`` or wider."""
    return product(qa, qb, dims, platform, precision, cdt, out_sharding).astype(out_dtype)


def _native_reason(a: _Side, b: _Side, cfg: DotConfig) -> str | None:
    """Why ``Q(a) . Q(b)`` cannot run as ``lax.scaled_dot`` (``None``: it can)."""
    sizes = []
    matmul = _MATMUL_OF[a.role]
    for s in (a, b):
        if isinstance(s.x, MXTensor):
            if s.x.block_axis() + s.x.ndim != s.contracting[-1]:
                return f"{matmul}: a pre-quantized operand is blocked along another axis"
            if s.x.tensor_scale is not None and s.x.tensor_scale.ndim:
                return f"{matmul}: a pre-quantized operand has one tensor scale per item"
            sizes.append(s.x.block_size)
        else:
            sizes.append(operand_block_size(s.fmt, cfg, s.role))
    reason = native.unsupported_reason(
        a.fmt, b.fmt, a.contracting, tuple(a.x.shape), (sizes[0], sizes[1])
    )
    return None if reason is None else f"{matmul}: {reason}"


# Which of the three matmuls a left operand's role belongs to (for errors).
_MATMUL_OF = {"lhs": "the forward matmul", "grad_dgrad": "dgrad", "lhs_bwd": "wgrad"}


def _mx_tensor(side: _Side, cfg: DotConfig, key) -> MXTensor:
    if isinstance(side.x, MXTensor):
        return unpack(side.x)
    spec = operand_spec(
        side.x.ndim, side.fmt, side.contracting[-1], cfg, side.rounding, role=side.role
    )
    rbits = random_bits(side.x, spec, key, side.role)
    return quantize_spec(side.x, rbits, None, spec, operand_implementation(cfg))


# --------------------------------------------------------------------------
# The custom_vjp.
# --------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _mx_dot(lhs, rhs, key, static: _Static):
    out, _ = _mx_dot_fwd(lhs, rhs, key, static)
    return out


def _mx_dot_fwd(lhs, rhs, key, static: _Static):
    """Forward matmul ``Q(S(lhs)) . Q(S(rhs))``, blocks along the last contracting
    axes; ``S`` is the operand's N:M sparsity (``config.lhs_sparsity``,
    ``rhs_sparsity``; the identity where None), applied before quantizing.

    Residuals: ``(S(lhs), S(rhs), key, masks)`` with the operands in high
    precision, or, with ``config.residuals == "quantized"``, their forward
    MX copies as :class:`~jaxmx.MXTensor` (8 or fewer bits per element);
    ``masks``: each sparse operand's boolean N:M mask where its gradient is
    masked, else None.
    """
    d, cfg = static.dims, static.config
    lhs, rhs, masks = sparsify_operands(lhs, rhs, static.config, static.dims)
    a = _Side(lhs, cfg.lhs, d.lc, cfg.rounding, "lhs")
    b = _Side(rhs, cfg.rhs, d.rc, cfg.rounding, "rhs")
    dims = ((d.lc, d.rc), (d.lb, d.rb))
    if cfg.residuals != "quantized":
        # With Pallas, an operand's forward and backward copies come from one
        # kernel reading it once; the backward copy is the residual.
        a, lhs_res = _both_copies(a, cfg, key, d.lf, "lhs_bwd")
        b, rhs_res = _both_copies(b, cfg, key, d.rf, "rhs_bwd")
        out = _qmatmul(a, b, dims, static, key, static.out_dtype, static.out_sharding)
        return out, (lhs_res, rhs_res, key, masks)
    # The stash is the forward MX copy itself (same rounding, same random
    # bits), quantized once and used by the forward matmul too. With
    # config.fsdp it is the gathered copy, which the backward pass reuses.
    b = b._replace(x=fsdp.operand(b.x, b.fmt, b.contracting, cfg, b.rounding, key, b.role))
    ta, tb = _stash(a, cfg, key), _stash(b, cfg, key)
    reason = _native_reason(a, b, cfg)

    def run(platform):
        if native.use_native(cfg, reason, platform):
            return native.scaled_dot(unpack(ta), unpack(tb), dims, static.out_dtype)
        cdt = dot_compute_dtype(cfg, platform)
        qa, qb = (dequantize(t, cdt) if isinstance(t, MXTensor) else t for t in (ta, tb))
        return _matmul(
            qa, qb, dims, static.precision, static.out_dtype, cdt, platform, static.out_sharding
        )

    return per_platform(run), (ta, tb, key, masks)


def _both_copies(side: _Side, cfg: DotConfig, key, bwd_axes: tuple[int, ...], bwd_role: str):
    """``(side, residual)``: ``side`` with its forward MX copy and the residual
    its backward one (:class:`Copy`), both from one fused kernel, where
    ``implementation="pallas"`` and the layout allow it; else ``side`` as it
    is and its high-precision operand."""
    copies = both_copies(
        side.x, side.fmt, side.contracting, side.rounding, side.role, cfg, key, bwd_axes, bwd_role
    )
    if copies is None:
        return side, side.x
    return side._replace(x=copies[0]), Copy(copies[1])


def _stash(side: _Side, cfg: DotConfig, key):
    if isinstance(side.x, MXTensor):
        return side.x
    if side.fmt is None or not side.contracting:
        return (
            side.x
            if side.fmt is None
            else fake_operand(
                side.x, side.fmt, None, cfg, side.rounding, key, side.role, side.x.dtype
            )
        )
    return _mx_tensor(side, cfg, key)


def _unstash(x):
    return dequantize(x, x.dtype) if isinstance(x, MXTensor) else x


def _mx_dot_bwd(static: _Static, res, g):
    """Both backward matmuls, each quantizing its operands along its own contraction.

    * dgrad ``d_lhs = Q(g) . Q(rhs)`` contracts rhs's free axes: ``g`` and
      ``rhs`` are blocked along the last of them (``rhs`` re-quantized from
      the residual with ``config.rhs_bwd``);
    * wgrad ``d_rhs = Q(lhs) . Q(g)`` contracts lhs's free axes: ``lhs`` and
      ``g`` are blocked along the last of them (``config.lhs_bwd``).

    ``g`` uses ``config.grad`` with ``config.grad_rounding`` in both. Both
    matmuls use the sparsified operands the forward one did; a masked N:M
    operand's gradient is then multiplied by its mask.
    """
    lhs, rhs, key, (lhs_mask, rhs_mask) = res
    if static.config.residuals == "quantized" and static.config.fsdp is not None:
        # The stashed weight was gathered whole in the forward pass.
        static = static._replace(config=static.config.replace(fsdp=None))
    # An operand given as an MXTensor (not a quantized stash) is a constant:
    # its codes get no gradient, and its gradient matmul is skipped.
    lhs_const, rhs_const = static.prequantized
    lhs, rhs = (x.t if isinstance(x, Copy) else _unstash(x) for x in (lhs, rhs))
    d_lhs = None if lhs_const else _dgrad(static, key, g, rhs, lhs.dtype)
    d_rhs = None if rhs_const else _wgrad(static, key, g, lhs, rhs.dtype)
    # Masked N:M sparsity: d(mask * x)/dx = mask, the mask fixed for the step.
    if lhs_mask is not None and d_lhs is not None:
        d_lhs = apply_mask(d_lhs, lhs_mask)
    if rhs_mask is not None and d_rhs is not None:
        d_rhs = apply_mask(d_rhs, rhs_mask)
    return d_lhs, d_rhs, None


def _g_axes(d: _Dims):
    """``g``'s batch axes, its axes of lhs's free dims, of rhs's free dims."""
    nb, nlf, nrf = len(d.lb), len(d.lf), len(d.rf)
    return (
        tuple(range(nb)),
        tuple(range(nb, nb + nlf)),
        tuple(range(nb + nlf, nb + nlf + nrf)),
    )


def _dgrad(static: _Static, key, g, rhs, dtype):
    """``d_lhs``: contracts g's rhs-free axes with rhs's free axes."""
    d, cfg = static.dims, static.config
    g_batch, _, g_rfree = _g_axes(d)
    d_lhs = _qmatmul(
        _Side(g, cfg.grad, g_rfree, cfg.effective_grad_rounding, "grad_dgrad"),
        _Side(rhs, cfg.role("rhs_bwd"), d.rf, cfg.rounding, "rhs_bwd"),
        ((g_rfree, d.rf), (g_batch, d.rb)),
        static,
        key,
        dtype,
    )
    # Result axes: batch, lhs free, then rhs's remaining (contracting) axes
    # in ascending order, which pair with lhs's contracting axes.
    return _to_layout(d_lhs, (*d.lb, *d.lf, *(d.lc[d.rc.index(r)] for r in sorted(d.rc))))


def _wgrad_rotate(cfg: DotConfig, x, axis: int):
    size = cfg.wgrad_hadamard
    if x.shape[axis] % size:
        raise ValueError(
            f"wgrad_hadamard={size}: the weight-gradient matmul contracts an axis of length "
            f"{x.shape[axis]}, not a multiple of {size} (the tokens of the batch); use a "
            "batch whose token count it divides, or wgrad_hadamard=None"
        )
    return _hadamard.rotate(x, axis, size, _hadamard.random_signs(size, cfg.hadamard_seed))


def _wgrad(static: _Static, key, g, lhs, dtype):
    """``d_rhs``: contracts lhs's free axes with g's lhs-free axes."""
    d, cfg = static.dims, static.config
    g_batch, g_lfree, _ = _g_axes(d)
    if cfg.wgrad_hadamard is not None and d.lf:
        # The same randomized Hadamard on both operands along the contraction:
        # (H D x) . (H D g) = x . g exactly, with outliers spread over blocks.
        lhs, g = _wgrad_rotate(cfg, lhs, d.lf[-1]), _wgrad_rotate(cfg, g, g_lfree[-1])
    d_rhs = _qmatmul(
        _Side(lhs, cfg.role("lhs_bwd"), d.lf, cfg.rounding, "lhs_bwd"),
        _Side(g, cfg.grad, g_lfree, cfg.effective_grad_rounding, "grad_wgrad"),
        ((d.lf, g_lfree), (d.lb, g_batch)),
        static,
        key,
        dtype,
    )
    return _to_layout(d_rhs, (*d.rb, *(d.rc[d.lc.index(a)] for a in sorted(d.lc)), *d.rf))


def _to_layout(x, axes_of_result: Sequence[int]):
    """Transposes ``x`` whose axis ``i`` is operand axis ``axes_of_result[i]``."""
    perm = sorted(range(len(axes_of_result)), key=lambda i: axes_of_result[i])
    return x if perm == list(range(x.ndim)) else jnp.transpose(x, perm)


_mx_dot.defvjp(_mx_dot_fwd, _mx_dot_bwd)


# --------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------


def dot_general(
    lhs: jax.typing.ArrayLike | MXTensor,
    rhs: jax.typing.ArrayLike | MXTensor,
    dimension_numbers: DimensionNumbers,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jax.typing.DTypeLike | None = None,
    *,
    config: DotConfig,
    key: jax.Array | None = None,
    out_sharding: jax.sharding.NamedSharding | jax.sharding.PartitionSpec | None = None,
) -> jax.Array:
    """``jax.lax.dot_general`` with MX-quantized operands, forward and backward.

    A drop-in for ``lax.dot_general``: ``functools.partial(jaxmx.dot_general,
    config=cfg)`` can be given to ``flax.linen.Dense(dot_general=...)``,
    ``flax.nnx.Linear(dot_general=...)`` and the like.

    Args:
      lhs, rhs: float arrays (float32, bfloat16 or float16), or
        :class:`~jaxmx.MXTensor` operands blocked along one of their contracting
        axes (e.g. weights quantized once for serving). An MXTensor is used
        as it is, never quantized again: its format replaces the config's
        for that side (so ``rhs_bwd=FORWARD`` reuses it), it is decoded into
        the matmul, or goes straight into ``lax.scaled_dot`` where the
        hardware has one, and it gets no gradient (its codes are constants).
      dimension_numbers: as for ``lax.dot_general``.
      precision: passed to the underlying matmuls.
      preferred_element_type: output dtype; default: the promoted operand
        dtype, as ``lax.dot_general``. Products always accumulate in float32.
      config: a :class:`~jaxmx.DotConfig` (or a preset name, see
        :func:`jaxmx.preset`) saying which MX format each of the six
        quantizations of the forward and backward pass uses.
      key: PRNG key for stochastic rounding (``config.grad_rounding`` or
        ``config.rounding`` set to ``"stochastic"``); without one, the random
        bits are a hash of the rounded tensor (see ``DotConfig``).
      out_sharding: passed to the forward ``lax.dot_general``.

    Returns:
      The product, shaped as ``lax.dot_general``'s.

    >>> import jax, jax.numpy as jnp, jaxmx
    >>> x = jnp.linspace(-1.0, 1.0, 64).reshape(2, 32)
    >>> w = jnp.ones((32, 3))
    >>> dims = (((1,), (0,)), ((), ()))
    >>> y = jaxmx.dot_general(x, w, dims, config=jaxmx.preset("mxfp4"))
    >>> y.shape, bool(jnp.allclose(y, x @ w, atol=0.5))
    ((2, 3), True)
    """
    config = as_dot_config(config)
    lhs, rhs = check_operands(lhs, rhs, "dot_general")
    check_key(key, config)
    dimension_numbers = canonical_dimension_numbers(dimension_numbers, lhs.shape, rhs.shape)
    # lax's own shape rule validates the dimension numbers (range, duplicates,
    # sizes), so invalid ones raise exactly what lax.dot_general raises.
    jax.eval_shape(
        functools.partial(lax.dot_general, dimension_numbers=dimension_numbers),
        jax.ShapeDtypeStruct(lhs.shape, lhs.dtype),
        jax.ShapeDtypeStruct(rhs.shape, rhs.dtype),
    )
    dims = _dims(dimension_numbers, lhs.ndim, rhs.ndim)
    config = _take_prequantized(config, lhs, rhs, dims, "dot_general")
    check_sparsity(config, lhs, rhs, dims.lc, dims.rc, "dot_general")
    pre = (isinstance(lhs, MXTensor), isinstance(rhs, MXTensor))
    # implementation="pallas" with nothing to quantize and no MXTensor
    # operand leaves no kernel to run: the plain dot, not a custom_vjp around it.
    if config.is_noop or (not any(pre) and config.replace(implementation=None).is_noop):
        return lax_dot(lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding)
    out_dtype = jnp.dtype(preferred_element_type or jnp.promote_types(lhs.dtype, rhs.dtype))
    static = _Static(dims, config, precision, out_dtype, out_sharding, pre)
    return _mx_dot(lhs, rhs, key, static)


def _take_prequantized(config: DotConfig, lhs, rhs, dims: _Dims, op: str) -> DotConfig:
    """Checks MXTensor operands' block axes; their formats replace the config's."""
    for name, x, contracting in (("lhs", lhs, dims.lc), ("rhs", rhs, dims.rc)):
        if not isinstance(x, MXTensor):
            continue
        axis = x.block_axis() + x.ndim
        if axis not in contracting:
            raise ValueError(
                f"jaxmx.{op}: {name} is an MXTensor blocked along axis {axis}, but this matmul "
                f"contracts its axes {contracting}; blocks must run along a contracting axis "
                f"(quantize it with axis={contracting[-1] if contracting else '...'}), or "
                "dequantize it first"
            )
        config = config.replace(**{name: x.format})
    return config
