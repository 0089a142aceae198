"""Independent NumPy models of NVFP4, shared-microexponent formats and per-tensor FP8.

These are the ground truth that jaxmx's generalized block-scaled core is
tested against. They share no code with jaxmx: every step is written out as
the implementation it models computes it, with ``np.float32`` arithmetic
where that implementation works in float32 (each operation rounds to nearest
even, exactly as on a GPU) and exact float64 arithmetic where the result
does not depend on precision. They are slow, vectorized and plain on purpose.

Models (semantics in ``tests/data/vectors_turn2/README.md``):

* :func:`nvfp4_te`: NVIDIA TransformerEngine's NVFP4 (E2M1 elements, one
  unsigned E4M3 scale per 1x16 block or 16x16 tile, one float32 tensor
  scale), and its two dequantization formulas.
* :func:`nvfp4_torchao`: torchao's ``NVFP4Tensor`` (two-level and single-level
  scaling), which differs from TE below scale 2^-6 and at degenerate amax.
* :func:`quark_mx`: AMD Quark 0.13's ``fake_quantize_mx6_mx9`` for MX9, MX6,
  MX4 (a 1-bit microexponent per pair) and MSFP16, MSFP12 (none).
* :func:`quark_bfp16`: Quark's registered ``bfp16`` (blocks of 8, int8 codes).
* :func:`tensor_fp8`: per-tensor FP8 current scaling (one float32 scale,
  ``amax / max_normal``).

Reference: Rouhani et al., "With Shared Microexponents, A Little Shifting
Goes a Long Way" (ISCA 2023), for MX9/MX6/MX4 and MSFP; NVIDIA's NVFP4
(TransformerEngine ``quantize_nvfp4`` / ``dequantize_nvfp4.cuh``).
"""

from __future__ import annotations

from typing import NamedTuple

import ml_dtypes
import numpy as np

__all__ = [
    "E2M1_VALUES",
    "QUARK_FORMATS",
    "BDR",
    "NVFP4",
    "TensorFP8",
    "fp4_code",
    "nvfp4_te",
    "nvfp4_torchao",
    "pack_fp4",
    "quark_bfp16",
    "quark_mx",
    "tensor_fp8",
]

F32 = np.float32
FLT_MAX = F32(np.finfo(np.float32).max)  # 0x1.fffffep127
E4M3 = ml_dtypes.float8_e4m3fn
E4M3_MAX = F32(448.0)  # 0x1.Cp8, code 0x7E
FP4_MAX = F32(6.0)  # 0x1.8p2, code 0x7
# 448 * 6 = 2688: the largest value a block scale times an element can reach.
NVFP4_RANGE = F32(2688.0)
MIN_NORMAL_F32 = F32(2.0**-126)

# E2M1 code -> value; bit 3 is the sign (code 8 is -0.0).
E2M1_VALUES = np.array(
    [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32
)


# --------------------------------------------------------------------------
# Shared helpers.
# --------------------------------------------------------------------------


def _as_float32(x) -> np.ndarray:
    # float16 / bfloat16 widen to float32 exactly; float64 would round, so refuse it.
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float16, ml_dtypes.bfloat16):
        raise TypeError(f"x has dtype {x.dtype}; the models take float32, float16 or bfloat16")
    if x.ndim == 0:
        raise ValueError("x is a scalar (0-d); block formats need an axis")
    return x.astype(np.float32)


def _axis(axis, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis {axis} is out of range for rank {ndim}; allowed {-ndim}..{ndim - 1}"
        )
    return int(axis) % ndim


def _f32_bits(v: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(v, dtype=np.float32).view(np.uint32)


def fp4_code(v: np.ndarray) -> np.ndarray:
    """The E2M1 code of float32 ``v``: nearest value, ties to the even code.

    Saturates at 6 and keeps the sign bit (-0.0 and negatives that round to
    zero give code 8). Midpoints: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2,
    2.5 -> 2, 3.5 -> 4, 5 -> 4 (the lower neighbour where its code is even).

    NaN has no E2M1 code. This returns what torchao's ``f32_to_f4_unpacked``
    (the helper behind the TE and torchao vectors) computes for it: NaN goes
    down its normal-number path, giving magnitude code 2..4 from the
    payload bits (4 for the 0x7FF00000 magnitude of an E4M3-born NaN).
    Every model here gives such elements a NaN scale, so their dequantized
    value is NaN whatever the code.

    >>> fp4_code(np.array([0.25, 0.75, -1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.0], np.float32))
    array([ 0,  2, 10,  4,  4,  6,  6,  7,  8], dtype=uint8)
    """
    v = np.asarray(v, np.float32)
    bits = _f32_bits(v)
    m = np.abs(v)
    # Each comparison is one step up the grid; > at midpoints that go down
    # (lower code even), >= at midpoints that go up.
    mag = (
        (m > 0.25).astype(np.uint8)
        + (m >= 0.75)
        + (m > 1.25)
        + (m >= 1.75)
        + (m > 2.5)
        + (m >= 3.5)
        + (m > 5.0)
    ).astype(np.uint8)
    # torchao's normal path on a NaN's magnitude bits: add the exponent-bias
    # change and the rounding constant (2^21 - 1, plus the mantissa's odd
    # bit), shift out 22 bits, keep a byte.
    mag_bits = (bits & 0x7FFFFFFF).astype(np.int64)
    odd = (mag_bits >> 22) & 1
    nan_mag = (((mag_bits + (-126 << 23) + (2**21 - 1) + odd) >> 22) & 0xFF).astype(np.uint8)
    mag = np.where(np.isnan(v), nan_mag, mag)
    return (mag | ((bits >> 31).astype(np.uint8) << 3)).astype(np.uint8)


def pack_fp4(codes: np.ndarray, axis: int = -1) -> np.ndarray:
    """Two 4-bit codes per byte along ``axis``: element 2i in the low nibble.

    >>> pack_fp4(np.array([1, 2, 15, 8], np.uint8))
    array([ 33, 143], dtype=uint8)
    """
    c = np.moveaxis(np.asarray(codes, np.uint8), axis, -1)
    if c.shape[-1] % 2:
        raise ValueError(f"packing needs an even length along axis {axis}, got {c.shape[-1]}")
    return np.moveaxis((c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8), -1, axis)


def _e4m3(v: np.ndarray) -> np.ndarray:
    # Round-to-nearest-even cast; callers clamp to 448 first (ml_dtypes maps
    # |v| >= 464 to NaN instead of saturating). NaN stays NaN (0x7F / 0xFF).
    return np.asarray(v, np.float32).astype(E4M3)


def _e4m3_bits(s: np.ndarray) -> np.ndarray:
    return np.asarray(s).view(np.uint8)


def _e4m3_to_f32(s: np.ndarray) -> np.ndarray:
    """Widens E4M3 to float32, keeping a NaN's sign and mantissa bits.

    ml_dtypes turns NaN into the canonical 0x7FC00000 (signed); PyTorch's
    conversion, which produced the vectors, shifts the bits over, so byte
    0xFF becomes 0xFFF00000. The payload then flows through the arithmetic
    into :func:`fp4_code` of a NaN (only the degenerate cases see it).
    """
    b = _e4m3_bits(s).astype(np.uint32)
    nan = ((b & 0x80) << 24) | 0x7F800000 | ((b & 0x7) << 20)
    f = np.where((b & 0x7F) == 0x7F, nan, _f32_bits(np.asarray(s).astype(np.float32)))
    return f.astype(np.uint32).view(np.float32)


# --------------------------------------------------------------------------
# NVFP4.
# --------------------------------------------------------------------------


class NVFP4(NamedTuple):
    """NVFP4 quantization of a tensor (codes in x's shape, blocks along the axis)."""

    codes: np.ndarray  # uint8 E2M1 codes, x's shape
    scales: np.ndarray  # uint8 E4M3 bit patterns, x's shape with the axis // 16
    dequant: np.ndarray  # float32, x's shape
    global_amax: np.float32  # the tensor amax used (torchao 1-level: NaN, unused)
    # TE only (None for torchao): the global encode scale, its reciprocal, the
    # float32 encode scale per block (1x16: like ``scales``; 16x16: per tile,
    # ``(rows // 16, cols // 16)`` of the 2-D view), x * encode before
    # rounding, the alternative decode, and the per-tile scale bytes.
    s_enc: np.float32 | None = None
    s_dec_global: np.float32 | None = None
    encode_scale: np.ndarray | None = None
    scaled: np.ndarray | None = None
    dequant_enc: np.ndarray | None = None
    tile_scales: np.ndarray | None = None


def _blocks_2d(xm: np.ndarray, tile: str):
    """Block-amax layout of an array whose blocked axis is last."""
    n = xm.shape[-1]
    if n % 16:
        raise ValueError(
            f"NVFP4 needs the blocked axis to be a multiple of 16 (TE rejects partial "
            f"blocks), got length {n}"
        )
    if tile == "1x16":
        blocks = xm.reshape(*xm.shape[:-1], n // 16, 16)
        return blocks, np.max(np.abs(blocks), axis=-1)
    if tile != "16x16":
        raise ValueError(f"tile must be '1x16' or '16x16', got {tile!r}")
    if xm.ndim < 2:
        raise ValueError("16x16 tiles need an array of rank >= 2")
    rows = int(np.prod(xm.shape[:-1]))
    if rows % 16:
        raise ValueError(
            f"16x16 tiles need the other axes to flatten to a multiple of 16 rows, got {rows}"
        )
    tiles = xm.reshape(rows // 16, 16, n // 16, 16)
    return tiles, np.max(np.abs(tiles), axis=(1, 3))


def nvfp4_te(x, *, axis: int = -1, tile: str = "1x16", tensor_amax=None) -> NVFP4:
    """TransformerEngine's NVFP4 quantization, one float32 operation at a time.

    ``x`` is blocked along ``axis`` in blocks of 16 (``tile="1x16"``), or in
    16x16 tiles (``tile="16x16"``, TE's 2-D weight scaling) of the 2-D view
    that moves ``axis`` last and flattens the others into rows, as TE
    flattens a tensor. A length that is not a multiple of 16 raises
    ValueError (TE rejects partial blocks).

    Steps (``e4m3`` rounds to nearest even, ``fp4`` is :func:`fp4_code`)::

        S_enc   = 2688 / amax; S_enc = min(S_enc, FLT_MAX); S_enc = 1 if amax == 0 or S_enc == 0
        s8      = e4m3(min(block_amax * (S_enc * f32(1/6)), 448))   # no lower clamp
        encode  = min(1 / (s8 * (1 / S_enc)), FLT_MAX)              # a zero scale gives FLT_MAX
        code    = fp4(clamp(x * encode, -6, 6))
        dequant = value(code) * ((s8 * amax) * f32(1/2688))          # TE's dequantize kernel
        dequant_enc = value(code) * (s8 * (1 / S_enc))

    ``amax`` is ``tensor_amax`` if given, else ``max |x|`` (NaN if x holds
    NaN). Specials follow the formulas: NaN in x makes amax NaN, so every
    scale is NaN (byte 0x7F) and every dequantized value NaN; an Inf makes
    amax Inf, so S_enc = 2688 / Inf = 0 falls back to 1, the Inf element
    takes code +-6 and, through TE's ``s8 * amax`` decode, every element
    dequantizes to +-Inf (NaN for zero codes) while ``dequant_enc`` stays
    finite. Float32 subnormal inputs are not flushed.

    >>> r = nvfp4_te(np.array([[0.0] * 15 + [6.0]], np.float32))
    >>> int(r.codes[0, -1]), float(r.scales.view(E4M3)[0, 0]), float(r.dequant[0, -1])
    (7, 448.0, 6.0)
    """
    x = _as_float32(x)
    ax = _axis(axis, x.ndim)
    xm = np.moveaxis(x, ax, -1)
    blocks, block_amax = _blocks_2d(xm, tile)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        amax = F32(np.max(np.abs(x))) if tensor_amax is None else F32(tensor_amax)
        s_enc = F32(np.minimum(NVFP4_RANGE / amax, FLT_MAX))
        if amax == 0 or s_enc == 0:
            s_enc = F32(1.0)
        s8 = _e4m3(np.minimum(block_amax * F32(s_enc * (F32(1.0) / F32(6.0))), E4M3_MAX))
        s8f = _e4m3_to_f32(s8)
        s_dec_g = F32(F32(1.0) / s_enc)
        encode = np.minimum(F32(1.0) / (s8f * s_dec_g), FLT_MAX)
        if tile == "1x16":
            enc_b, s8f_b = encode[..., None], s8f[..., None]
        else:
            enc_b, s8f_b = encode[:, None, :, None], s8f[:, None, :, None]
        scaled = blocks * enc_b
        codes = fp4_code(np.clip(scaled, -FP4_MAX, FP4_MAX))
        vals = E2M1_VALUES[codes]
        dequant = vals * ((s8f_b * amax) * (F32(1.0) / NVFP4_RANGE))
        dequant_enc = vals * (s8f_b * s_dec_g)
    bits = _e4m3_bits(s8)
    if tile == "1x16":
        scales, tile_scales = bits, None
    else:
        # Each tile's scale repeated on its 16 rows: one byte per 1x16 run.
        scales = np.repeat(bits, 16, axis=0).reshape(*xm.shape[:-1], -1)
        tile_scales = bits

    def back(a):
        return np.moveaxis(a.reshape(xm.shape), -1, ax)

    return NVFP4(
        codes=back(codes),
        scales=np.moveaxis(scales, -1, ax),
        dequant=back(dequant),
        global_amax=amax,
        s_enc=s_enc,
        s_dec_global=s_dec_g,
        encode_scale=np.moveaxis(encode, -1, ax) if tile == "1x16" else encode,
        scaled=back(scaled),
        dequant_enc=back(dequant_enc),
        tile_scales=tile_scales,
    )


def nvfp4_torchao(x, *, axis: int = -1, two_level: bool = True, tensor_amax=None) -> NVFP4:
    """torchao 0.18's ``NVFP4Tensor.to_nvfp4`` and ``dequantize`` (1x16 blocks).

    Two-level (``per_tensor_scale = amax / 2688``)::

        pts  = amax / 2688
        s8   = e4m3(clamp((block_amax / 6) / pts, 2^-6, 448))      # floor at 2^-6
        code = fp4(clamp(x * ((1 / pts) / s8), -6, 6))
        dequant = value(code) * (pts * s8)

    Single-level: ``s8 = e4m3(clamp(block_amax / 6, 2^-6, 448))``,
    ``code = fp4(clamp(x * (1 / s8), -6, 6))``, ``dequant = value(code) * s8``.
    An all-zero block gets scale 2^-6 (byte 0x08); an all-zero tensor in
    two-level mode gives ``pts = 0``, ``0 / 0 = NaN``: every scale NaN.

    >>> r = nvfp4_torchao(np.zeros((1, 16), np.float32), two_level=False)
    >>> int(r.scales[0, 0]), float(r.dequant.max())
    (8, 0.0)
    """
    x = _as_float32(x)
    ax = _axis(axis, x.ndim)
    xm = np.moveaxis(x, ax, -1)
    blocks, block_amax = _blocks_2d(xm, "1x16")
    lo = F32(2.0**-6)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        if two_level:
            amax = F32(np.max(np.abs(x))) if tensor_amax is None else F32(tensor_amax)
            pts = F32(amax / NVFP4_RANGE)
            s8 = _e4m3(np.clip((block_amax / F32(6.0)) / pts, lo, E4M3_MAX))
            s8f = _e4m3_to_f32(s8)[..., None]
            codes = fp4_code(np.clip(blocks * ((F32(1.0) / pts) / s8f), -FP4_MAX, FP4_MAX))
            dequant = E2M1_VALUES[codes] * (pts * s8f)
        else:
            amax = F32(np.nan)
            s8 = _e4m3(np.clip(block_amax / F32(6.0), lo, E4M3_MAX))
            s8f = _e4m3_to_f32(s8)[..., None]
            codes = fp4_code(np.clip(blocks * (F32(1.0) / s8f), -FP4_MAX, FP4_MAX))
            dequant = E2M1_VALUES[codes] * s8f
    return NVFP4(
        codes=np.moveaxis(codes.reshape(xm.shape), -1, ax),
        scales=np.moveaxis(_e4m3_bits(s8), -1, ax),
        dequant=np.moveaxis(dequant.reshape(xm.shape), -1, ax),
        global_amax=amax,
    )


# --------------------------------------------------------------------------
# Shared-microexponent formats (AMD Quark).
# --------------------------------------------------------------------------

# name -> (quant_bit: sign + magnitude bits of a code, sub_block_size: elements
# sharing one microexponent bit; equal to the block size it switches them off).
QUARK_FORMATS = {
    "mx9": (8, 2),
    "mx6": (5, 2),
    "mx4": (3, 2),
    "msfp16": (8, 16),
    "msfp12": (4, 16),
}


class BDR(NamedTuple):
    """A shared-microexponent quantization; ``y = codes * 2**step_exp``."""

    y: np.ndarray  # float32, x's shape (NaN / Inf passed through)
    codes: np.ndarray  # float32 integer-valued signed codes, x's shape
    step_exp: np.ndarray  # int16 power of two of each element, x's shape
    block_exp: np.ndarray  # int16 shared exponent, x's shape with the axis -> blocks
    micro: np.ndarray  # uint8 microexponent bits, the axis -> (blocks, sub-blocks)


def _rawexp(v: np.ndarray) -> np.ndarray:
    # The biased float32 exponent field minus 127: zero and subnormals give -127.
    return ((_f32_bits(v) >> 23) & 0xFF).astype(np.int32) - 127


def quark_mx(
    x,
    fmt: str | None = None,
    *,
    axis: int = -1,
    block_size: int = 16,
    quant_bit: int | None = None,
    sub_block_size: int | None = None,
) -> BDR:
    """AMD Quark 0.13 ``fake_quantize_mx6_mx9`` (MX9/MX6/MX4, MSFP16/MSFP12).

    ``fmt`` is a name of :data:`QUARK_FORMATS`, or ``None`` with explicit
    ``quant_bit`` and ``sub_block_size``. Blocks of ``block_size`` along
    ``axis``; a partial last block is zero-padded (the padding cannot change
    a block exponent or a microexponent: zero counts as below any exponent).

    Per block::

        rawexp(v)  = float32 exponent field of v - 127         # 0 and subnormals: -127
        x'         = +0.0 where |x| < 2^-126 else x             # flushes subnormals and -0.0
        z          = x' with NaN and +-Inf replaced by 0         # chooses exponents only
        block_exp  = rawexp(max |z|)
        micro      = 1 for a sub-block iff block_exp - rawexp(z_i) >= 1 for all its elements
        step_exp_i = block_exp - micro - quant_bit + 2
        code_i     = clip(round_half_even(x'_i / 2^step_exp_i), +-(2^(quant_bit-1) - 1))
        y_i        = code_i * 2^step_exp_i, or x_i itself where x_i is NaN or +-Inf

    The microexponent is chosen before rounding, so an element of a shifted
    pair that rounds up to ``2^block_exp`` is clipped to the top code of the
    finer grid. The division and rounding are exact here (float64: every
    ``2^step_exp`` and quotient is representable), as they are in Quark's
    float32 for the exponents float32 can hold. NaN elements get a NaN code,
    Inf elements the saturated code, and both keep their input value in y.

    >>> r = quark_mx(np.array([[3.0, 0.2, 0.9, 0.1] + [0.0] * 12], np.float32), "mx4")
    >>> r.y[0, :4].tolist(), r.micro[0, 0, :2].tolist(), int(r.block_exp[0, 0])
    ([3.0, 0.0, 1.0, 0.0], [0, 1], 1)
    """
    if fmt is not None:
        if fmt not in QUARK_FORMATS:
            raise ValueError(f"unknown format {fmt!r}; allowed: {', '.join(QUARK_FORMATS)}")
        if quant_bit is not None or sub_block_size is not None:
            raise ValueError("give a format name or quant_bit/sub_block_size, not both")
        quant_bit, sub_block_size = QUARK_FORMATS[fmt]
    elif quant_bit is None or sub_block_size is None:
        raise ValueError("without a format name, quant_bit and sub_block_size are required")
    if not 2 <= quant_bit <= 16:
        raise ValueError(f"quant_bit must be 2..16, got {quant_bit}")
    if block_size < 1 or sub_block_size < 1 or block_size % sub_block_size:
        raise ValueError(
            f"sub_block_size {sub_block_size} must divide block_size {block_size} (both >= 1)"
        )
    x = _as_float32(x)
    ax = _axis(axis, x.ndim)
    xm = np.moveaxis(x, ax, -1)
    n = xm.shape[-1]
    nb = -(-n // block_size)
    xp = np.concatenate([xm, np.zeros((*xm.shape[:-1], nb * block_size - n), np.float32)], -1)
    with np.errstate(invalid="ignore"):
        xf = np.where(np.abs(xp) < MIN_NORMAL_F32, F32(0.0), xp)
    z = np.where(np.isfinite(xf), xf, F32(0.0))
    e = _rawexp(z).reshape(*xm.shape[:-1], nb, block_size)
    block_exp = e.max(axis=-1)
    sub = e.reshape(*e.shape[:-1], block_size // sub_block_size, sub_block_size)
    micro = np.all(block_exp[..., None, None] - sub >= 1, axis=-1)
    step = (
        block_exp[..., None]
        - np.repeat(micro, sub_block_size, axis=-1).astype(np.int32)
        - quant_bit
        + 2
    ).reshape(xp.shape)
    top = 2.0 ** (quant_bit - 1) - 1
    with np.errstate(invalid="ignore"):
        codes = np.clip(np.round(xf.astype(np.float64) / np.exp2(step)), -top, top)
    y = (codes * np.exp2(step)).astype(np.float32)
    y = np.where(np.isfinite(xp), y, xp)[..., :n]

    def back(a):
        return np.moveaxis(a, -1, ax)

    return BDR(
        y=back(y),
        codes=back(codes[..., :n].astype(np.float32)),
        step_exp=back(step[..., :n].astype(np.int16)),
        block_exp=back(block_exp.astype(np.int16)),
        micro=np.moveaxis(micro.astype(np.uint8), (-2, -1), (ax, ax + 1)),
    )


def quark_bfp16(x, *, axis: int = -1, block_size: int = 8) -> np.ndarray:
    """Quark's registered ``bfp16``: blocks of 8, int8 codes, a power-of-two scale.

    Per block: ``scale = 2^(floor(log2(amax)) - 6)``; ``q = round_half_even(x
    * (1 / scale))``; if any ``q`` of the block falls outside [-128, 127] the
    scale doubles once and ``q`` is recomputed; ``y = q * scale``. An
    all-zero block stays zero. Finite inputs only (Quark's own handling of
    NaN/Inf and subnormal amax is not modelled): returns ``y`` in float32.

    >>> # 1.999 * 2^6 rounds to 128, outside int8: the scale doubles to 2^-5.
    >>> quark_bfp16(np.array([[1.999, 1.0, 0.0, 0.0, 0.0, 0.0, 0.01, -0.5]], np.float32)).tolist()
    [[2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.5]]
    """
    x = _as_float32(x)
    if not np.all(np.isfinite(x)):
        raise ValueError("quark_bfp16 models finite inputs only")
    ax = _axis(axis, x.ndim)
    xm = np.moveaxis(x, ax, -1)
    n = xm.shape[-1]
    if n % block_size:
        raise ValueError(f"length {n} along the axis is not a multiple of {block_size}")
    b = xm.reshape(*xm.shape[:-1], n // block_size, block_size).astype(np.float64)
    amax = np.max(np.abs(b), axis=-1, keepdims=True)
    _, k = np.frexp(amax)  # amax = f * 2^k with f in [0.5, 1): floor(log2(amax)) = k - 1
    scale = np.exp2(np.where(amax > 0, k - 1 - 6, 0).astype(np.float64))
    q = np.round(b / scale)
    bump = np.any((q < -128) | (q > 127), axis=-1, keepdims=True)
    scale = np.where(bump, 2 * scale, scale)
    # Integer codes: two's complement has no -0, so negatives that round to zero give +0.
    y = (np.clip(np.round(b / scale), -128, 127) + 0.0) * scale
    return np.moveaxis(y.reshape(xm.shape).astype(np.float32), -1, ax)


# --------------------------------------------------------------------------
# Per-tensor FP8 current scaling.
# --------------------------------------------------------------------------

_FP8 = {
    "e4m3": (ml_dtypes.float8_e4m3fn, F32(448.0)),  # 0x1.Cp8, code 0x7E
    "e5m2": (ml_dtypes.float8_e5m2, F32(57344.0)),  # 0x1.Cp15, code 0x7B
}


class TensorFP8(NamedTuple):
    """Per-tensor FP8: ``y = float32(codes) * scale``."""

    codes: np.ndarray  # ml_dtypes float8 elements, x's shape
    scale: np.float32  # the decode scale amax / max_normal (NaN for a nonfinite x)
    y: np.ndarray  # float32 dequantized values


def tensor_fp8(x, element: str = "e4m3") -> TensorFP8:
    """FP8 with one float32 scale per tensor, from the tensor's current amax.

    ::

        amax  = max |x|                                  # float32
        scale = amax / max_normal                        # one float32 division
        code  = fp8(clamp(x / scale, -max_normal, max_normal))   # RNE, saturating
        y     = float32(code) * scale

    Choices where the formula breaks down (documented, and tested):

    * ``amax == 0``: ``scale = 1`` (as TransformerEngine does), so codes and
      ``y`` are zeros that keep x's signs.
    * ``0 < amax < 448 * 2^-150`` (the division underflows to 0): the scale is
      the smallest positive float32, 2^-149, so ``x / scale`` stays finite.
    * NaN or Inf anywhere: the scale is NaN and every element is NaN (E4M3's
      NaN code; E5M2's NaN), the convention jaxmx uses for a block holding a
      NaN or Inf, the tensor being the block here. Per-tensor scaling cannot
      carry one Inf without destroying every other element anyway.

    >>> r = tensor_fp8(np.array([1.0, -2.0, 3.1, 448.0], np.float32))
    >>> float(r.scale), r.y.tolist()
    (1.0, [1.0, -2.0, 3.0, 448.0])
    """
    if element not in _FP8:
        raise ValueError(f"element must be one of {', '.join(_FP8)}, got {element!r}")
    dtype, top = _FP8[element]
    x = _as_float32(x)
    if x.size == 0:
        raise ValueError("x is empty: there is no amax to scale by")
    amax = F32(np.max(np.abs(x)))
    if not np.isfinite(amax):
        nan = np.full(x.shape, np.nan, np.float32)
        return TensorFP8(nan.astype(dtype), F32(np.nan), nan)
    if amax == 0:
        scale = F32(1.0)
    else:
        scale = max(F32(amax / top), F32(2.0**-149))
    codes = np.clip(x / scale, -top, top).astype(dtype)
    return TensorFP8(codes, scale, codes.astype(np.float32) * scale)
