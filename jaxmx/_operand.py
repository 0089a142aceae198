"""How one operand of one MX matmul is quantized, shared by dot_general and conv.

Private to jaxmx's ops: the compute dtype, the random bits of stochastic
rounding (a key, or a hash of the tensor), fake-quantizing an operand along
its contraction, argument checks, a ``lax.dot_general`` that runs on XLA:CPU
for every layout, and the float32-accumulating product of two dequantized
operands (bfloat16 where XLA:CPU runs it safely).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxmx.config import DotConfig
from jaxmx.formats import MXFormat
from jaxmx.platforms import Platform, per_platform
from jaxmx.quantize import dequantize, fake_quantize_spec
from jaxmx.spec import QuantSpec
from jaxmx.tensor import MXTensor

__all__ = [
    "check_key",
    "check_operands",
    "compute_dtype",
    "dot_compute_dtype",
    "fake_operand",
    "lax_dot",
    "operand_block_size",
    "operand_implementation",
    "operand_spec",
    "product",
    "random_bits",
]

# Distinct salts/fold-ins for the random bits of the six quantizations.
_ROLE_IDS = {"lhs": 1, "rhs": 2, "grad_dgrad": 3, "rhs_bwd": 4, "lhs_bwd": 5, "grad_wgrad": 6}


def compute_dtype(config: DotConfig, platform: Platform):
    """dtype the operands of a convolution are decoded into on ``platform``."""
    if config.compute_dtype is not None:
        return jnp.dtype(config.compute_dtype)
    # Every MX value (down to 2^-133) is exact in bfloat16 and products
    # accumulate in float32, so the choice is only about speed.
    return jnp.dtype(platform.conv_dtype)


def dot_compute_dtype(config: DotConfig, platform: Platform):
    """dtype the operands of a dot_general are decoded into on ``platform``
    (see :func:`product`).

    None: the platform's (:class:`jaxmx.platforms.Platform`); on CPU
    bfloat16 where the CPU has bfloat16 dot instructions, float32 elsewhere,
    where XLA:CPU's bfloat16 dot converts its operands on the fly and runs
    slower than the float32 one (1.5x on AVX2).
    """
    if config.compute_dtype is not None:
        return jnp.dtype(config.compute_dtype)
    if platform.dot_dtype == "host":
        return jnp.dtype(jnp.bfloat16 if cpu_has_bf16_dot() else jnp.float32)
    return jnp.dtype(platform.dot_dtype)


@functools.cache
def cpu_has_bf16_dot() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16, AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def hash_bits(x: jax.Array, salt: int) -> jax.Array:
    """Pseudo-random uint32 per element from its bits and position.

    Stochastic rounding inside a backward pass needs random bits but gets no
    key from Flax layers; a hash of the value and its index (the lowbias32
    mixer) is cheap, differs from step to step as the values do, and is
    deterministic for a given input.
    """
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    idx = lax.iota(jnp.uint32, x.size).reshape(x.shape)
    h = bits ^ (idx * jnp.uint32(0x9E3779B9)) ^ jnp.uint32((salt * 0x85EBCA6B) & 0xFFFFFFFF)
    for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        h = (h ^ lax.shift_right_logical(h, jnp.uint32(shift))) * jnp.uint32(mul)
    return h ^ lax.shift_right_logical(h, jnp.uint32(16))


def random_bits(x, spec: QuantSpec, key, role: str):
    if not spec.random_bits:
        return None
    if key is None:
        return hash_bits(x, _ROLE_IDS[role])
    return jax.random.bits(jax.random.fold_in(key, _ROLE_IDS[role]), x.shape, jnp.uint32)


def fake_operand(
    x, fmt: MXFormat | None, axis: int | None, config: DotConfig, rounding, key, role, dtype
):
    """``x`` fake-quantized to ``fmt`` with blocks along ``axis``, in ``dtype``.

    ``axis=None``: nothing to contract, one element per block. An
    :class:`~jaxmx.MXTensor` is already quantized: it is only decoded.
    """
    if isinstance(x, MXTensor):
        return dequantize(x, dtype)
    if fmt is None:
        return x
    if axis is None:
        # Nothing to contract: each element is a block of its own, along a
        # new last axis (a block of 1, or a partial one where the format's
        # blocks are fixed; the same values either way).
        x = x[..., None]
    spec = operand_spec(
        x.ndim,
        fmt,
        x.ndim - 1 if axis is None else axis,
        config,
        rounding,
        single=axis is None,
        role=role,
    )
    # Blocks of one element (nothing to contract) have no kernel; their
    # values are the same either way.
    impl = operand_implementation(config) if axis is not None else "xla"
    q = fake_quantize_spec(x, random_bits(x, spec, key, role), None, spec, impl)
    if axis is None:
        q = q[..., 0]
    return q.astype(dtype)


_WEIGHT_ROLES = ("rhs", "rhs_bwd")


def operand_spec(
    ndim: int,
    fmt: MXFormat,
    axis: int,
    config: DotConfig,
    rounding: str,
    single: bool = False,
    role: str = "lhs",
) -> QuantSpec:
    """The spec of an operand of rank ``ndim`` blocked along ``axis`` (0-based).

    ``config.block_size`` applies to the formats whose block size is free
    (the OCP ones and NVFP4), ``config.rhs_block_size`` instead to the
    weight's roles; the BDR formats keep their own blocks, and per-tensor
    formats have none. 2-D tiles cover the operand's last two axes, one of
    which must be ``axis``. ``single``: blocks of one element (nothing to
    contract).
    """
    free = QuantSpec.block_size_is_free(fmt)
    bs = _configured_block_size(config, role)
    if isinstance(bs, tuple) and not single:
        if axis not in (ndim - 2, ndim - 1):
            raise ValueError(
                f"rhs_block_size={bs} tiles the weight's last two axes, but this matmul "
                f"contracts its axis {axis} (of {ndim}); move the contraction axis into the "
                "last two, or use an int block size"
            )
        axis = ndim - 1
    bs = (1 if single else bs) if free else None
    # A format whose scales follow their own rule (NVFP4, BDR, per-tensor)
    # keeps it; config.scale_mode is for the formats that have a choice.
    modes = QuantSpec.scale_modes_of(fmt)
    mode = config.scale_mode if config.scale_mode in modes else modes[0]
    return QuantSpec.make(fmt, ndim, axis=axis, block_size=bs, scale_mode=mode, rounding=rounding)


def operand_implementation(config: DotConfig) -> str:
    """How operands are quantized: by the Pallas kernels for ``implementation="pallas"``."""
    return "pallas" if config.implementation == "pallas" else "xla"


def _configured_block_size(config: DotConfig, role: str) -> int | tuple[int, int] | None:
    if role in _WEIGHT_ROLES and config.rhs_block_size is not None:
        return config.rhs_block_size
    return config.block_size


def operand_block_size(
    fmt: MXFormat | None, config: DotConfig, role: str
) -> int | tuple[int, int] | None:
    """The block size (a pair for 2-D tiles) :func:`operand_spec` gives ``role``'s operand."""
    if fmt is None:
        return None
    bs = _configured_block_size(config, role)
    return bs if bs is not None and QuantSpec.block_size_is_free(fmt) else fmt.block_size


def lax_dot(
    lhs, rhs, dims, precision=None, preferred_element_type=None, out_sharding=None, platform=None
):
    """``lax.dot_general`` that runs on XLA:CPU for every legal layout.

    XLA:CPU implements a bfloat16 x bfloat16 -> float32 dot for some layouts
    only ("DotThunk::Execute: BF16 x BF16 = F32"), and its layout passes can
    re-create such a layout after any canonicalization (seen in the gradient
    of a rematerialized scan). Products of two bfloat16 values are exact in
    float32, so on CPU bfloat16 operands are widened to float32 first: the
    result is the same float32-accumulated sum, and nothing crashes where
    float32 works. Other backends get the call as it is. ``platform``: the
    record to follow (None: the one the program is lowered for).
    """
    if platform is None and jnp.bfloat16 in (lhs.dtype, rhs.dtype):
        return per_platform(
            lambda p, a, b: lax_dot(a, b, dims, precision, preferred_element_type, out_sharding, p),
            lhs,
            rhs,
        )
    kwargs = {} if out_sharding is None else {"out_sharding": out_sharding}
    out_dtype = jnp.dtype(preferred_element_type or jnp.promote_types(lhs.dtype, rhs.dtype))
    if platform is not None and platform.cpu_dot_layouts and jnp.bfloat16 in (lhs.dtype, rhs.dtype):
        widen = jnp.promote_types(jnp.float32, out_dtype)
        out = lax.dot_general(
            lhs.astype(widen),
            rhs.astype(widen),
            dims,
            precision,
            preferred_element_type=widen,
            **kwargs,
        )
        return out.astype(out_dtype)
    return lax.dot_general(
        lhs, rhs, dims, precision, preferred_element_type=preferred_element_type, **kwargs
    )


def product(
    qa, qb, dims, platform: Platform, precision=None, compute=jnp.float32, out_sharding=None
):
    """float32 ``dot_general`` of two dequantized operands (float32 accumulation).

    The operands are multiplied in ``compute`` or their wider dtype. In
    bfloat16 every product is exact in float32, so only the summation order
    differs from a float32 dot; on CPU bfloat16 runs through
    :func:`_cpu_bf16_dot`, which XLA:CPU runs for every layout.
    """
    common = jnp.promote_types(jnp.promote_types(qa.dtype, qb.dtype), compute)
    qa, qb = qa.astype(common), qb.astype(common)
    if common == jnp.bfloat16 and out_sharding is None and platform.cpu_dot_layouts:
        return _cpu_bf16_dot(qa, qb, _tuple_dims(dims), precision)
    return lax_dot(qa, qb, dims, precision, jnp.float32, out_sharding, platform)


def _tuple_dims(dims):
    (lc, rc), (lb, rb) = dims
    return (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))


# XLA:CPU and bfloat16 x bfloat16 -> float32 dots. XLA decides early in its
# pipeline (float-normalization, after its dot decomposer) whether a bf16 dot
# goes to a library kernel (YNNPACK/oneDNN, which take [B,] M x K times [B,]
# K x N or [B,] N x K) or is widened to float32. Later passes can still change
# the dot: transpose-folding folds a transpose that feeds it into its
# dimension numbers, and the simplifier turns transpose(dot(a, b)) into
# dot(b, a). A bf16 dot the library does not take then reaches DotThunk,
# which has no bf16 x bf16 = f32 kernel ("UNIMPLEMENTED: Unsupported element
# type for DotThunk::Execute: BF16 x BF16 = F32"). The transposes come from
# XLA's own dot decomposer (batch axes not leading, several free or
# contracting axes out of order), from the caller (an operand that is a
# transposed array), from vmap's batch axes, from a gradient (the weight
# gradient transposed back to the weight's layout), or from jaxmx itself.
#
# So on CPU a bf16 dot is emitted in the library's layout only, with an
# optimization barrier on its operands and on its result, and a vmap rule
# that adds vmapped axes as a leading batch axis (where XLA's batching rule
# would put them anywhere). The result's barrier is needed (the weight
# gradient of an (N, K) weight crashed without it); the operands' keeps XLA
# from ever seeing a transpose it could fold in (none crashed without it in
# jax 0.10.2: XLA widens a dot of the caller's transpose itself). The layout
# comes from reshapes alone where the axes allow it (no copy). An lhs that is
# [B,] K x M as it stands (the weight gradient of a 2-D dense layer) is
# widened to float32 instead, which XLA runs without a copy, as it does
# itself for a plain bf16 dot_general in that layout. Any other layout is
# transposed into the library's: the copy XLA's dot decomposer makes for it
# anyway, here in bf16. These are the dtypes and copies of a plain bf16
# dot_general on XLA:CPU, where it does not crash. Every product is exact.


class _Plan(NamedTuple):
    """How :func:`_cpu_bf16_dot` runs one dot_general: operand permutations
    (None: none needed), the 2-D/3-D shapes they are reshaped to, and whether
    it runs in bfloat16 (lhs ``[B,] M, K``) or float32 (lhs ``[B,] K, M``,
    which the library does not take)."""

    lhs_perm: tuple[int, ...] | None
    rhs_perm: tuple[int, ...] | None
    lhs_shape: tuple[int, ...]
    rhs_shape: tuple[int, ...]
    lhs_km: bool  # lhs is [B,] K, M (run in float32)
    rhs_nk: bool  # rhs is [B,] N, K


def matmul_plan(lhs_shape, rhs_shape, dims) -> _Plan:
    """The plain (batched) matmul that ``dims`` is, and how to reach it.

    ``B`` merges the batch axes, ``M`` lhs's free axes (ascending), ``K`` the
    contracting axes (in one pair order on both sides), ``N`` rhs's free axes
    (ascending): the result ``[B,] M, N`` is ``dot_general``'s, reshaped.
    """
    (lc, rc), (lb, rb) = dims
    lf = tuple(d for d in range(len(lhs_shape)) if d not in lc and d not in lb)
    rf = tuple(d for d in range(len(rhs_shape)) if d not in rc and d not in rb)

    def ident(perm):
        return perm == tuple(range(len(perm)))

    # Each pair order of the contracting axes, each layout: fewest copies
    # first, then bfloat16 (lhs M, K) before float32 (lhs K, M); then copies
    # that keep the innermost axis in place. float32 only for an lhs that is
    # [B,] K, M as it stands, the one layout XLA itself runs in float32 (for
    # a plain bf16 dot_general) rather than copy into its library's.
    options = []
    by_lhs = sorted(zip(lc, rc, strict=True))
    for pairs in (by_lhs, sorted(by_lhs, key=lambda p: p[1])):
        lcp, rcp = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
        for lhs_km in (False, True):
            lperm = (*lb, *lcp, *lf) if lhs_km else (*lb, *lf, *lcp)
            for rhs_nk in (False, True):
                rperm = (*rb, *rf, *rcp) if rhs_nk else (*rb, *rcp, *rf)
                copies = (not ident(lperm)) + (not ident(rperm))
                # Among copies, those that keep the innermost axis are cheaper.
                inner = (lperm[-1:] != (len(lperm) - 1,)) + (rperm[-1:] != (len(rperm) - 1,))
                if not lhs_km or (copies == 0 and len(lc) == 1 and len(lf) <= 1):
                    options.append(((copies, lhs_km, inner), lhs_km, rhs_nk, lperm, rperm))
    _, lhs_km, rhs_nk, lperm, rperm = min(options, key=lambda o: o[0])
    nb = len(lb)
    lead = (math.prod(lhs_shape[d] for d in lb),) if nb else ()
    m = math.prod(lhs_shape[d] for d in lf)
    k = math.prod(lhs_shape[d] for d in lc)
    n = math.prod(rhs_shape[d] for d in rf)
    return _Plan(
        None if ident(lperm) else lperm,
        None if ident(rperm) else rperm,
        lead + ((k, m) if lhs_km else (m, k)),
        lead + ((n, k) if rhs_nk else (k, n)),
        lhs_km,
        rhs_nk,
    )


def _widened_dot(a, b, dims, precision):
    f32 = jnp.float32
    a, b = a.astype(f32), b.astype(f32)
    return lax.dot_general(a, b, dims, precision, preferred_element_type=f32)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _cpu_bf16_dot(a, b, dims, precision):
    """bf16 x bf16 -> f32 ``dot_general`` that XLA:CPU runs for every layout
    (see above); differentiable (through float32 dots) and vmappable."""

    @jax.custom_batching.custom_vmap
    def dot(a, b):
        a_shape, b_shape = a.shape, b.shape
        plan = matmul_plan(a_shape, b_shape, dims)
        if plan.lhs_perm is not None:
            a = jnp.transpose(a, plan.lhs_perm)
        if plan.rhs_perm is not None:
            b = jnp.transpose(b, plan.rhs_perm)
        a, b = a.reshape(plan.lhs_shape), b.reshape(plan.rhs_shape)
        nb = len(plan.lhs_shape) - 2
        dn = (
            ((nb + (0 if plan.lhs_km else 1),), (nb + (1 if plan.rhs_nk else 0),)),
            ((0,), (0,)) if nb else ((), ()),
        )
        if plan.lhs_km:
            out = _widened_dot(a, b, dn, precision)
        else:
            a, b = lax.optimization_barrier((a, b))
            out = lax.optimization_barrier(
                lax.dot_general(a, b, dn, precision, preferred_element_type=jnp.float32)
            )
        (lc, rc), (lb, rb) = dims
        return out.reshape(
            tuple(a_shape[d] for d in lb)
            + tuple(a_shape[d] for d in range(len(a_shape)) if d not in lc and d not in lb)
            + tuple(b_shape[d] for d in range(len(b_shape)) if d not in rc and d not in rb)
        )

    @dot.def_vmap
    def _vmapped(axis_size, in_batched, a, b):
        # Batched arguments carry the vmapped axis first.
        del axis_size
        (lc, rc), (lb, rb) = dims
        on_a, on_b = in_batched

        def shift(ds, on):
            return tuple(d + on for d in ds)

        bdims = (shift(lc, on_a), shift(rc, on_b)), (shift(lb, on_a), shift(rb, on_b))
        if on_a and on_b:  # a new leading batch axis
            (lc2, rc2), (lb2, rb2) = bdims
            return _cpu_bf16_dot(a, b, ((lc2, rc2), ((0, *lb2), (0, *rb2))), precision), True
        if not on_b:  # lhs's first free axis, after the batch axes
            where = len(lb)
        else:  # rhs's first free axis, after the batch and lhs free axes
            where = a.ndim - len(lc)
        out = _cpu_bf16_dot(a, b, bdims, precision)
        return jnp.moveaxis(out, where, 0), True

    return dot(a, b)


@_cpu_bf16_dot.defjvp
def _cpu_bf16_dot_jvp(dims, precision, primals, tangents):
    (a, b), (ta, tb) = primals, tangents
    out = _cpu_bf16_dot(a, b, dims, precision)
    return out, _widened_dot(ta, b, dims, precision) + _widened_dot(a, tb, dims, precision)


def check_operands(lhs, rhs, op: str) -> tuple[jax.Array, jax.Array]:
    """Both operands as arrays (or MXTensors) of a float dtype MX quantizes
    (float32, bfloat16, float16)."""
    lhs, rhs = (x if isinstance(x, MXTensor) else jnp.asarray(x) for x in (lhs, rhs))
    for name, x in (("lhs", lhs), ("rhs", rhs)):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.float64:
            raise TypeError(
                f"{name} has dtype {x.dtype}; jaxmx.{op} takes float32, bfloat16 or "
                "float16 operands"
            )
    return lhs, rhs


def check_key(key, config: DotConfig) -> None:
    """A key is only for configs that round stochastically; anything else is a mistake."""
    if key is not None and not config.uses_random_bits:
        raise ValueError(
            "a key was given but the config rounds nothing stochastically "
            f"(rounding={config.rounding!r}, grad_rounding={config.grad_rounding!r}); "
            "drop the key or set rounding/grad_rounding='stochastic'"
        )
