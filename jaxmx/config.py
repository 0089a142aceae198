"""DotConfig: which MX format each operand of a matmul uses, forward and backward.

A training matmul ``Y = dot(A, B)`` quantizes six tensors (MX paper,
Rouhani et al. 2023, arXiv:2310.10537, section 6; OCP MX v1.0 section 6.4):

==========  ===============================  ====================
matmul      operands                         config fields
==========  ===============================  ====================
forward     A, B along their contraction     ``lhs``, ``rhs``
dgrad       dY, B along B's free axis        ``grad``, ``rhs_bwd``
wgrad       A, dY along A's free axis        ``lhs_bwd``, ``grad``
==========  ===============================  ====================

For a Dense layer ``y = x @ W``, ``lhs`` is the activation and ``rhs`` the
weight. A role set to ``None`` stays in high precision.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from jaxmx.formats import MXFormat, get_format
from jaxmx.numerics import ROUNDINGS, SCALE_MODES
from jaxmx.sparsity import NMSparsity
from jaxmx.spec import is_positive_int

__all__ = ["DotConfig", "FORWARD", "as_dot_config", "preset", "list_presets"]

FORWARD = "forward"
"""Sentinel for ``lhs_bwd`` / ``rhs_bwd``: reuse the operand's forward format."""

FormatLike = str | MXFormat | None
_ROLES = ("lhs", "rhs", "grad", "lhs_bwd", "rhs_bwd")
# What DotConfig(implementation=...) takes besides None.
IMPLEMENTATIONS = ("xla", "native", "pallas")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DotConfig:
    """How to quantize the operands of every matmul of a forward and backward pass.

    Format fields take a format name (``jaxmx.list_formats()``), an
    :class:`~jaxmx.MXFormat`, or ``None`` (high precision). Names are
    resolved when the config is made, so a typo fails at once.

    >>> import jaxmx
    >>> cfg = jaxmx.DotConfig(lhs="mxfp6_e3m2", rhs="mxfp4", grad="mxfp6_e3m2")
    >>> cfg.role("rhs_bwd").name, cfg.role("lhs_bwd").name
    ('mxfp4_e2m1', 'mxfp6_e3m2')
    """

    # Forward format of the left operand (activations x in x @ W).
    lhs: FormatLike = None
    # Forward format of the right operand (weights W in x @ W).
    rhs: FormatLike = None
    # Format of the incoming gradient dY, in both backward matmuls.
    grad: FormatLike = None
    # Format of the left operand when re-quantized for the weight-gradient
    # matmul (along its free axis). Default: the forward format.
    lhs_bwd: FormatLike = FORWARD
    # Format of the right operand when re-quantized for the input-gradient
    # matmul (along its free axis). Default: the forward format.
    rhs_bwd: FormatLike = FORWARD
    # Elements per block for every role; None: each format's default (32).
    block_size: int | None = None
    # Shared-exponent rule (see jaxmx.quantize): floor (OCP), rceil, ceil, even.
    scale_mode: str = "floor"
    # Element rounding of the forward and re-quantized operands.
    rounding: str = "nearest_even"
    # Element rounding of dY; None: same as `rounding`. "stochastic" draws its
    # bits from the `key` given to dot_general, or from a hash of dY without one.
    # It is unbiased within the element range; pair it with scale_mode="rceil",
    # since the floor rule saturates some block maxima (a bias of its own).
    grad_rounding: str | None = None
    # What the forward pass saves for the backward one: the high-precision
    # operands (the MX paper's recipe: backward operands are re-quantized from
    # them), or their forward MX copies (less memory; the backward operands are
    # then quantized twice, which is not the paper's recipe).
    residuals: Literal["high_precision", "quantized"] = "high_precision"
    # dtype of the dequantized operands fed to the matmul. Every MX value down
    # to 2^-133 is exact in bfloat16 and products accumulate in float32 either
    # way; None picks bfloat16 on accelerators and, for dot_general/einsum, on
    # CPUs with bfloat16 dot instructions (AVX512-BF16, AMX), float32 on other
    # CPUs (slower bf16 dots there) and for CPU convolutions. On CPU a bfloat16
    # dot runs in a layout XLA:CPU's library kernels take, or widened to
    # float32 where that needs no copy (jaxmx._operand explains why).
    compute_dtype: str | None = None
    # Blocks of the weight (rhs and rhs_bwd) only, overriding block_size for
    # it: an int, or a pair for 2-D tiles over the weight's last two axes
    # (NVFP4's 16x16 weight scaling: the forward and the input-gradient
    # matmul then use the same codes of W and of its transpose).
    rhs_block_size: int | tuple[int, int] | None = None
    # A random Hadamard transform (this order, a power of two, with fixed
    # random signs from hadamard_seed) along the contraction axis of both
    # operands of the weight-gradient matmul, before they are quantized: it
    # spreads outliers across each block and leaves the exact product
    # unchanged (the NVFP4 recipe, arXiv 2509.25149, uses order 16). None: off.
    wgrad_hadamard: int | None = None
    hadamard_seed: int = 0
    # How each matmul runs, as jax.nn.dot_product_attention's argument of the
    # same name. None: chosen per platform when the program is lowered
    # (block-scaled hardware matmuls through lax.scaled_dot where the platform
    # has them, Blackwell-class GPUs, and the formats fit; the exact XLA
    # emulation elsewhere). "xla": the exact emulation everywhere. "native":
    # the forward, dgrad and wgrad matmuls through lax.scaled_dot wherever it
    # runs (on CPU, XLA's reference decomposition: a cross-check); a matmul
    # whose formats cannot run that way raises an error saying why.
    # "pallas": operands quantized by jaxmx's fused Pallas kernels
    # (jaxmx.pallas), the products as "xla", and a float activation times a
    # 2-D MXTensor weight by the weight-only kernel; refused when compiled
    # for a platform with no kernel (the CPU, outside jaxmx.pallas.interpret).
    implementation: Literal["xla", "native", "pallas"] | None = None
    # Fully-sharded data parallelism: the mesh axis the weights (rhs) are
    # sharded over. The forward and the input-gradient matmul then quantize
    # each shard of the weight along their contraction and all-gather its MX
    # codes and scales (jaxmx.fsdp), decoding after the gather; with
    # residuals="quantized" the forward's gathered MX copy is kept for the
    # backward pass instead (one gather per step). A weight in high precision
    # (rhs None) is gathered in compute_dtype (or its own). The mesh is the
    # one set with jax.set_mesh. None: the weight is used as it is.
    fsdp: str | None = None
    # N:M sparsity (jaxmx.NMSparsity) of the left / right operand along its
    # contraction axis (the last one if several): sparsified first, then
    # quantized, in the forward matmul; the backward matmuls use the same
    # sparsified values, and NMSparsity.backward says whether the operand's
    # own gradient is masked. None: dense.
    lhs_sparsity: NMSparsity | None = None
    rhs_sparsity: NMSparsity | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        for role in ("lhs", "rhs", "grad"):
            set_(role, _resolve(role, getattr(self, role)))
        for role in ("lhs_bwd", "rhs_bwd"):
            value = getattr(self, role)
            # FORWARD stays a sentinel, so replace(lhs=...) moves lhs_bwd along.
            if not (isinstance(value, str) and value == FORWARD):
                set_(role, _resolve(role, value))
        if self.block_size is not None:
            if isinstance(self.block_size, bool) or not isinstance(
                self.block_size, (int, np.integer)
            ):
                raise TypeError(
                    f"block_size must be a positive int or None, got {self.block_size!r}"
                )
            if self.block_size <= 0:
                raise ValueError(
                    f"block_size must be a positive int or None, got {self.block_size!r}"
                )
            set_("block_size", int(self.block_size))
        if not isinstance(self.scale_mode, str) or self.scale_mode not in SCALE_MODES:
            raise ValueError(
                f"unknown scale_mode {self.scale_mode!r}; allowed: {', '.join(SCALE_MODES)}"
            )
        rb = self.rhs_block_size
        if isinstance(rb, list):
            rb = tuple(rb)
        ok = (
            rb is None
            or is_positive_int(rb)
            or (isinstance(rb, tuple) and len(rb) == 2 and all(is_positive_int(b) for b in rb))
        )
        if not ok:
            raise ValueError(
                f"rhs_block_size must be None, a positive int or a pair of positive ints "
                f"(2-D tiles), got {self.rhs_block_size!r}"
            )
        set_("rhs_block_size", rb if not isinstance(rb, np.integer) else int(rb))
        if self.wgrad_hadamard is not None:
            h = self.wgrad_hadamard
            if not is_positive_int(h) or h & (h - 1):
                raise ValueError(
                    f"wgrad_hadamard must be None or a power of two (e.g. 16), got {h!r}"
                )
        seed = self.hadamard_seed
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"hadamard_seed must be an int >= 0, got {seed!r}")
        for name in ("rounding", "grad_rounding"):
            value = getattr(self, name)
            if not (value is None and name == "grad_rounding") and (
                not isinstance(value, str) or value not in ROUNDINGS
            ):
                raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(ROUNDINGS)}")
        if not isinstance(self.residuals, str) or self.residuals not in (
            "high_precision",
            "quantized",
        ):
            raise ValueError(
                f"unknown residuals {self.residuals!r}; allowed: high_precision, quantized"
            )
        if self.compute_dtype is not None and (
            not isinstance(self.compute_dtype, str)
            or self.compute_dtype not in ("float32", "bfloat16")
        ):
            raise ValueError(
                f"unknown compute_dtype {self.compute_dtype!r}; allowed: None, float32, bfloat16"
            )
        if self.implementation is not None and (
            not isinstance(self.implementation, str) or self.implementation not in IMPLEMENTATIONS
        ):
            raise ValueError(
                f"unknown implementation {self.implementation!r}; allowed: None (chosen per "
                f"platform), {', '.join(map(repr, IMPLEMENTATIONS))}"
            )
        if self.fsdp is not None and (not isinstance(self.fsdp, str) or not self.fsdp):
            raise ValueError(f"fsdp must be a mesh axis name or None, got {self.fsdp!r}")
        for name in ("lhs_sparsity", "rhs_sparsity"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, NMSparsity):
                raise TypeError(
                    f"{name} must be a jaxmx.NMSparsity or None, got {value!r} "
                    f"({type(value).__name__}); e.g. jaxmx.NMSparsity(2, 4)"
                )

    def role(self, name: str) -> MXFormat | None:
        """The resolved format of a role: lhs, rhs, grad, lhs_bwd or rhs_bwd."""
        if name not in _ROLES:
            raise ValueError(f"unknown role {name!r}; allowed: {', '.join(_ROLES)}")
        value = getattr(self, name)
        if isinstance(value, str) and value == FORWARD:
            return getattr(self, name.removesuffix("_bwd"))
        return value

    @property
    def effective_grad_rounding(self) -> str:
        return self.rounding if self.grad_rounding is None else self.grad_rounding

    @property
    def uses_random_bits(self) -> bool:
        """Whether any quantization of this config rounds stochastically."""
        return "stochastic" in (self.rounding, self.effective_grad_rounding)

    @property
    def is_noop(self) -> bool:
        """True when every role is high precision, no weight is gathered
        (``fsdp``), nothing is sparse and no Pallas kernel is asked for (an
        MXTensor weight runs through the weight-only kernel under
        ``implementation="pallas"``): dot_general is lax.dot_general."""
        return (
            all(self.role(r) is None for r in _ROLES)
            and self.fsdp is None
            and self.lhs_sparsity is None
            and self.rhs_sparsity is None
            and self.implementation != "pallas"
        )

    def replace(self, **changes: object) -> DotConfig:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def for_activations(self) -> DotConfig:
        """The config for a matmul of two activations (attention's q.k and p.v).

        Weight formats (``rhs``, ``rhs_bwd``) are replaced by the activation
        ones, so that e.g. an MXFP4-weight recipe keeps keys and values in the
        activation format, and ``rhs_sparsity`` by ``lhs_sparsity``; ``fsdp``
        is dropped (there is no weight to gather).
        """
        return self.replace(
            rhs=self.lhs, rhs_bwd=self.lhs_bwd, fsdp=None, rhs_sparsity=self.lhs_sparsity
        )

    def swapped(self) -> DotConfig:
        """The config with the operands' roles exchanged (the weight on the left):
        lhs and rhs formats, their backward formats and their sparsity."""
        return self.replace(
            lhs=self.role("rhs"),
            rhs=self.role("lhs"),
            lhs_bwd=self.role("rhs_bwd"),
            rhs_bwd=self.role("lhs_bwd"),
            lhs_sparsity=self.rhs_sparsity,
            rhs_sparsity=self.lhs_sparsity,
        )

    def describe(self) -> str:
        names = {r: (self.role(r).name if self.role(r) else "-") for r in _ROLES}
        text = (
            f"fwd {names['lhs']} x {names['rhs']}; dgrad {names['grad']} x {names['rhs_bwd']}; "
            f"wgrad {names['lhs_bwd']} x {names['grad']}"
        )
        for side in ("lhs", "rhs"):
            sp = getattr(self, f"{side}_sparsity")
            if sp is not None:
                text += f"; {side} {sp.describe()}"
        return text


def _resolve(role: str, value: FormatLike) -> MXFormat | None:
    if value is None:
        return None
    try:
        return get_format(value)
    except (ValueError, TypeError) as err:
        raise type(err)(f"DotConfig.{role}: {err}") from None


# --------------------------------------------------------------------------
# Presets. Each names its source.
# --------------------------------------------------------------------------

_PRESETS: dict[str, tuple[str, DotConfig]] = {
    "fp32": ("no quantization: every matmul in high precision", DotConfig()),
    "mxfp8": (
        "MXFP8 E4M3 for weights, activations and gradients, OCP floor scales "
        "(Rouhani et al. 2023, arXiv:2310.10537)",
        DotConfig(lhs="mxfp8_e4m3", rhs="mxfp8_e4m3", grad="mxfp8_e4m3"),
    ),
    "mxfp8_rceil": (
        "MXFP8 E4M3 everywhere with round-up (RCEIL) scales, the recipe NVIDIA "
        "found stable for LLM pre-training (Mishra et al. 2025, arXiv:2506.08027)",
        DotConfig(lhs="mxfp8_e4m3", rhs="mxfp8_e4m3", grad="mxfp8_e4m3", scale_mode="rceil"),
    ),
    "mxfp8_e5m2_grads": (
        "MXFP8 E4M3 forward, E5M2 gradients: the FP8 hybrid of Micikevicius et al. "
        "2022 (arXiv:2209.05433) with MX block scales",
        DotConfig(lhs="mxfp8_e4m3", rhs="mxfp8_e4m3", grad="mxfp8_e5m2"),
    ),
    "mxfp6": (
        "MXFP6 E3M2 for weights, activations and gradients: the MX paper's "
        "sub-8-bit training result (Rouhani et al. 2023, arXiv:2310.10537)",
        DotConfig(lhs="mxfp6_e3m2", rhs="mxfp6_e3m2", grad="mxfp6_e3m2"),
    ),
    "mxfp4_weights": (
        "MXFP4 weights with MXFP6 E3M2 activations and gradients (Rouhani et al. "
        "2023, arXiv:2310.10537)",
        DotConfig(lhs="mxfp6_e3m2", rhs="mxfp4_e2m1", grad="mxfp6_e3m2"),
    ),
    "mxfp4": (
        "MXFP4 E2M1 for weights, activations and gradients: a stress test, "
        "below what the MX paper trains with",
        DotConfig(lhs="mxfp4_e2m1", rhs="mxfp4_e2m1", grad="mxfp4_e2m1"),
    ),
    "nvfp4": (
        "NVFP4 for weights, activations and gradients with NVIDIA's recipe (NVIDIA 2025, "
        "arXiv 2509.25149): 16x16 weight tiles, a random Hadamard transform of order 16 on "
        "both operands of the weight-gradient matmul, stochastic rounding of gradients. "
        "The paper also keeps a few layers (the last ones) in BF16: choose them by rules",
        DotConfig(
            lhs="nvfp4",
            rhs="nvfp4",
            grad="nvfp4",
            grad_rounding="stochastic",
            rhs_block_size=(16, 16),
            wgrad_hadamard=16,
        ),
    ),
}


def list_presets() -> dict[str, str]:
    """Preset names and what each one is, with its source.

    >>> import jaxmx
    >>> sorted(jaxmx.list_presets())[:3]
    ['fp32', 'mxfp4', 'mxfp4_weights']
    """
    return {name: doc for name, (doc, _) in _PRESETS.items()}


def preset(name: str, **overrides: object) -> DotConfig:
    """A named training recipe as a :class:`DotConfig`, optionally modified.

    Args:
      name: one of :func:`list_presets`: ``"fp32"``, ``"mxfp8"``,
        ``"mxfp8_rceil"``, ``"mxfp8_e5m2_grads"``, ``"mxfp6"``,
        ``"mxfp4_weights"``, ``"mxfp4"``, ``"nvfp4"``.
      **overrides: fields to change, e.g. ``grad_rounding="stochastic"``.

    >>> import jaxmx
    >>> jaxmx.preset("mxfp4_weights").describe()
    'fwd mxfp6_e3m2 x mxfp4_e2m1; dgrad mxfp6_e3m2 x mxfp4_e2m1; wgrad mxfp6_e3m2 x mxfp6_e3m2'
    """
    try:
        cfg = _PRESETS[name][1]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(_PRESETS)}") from None
    return cfg.replace(**overrides) if overrides else cfg


def as_dot_config(config: DotConfig | MXFormat | str) -> DotConfig:
    """Resolves what a ``config=`` argument may be to a :class:`DotConfig`.

    Args:
      config: a DotConfig (returned as it is), a preset name
        (:func:`list_presets`), or a format name (``jaxmx.list_formats()``,
        aliases included), which means that format for all six
        quantizations of every matmul, or an :class:`~jaxmx.MXFormat`.

    Raises:
      TypeError: anything else, e.g. ``None``, ``0`` or ``False``.
      ValueError: a string that is neither a preset nor a format.

    >>> import jaxmx
    >>> jaxmx.as_dot_config("mxint8").describe()
    'fwd mxint8 x mxint8; dgrad mxint8 x mxint8; wgrad mxint8 x mxint8'
    """
    if isinstance(config, DotConfig):
        return config
    if isinstance(config, MXFormat):
        return DotConfig(lhs=config, rhs=config, grad=config)
    if not isinstance(config, str):
        raise TypeError(
            "config must be a DotConfig, a preset name, a format name or an MXFormat, got "
            f"{config!r} ({type(config).__name__})"
        )
    if config in _PRESETS:
        return _PRESETS[config][1]
    try:
        fmt = get_format(config)
    except ValueError:
        raise ValueError(
            f"unknown config {config!r}: not a preset ({', '.join(_PRESETS)}) nor a format "
            "name (jaxmx.list_formats(aliases=True))"
        ) from None
    return DotConfig(lhs=fmt, rhs=fmt, grad=fmt)
