"""Quantized convolution: ``lax.conv_general_dilated`` with MX operands.

A convolution is a matmul whose contraction runs over the input features
and the kernel window. Blocks run along the feature axes, the one axis on
which the two operands pair element for element:

* forward: input along its feature axis C, kernel along its input-feature
  axis I;
* dgrad (input gradient): dY along its feature axis, kernel along its
  output-feature axis O;
* wgrad (kernel gradient): input and dY along the batch axis N, which that
  convolution contracts (together with the spatial positions, whose
  pairing shifts with the window, so blocks cannot run along them).

With ``feature_group_count > 1`` blocks stay within one group. The backward
convolutions are JAX's own transposes (``jax.vjp``) of the convolution,
applied to the quantized operands.
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxmx._operand import check_key, check_operands, compute_dtype, fake_operand
from jaxmx.config import DotConfig, as_dot_config
from jaxmx.platforms import per_platform
from jaxmx.quantize import dequantize
from jaxmx.tensor import MXTensor

__all__ = ["conv_general_dilated"]


class _ConvStatic(NamedTuple):
    window_strides: tuple
    padding: object
    lhs_dilation: tuple | None
    rhs_dilation: tuple | None
    dimension_numbers: lax.ConvDimensionNumbers
    feature_group_count: int
    precision: object
    out_dtype: object
    config: DotConfig


def _conv(lhs, rhs, s: _ConvStatic):
    return lax.conv_general_dilated(
        lhs,
        rhs,
        s.window_strides,
        s.padding,
        s.lhs_dilation,
        s.rhs_dilation,
        s.dimension_numbers,
        s.feature_group_count,
        1,
        s.precision,
        preferred_element_type=jnp.float32,
    )


def _grouped(x, fmt, axis: int, groups: int, cfg: DotConfig, rounding, key, role, dtype):
    """Quantizes ``x`` along ``axis`` with blocks kept inside each of ``groups`` groups."""
    if fmt is None or groups == 1 or isinstance(x, MXTensor):  # an MXTensor: checked, decoded
        return fake_operand(x, fmt, axis, cfg, rounding, key, role, dtype)
    shape = x.shape
    split = shape[:axis] + (groups, shape[axis] // groups) + shape[axis + 1 :]
    q = fake_operand(x.reshape(split), fmt, axis + 1, cfg, rounding, key, role, dtype)
    return q.reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _mx_conv(lhs, rhs, key, s: _ConvStatic):
    return _mx_conv_fwd(lhs, rhs, key, s)[0]


def _mx_conv_fwd(lhs, rhs, key, s: _ConvStatic):
    """Forward convolution of the input (blocks along C) and kernel (along I).

    Residuals: the high-precision ``(lhs, rhs, key)``.
    """
    cfg, dn = s.config, s.dimension_numbers
    groups = s.feature_group_count
    # Quantized once, in float32 (exact); each platform's branch casts to its
    # compute dtype (operands left unquantized keep theirs) and convolves.
    f32 = jnp.float32
    x = _grouped(lhs, cfg.lhs, dn.lhs_spec[1], groups, cfg, cfg.rounding, key, "lhs", f32)
    w = fake_operand(rhs, cfg.rhs, dn.rhs_spec[1], cfg, cfg.rounding, key, "rhs", f32)

    def run(platform):
        cdt = compute_dtype(cfg, platform)
        xc, wc = _cast(x, lhs, cfg.lhs, cdt), _cast(w, rhs, cfg.rhs, cdt)
        common = jnp.promote_types(xc.dtype, wc.dtype)
        return _conv(xc.astype(common), wc.astype(common), s).astype(s.out_dtype)

    return per_platform(run), (lhs, rhs, key)


def _cast(q, x, fmt, dtype):
    """A quantized operand (decoded in float32) in ``dtype``; an unquantized one as given."""
    return q.astype(dtype) if fmt is not None or isinstance(x, MXTensor) else q


def _mx_conv_bwd(s: _ConvStatic, res, g):
    """dgrad: dY (blocks along its features) with the kernel (along O); wgrad:
    input and dY, both blocked along the batch axis N. An operand given as an
    MXTensor gets no gradient (its codes are constants)."""
    cfg, dn = s.config, s.dimension_numbers
    lhs_const, rhs_const = (isinstance(x, MXTensor) for x in res[:2])
    lhs, rhs, key = (dequantize(x, x.dtype) if isinstance(x, MXTensor) else x for x in res)
    g_round = cfg.effective_grad_rounding
    groups = s.feature_group_count

    f32 = jnp.float32
    g_fmt, w_fmt, x_fmt = cfg.grad, cfg.role("rhs_bwd"), cfg.role("lhs_bwd")
    g1 = _grouped(g, g_fmt, dn.out_spec[1], groups, cfg, g_round, key, "grad_dgrad", f32)
    w1 = _grouped(rhs, w_fmt, dn.rhs_spec[0], groups, cfg, cfg.rounding, key, "rhs_bwd", f32)
    if not rhs_const:
        x2 = fake_operand(lhs, x_fmt, dn.lhs_spec[0], cfg, cfg.rounding, key, "lhs_bwd", f32)
        g2 = fake_operand(g, g_fmt, dn.out_spec[0], cfg, g_round, key, "grad_wgrad", f32)

    def run(platform):
        cdt = jnp.promote_types(
            compute_dtype(cfg, platform), jnp.promote_types(lhs.dtype, rhs.dtype)
        )
        # The convolution is linear in each operand: its VJP in lhs, taken at
        # the quantized kernel, is the dgrad convolution of Q(dY) and Q(W).
        d_lhs = d_rhs = None
        if not lhs_const:
            w1c, g1c = _cast(w1, rhs, w_fmt, cdt), _cast(g1, g, g_fmt, cdt)
            _, vjp_lhs = jax.vjp(lambda x: _conv(x, w1c.astype(cdt), s), lhs.astype(cdt))
            (d_lhs,) = vjp_lhs(g1c.astype(jnp.float32))
            d_lhs = d_lhs.astype(lhs.dtype)
        if not rhs_const:
            x2c, g2c = _cast(x2, lhs, x_fmt, cdt), _cast(g2, g, g_fmt, cdt)
            _, vjp_rhs = jax.vjp(lambda w: _conv(x2c.astype(cdt), w, s), rhs.astype(cdt))
            (d_rhs,) = vjp_rhs(g2c.astype(jnp.float32))
            d_rhs = d_rhs.astype(rhs.dtype)
        return d_lhs, d_rhs

    d_lhs, d_rhs = per_platform(run)
    return d_lhs, d_rhs, None


_mx_conv.defvjp(_mx_conv_fwd, _mx_conv_bwd)


_PADDINGS = ("SAME", "SAME_LOWER", "VALID")


def _take_prequantized(config: DotConfig, lhs, rhs, dn, groups: int) -> DotConfig:
    """MXTensor operands must be blocked along the feature axis the forward
    quantizes (input: C, kernel: I), blocks within one feature group; their
    formats replace the config's for that side."""
    for name, x, axis, what in (
        ("lhs", lhs, dn.lhs_spec[1], "input feature axis C"),
        ("rhs", rhs, dn.rhs_spec[1], "kernel input-feature axis I"),
    ):
        if not isinstance(x, MXTensor):
            continue
        got = x.block_axis() + x.ndim
        if got != axis:
            raise ValueError(
                f"jaxmx.conv_general_dilated: {name} is an MXTensor blocked along axis {got}, "
                f"but its blocks must run along the {what} (axis {axis}); quantize it with "
                f"axis={axis}, or dequantize it first"
            )
        per_group = x.shape[axis] // groups
        if name == "lhs" and groups > 1 and per_group % x.block_size:
            raise ValueError(
                f"jaxmx.conv_general_dilated: the MXTensor lhs has blocks of {x.block_size} "
                f"along C, which do not stay within feature groups of {per_group} "
                f"(feature_group_count={groups}); use a block size that divides {per_group}"
            )
        config = config.replace(**{name: x.format})
    return config


def _check_window_args(n: int, window_strides, padding, lhs_dilation, rhs_dilation) -> None:
    """Per-spatial-axis arguments checked before lax, whose errors for these
    are a broadcasting failure or a RuntimeError that names neither."""

    def ints(name, v, lo):
        try:
            ok = len(v) == n and all(operator.index(d) >= lo for d in v)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(
                f"{name} must be a sequence of {n} ints >= {lo} (one per spatial axis of a "
                f"rank-{n + 2} lhs), got {v!r}"
            )

    ints("window_strides", window_strides, 1)
    for name, v in (("lhs_dilation", lhs_dilation), ("rhs_dilation", rhs_dilation)):
        if v is not None:
            ints(name, v, 1)
    if isinstance(padding, str):
        if padding.upper() not in _PADDINGS:
            raise ValueError(
                f"padding must be one of {_PADDINGS} or {n} (low, high) pairs, got {padding!r}"
            )
        return
    try:
        ok = len(padding) == n and all(
            len(p) == 2 and all(isinstance(operator.index(q), int) for q in p) for p in padding
        )
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(
            f"padding must be one of {_PADDINGS} or a sequence of {n} (low, high) int pairs "
            f"(one per spatial axis), got {padding!r}"
        )


def conv_general_dilated(
    lhs: jax.typing.ArrayLike | MXTensor,
    rhs: jax.typing.ArrayLike | MXTensor,
    window_strides: tuple[int, ...] | list[int],
    padding: str | tuple[tuple[int, int], ...] | list[tuple[int, int]],
    lhs_dilation: tuple[int, ...] | list[int] | None = None,
    rhs_dilation: tuple[int, ...] | list[int] | None = None,
    dimension_numbers: lax.ConvGeneralDilatedDimensionNumbers = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jax.typing.DTypeLike | None = None,
    *,
    config: DotConfig | str,
    key: jax.Array | None = None,
    out_sharding: jax.sharding.NamedSharding | jax.sharding.PartitionSpec | None = None,
) -> jax.Array:
    """``lax.conv_general_dilated`` with MX-quantized operands, forward and backward.

    Takes the arguments of ``lax.conv_general_dilated`` (so it can be handed
    to ``flax.linen.Conv(conv_general_dilated=...)`` and ``flax.nnx.Conv``,
    which also passes ``out_sharding``) plus ``config`` and ``key``.

    >>> import jax, jax.numpy as jnp, jaxmx
    >>> x = jnp.ones((2, 8, 8, 32)); w = jnp.ones((3, 3, 32, 16)) / 32
    >>> y = jaxmx.conv_general_dilated(x, w, (1, 1), "SAME",
    ...     dimension_numbers=("NHWC", "HWIO", "NHWC"), config="mxfp8")
    >>> y.shape, float(y[0, 4, 4, 0])
    ((2, 8, 8, 16), 9.0)
    """
    config = as_dot_config(config)
    if config.wgrad_hadamard is not None:
        raise ValueError(
            f"wgrad_hadamard={config.wgrad_hadamard} is implemented for dot_general and "
            "einsum, not for convolutions; use config.replace(wgrad_hadamard=None) for conv "
            "layers (a rule per module)"
        )
    if config.implementation == "native":
        raise ValueError(
            "DotConfig(implementation='native'): block-scaled hardware matmuls "
            "(lax.scaled_dot) have no convolution; allowed for conv_general_dilated: None, "
            "'xla', 'pallas'"
        )
    if config.lhs_sparsity is not None or config.rhs_sparsity is not None:
        raise ValueError(
            "N:M sparsity (lhs_sparsity/rhs_sparsity) is implemented for dot_general and "
            "einsum, not for convolutions; use config.replace(lhs_sparsity=None, "
            "rhs_sparsity=None) for conv layers (a rule per module)"
        )
    lhs, rhs = check_operands(lhs, rhs, "conv_general_dilated")
    check_key(key, config)
    _check_window_args(lhs.ndim - 2, window_strides, padding, lhs_dilation, rhs_dilation)
    conv = functools.partial(
        lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
    )
    if config.is_noop and not any(isinstance(x, MXTensor) for x in (lhs, rhs)):
        return conv(
            lhs,
            rhs,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    if batch_group_count != 1:
        raise ValueError(
            f"jaxmx.conv_general_dilated supports batch_group_count=1 only, got {batch_group_count}"
        )
    # lax's own shape rule validates strides, padding, dilations, feature
    # groups and dimension numbers, raising what lax.conv_general_dilated raises.
    jax.eval_shape(
        conv, jax.ShapeDtypeStruct(lhs.shape, lhs.dtype), jax.ShapeDtypeStruct(rhs.shape, rhs.dtype)
    )
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    config = _take_prequantized(config, lhs, rhs, dn, feature_group_count)
    out_dtype = jnp.dtype(preferred_element_type or jnp.promote_types(lhs.dtype, rhs.dtype))
    if isinstance(padding, list):
        padding = tuple(tuple(p) for p in padding)
    s = _ConvStatic(
        tuple(window_strides),
        padding,
        None if lhs_dilation is None else tuple(lhs_dilation),
        None if rhs_dilation is None else tuple(rhs_dilation),
        dn,
        feature_group_count,
        precision,
        out_dtype,
        config,
    )
    y = _mx_conv(lhs, rhs, key, s)
    return y if out_sharding is None else jax.lax.with_sharding_constraint(y, out_sharding)
