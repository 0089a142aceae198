"""The family protocol and its registry.

A *family* is the arithmetic that joins a format's records into values:
how a block's scale is chosen, how elements round onto it, how codes decode
(OCP MX, TransformerEngine's NVFP4, AMD Quark's shared microexponents,
per-tensor FP8). Every format names its family (``MXFormat.family``); every
part of jaxmx that depends on the arithmetic asks the family registered
under that name, through the methods below, and nothing else. A new family
is one class implementing :class:`Family`, registered with
:func:`register_family` before its formats are made.

The protocol is declared here, at the bottom of the package, so that the
format records can validate themselves against their family; the
implementations live in :mod:`jaxmx.families` (and anywhere outside the
package), above the MXTensor they build.
"""

from __future__ import annotations

import abc
import difflib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # annotations only: these modules import this one
    import jax

    from jaxmx.formats._records import MXFormat
    from jaxmx.spec import QuantSpec
    from jaxmx.tensor import MXTensor

__all__ = [
    "Family",
    "FamilyRules",
    "register_family",
    "get_family",
    "list_families",
    "DESCRIPTIONS",
    "DEFAULT_OFFSETS",
]

# The exponent offsets a scale search tries by default (jaxmx.ptq).
DEFAULT_OFFSETS = (0, 1, -1, -2)


class FamilyRules(NamedTuple):
    """The options a family accepts: what :class:`jaxmx.spec.QuantSpec` checks."""

    # Element roundings it implements (names of jaxmx.numerics.ROUNDINGS).
    roundings: tuple[str, ...]
    # Shared-exponent rules it implements (the first is the default).
    scale_modes: tuple[str, ...]
    # Whether flush_subnormals=True means anything for it.
    flush_subnormals: bool
    # Block sizes: "any" (a positive int), "tiles" (an int or a pair of ints,
    # 2-D tiles over the last two axes), "fixed" (the format's own only), or
    # "tensor" (no blocks: one scale per tensor).
    block_sizes: str
    # Whether a global amax may be supplied (tensor_amax=).
    tensor_amax: bool
    # Whether jaxmx.array_ops acts on its codes and scales (transpose,
    # reshape, slicing, concatenate, sign and power-of-two ops). The rules
    # are written for one level of block scales and no tensor scale.
    array_ops: bool


class Family(abc.ABC):
    """One arithmetic of block-scaled formats, as jaxmx uses it.

    Subclasses set the three class attributes and implement the abstract
    methods; the optional ones (post-training quantization, native
    matmuls) have defaults that say "not supported", which the callers turn
    into clear errors. ``spec`` arguments are a validated, frozen
    :class:`jaxmx.spec.QuantSpec` whose ``format.family`` is this family;
    ``x`` is a float32, bfloat16 or float16 array; ``rbits`` the uint32
    random bits of stochastic rounding (shaped like ``x``) or None;
    ``tensor_amax`` a float32 scalar or None. Methods are called while
    tracing, so they must be traceable (and may be jitted with ``spec`` as
    the static argument).
    """

    #: The registry key, stored in ``MXFormat.family``.
    name: str
    #: One line: the reference implementation this arithmetic is exact with.
    description: str
    #: The options it accepts.
    rules: FamilyRules

    @abc.abstractmethod
    def check_format(self, fmt: MXFormat) -> None:
        """Raises ValueError if the record ``fmt`` has fields this arithmetic
        cannot honour (called when the record is made)."""

    @abc.abstractmethod
    def quantize(
        self, x: jax.Array, rbits: jax.Array | None, tensor_amax: jax.Array | None, spec: QuantSpec
    ) -> Any:
        """``x`` as an :class:`~jaxmx.MXTensor` of ``spec``: codes (packed if
        ``spec.packed``), scales and any tensor scale or microexponents."""

    @abc.abstractmethod
    def fake_quantize(
        self, x: jax.Array, rbits: jax.Array | None, tensor_amax: jax.Array | None, spec: QuantSpec
    ) -> Any:
        """The values of ``quantize`` then ``dequantize``, in ``x``'s dtype."""

    @abc.abstractmethod
    def dequantize(self, t: MXTensor, dtype: jax.typing.DTypeLike) -> Any:
        """The values of ``t`` (unpacked, block axis counted from the end, one
        tensor scale) in ``dtype`` (float32, bfloat16 or float16)."""

    def onto(self, x: jax.Array, like: MXTensor, spec: QuantSpec) -> Any:
        """``x`` rounded to nearest onto the scales of ``like`` (an unpacked
        tensor of this family blocked as ``spec``), for GPTQ's last step.
        Values already on that grid must keep their value exactly."""
        raise NotImplementedError(f"the {self.name} family has no fixed-scale encoder")

    def search(
        self,
        x: jax.Array,
        offsets: tuple[int, ...],
        importance: jax.Array | None,
        spec: QuantSpec,
    ) -> Any:
        """``x`` quantized with each block's scale chosen by (weighted)
        squared error (``importance``: shaped like ``x``, or None); no
        block's error may exceed the direct cast's."""
        raise NotImplementedError(f"the {self.name} family has no scale search")

    def fake_search(self, x: jax.Array, offsets: tuple[int, ...], spec: QuantSpec) -> Any:
        """The values of :meth:`search` (no importance) in one pass, or None
        to let the caller decode the searched tensor."""
        return None

    def grid(self, like: MXTensor) -> Any:
        """The per-entry parameter of the fixed grid of ``like`` (an unpacked
        tensor of this family), shaped like ``like``: what
        :meth:`round_to_grid` takes for each entry."""
        raise NotImplementedError(f"the {self.name} family has no fixed grid for GPTQ")

    def round_to_grid(self, w: jax.Array, param: jax.Array, fmt: MXFormat) -> Any:
        """float32 ``w`` rounded to nearest (ties to even) onto the grid each
        entry's ``param`` (from :meth:`grid`) describes, saturating."""
        raise NotImplementedError(f"the {self.name} family has no fixed grid for GPTQ")

    def native_matmuls(self, fmt: MXFormat) -> tuple[str, ...]:
        """Names of the native block-scaled matmuls that take ``fmt``'s
        codes and scales as they are stored (``"scaled_dot"``:
        ``jax.lax.scaled_dot``)."""
        return ()

    @property
    def searchable(self) -> bool:
        """Whether this family implements the post-training methods."""
        return type(self).search is not Family.search

    def __repr__(self) -> str:
        return f"<jaxmx family {self.name!r}>"


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Adds ``family`` to the registry under ``family.name`` and returns it.

    Register a family before making the formats that name it.

    Raises:
      TypeError: ``family`` is not a :class:`Family` instance.
      ValueError: the name is taken, or the record is incomplete.

    >>> import jaxmx
    >>> jaxmx.register_family(jaxmx.get_family("ocp"))
    Traceback (most recent call last):
    ...
    ValueError: family 'ocp' is already registered (registered: ocp, nvfp4, microexp, tensor)

    ``tests/test_family_from_outside.py`` registers a new family end to end.
    """
    if not isinstance(family, Family):
        raise TypeError(
            f"register_family expects an instance of a jaxmx.formats.Family subclass, got "
            f"{type(family).__name__}"
        )
    name = getattr(family, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"a family needs a non-empty string name, got {name!r}")
    if not isinstance(getattr(family, "rules", None), FamilyRules):
        raise ValueError(f"family {name!r}: rules must be a FamilyRules")
    if not isinstance(getattr(family, "description", None), str):
        raise ValueError(f"family {name!r}: description must be a string")
    if name in _FAMILIES:
        raise ValueError(
            f"family {name!r} is already registered (registered: {', '.join(_FAMILIES)})"
        )
    _FAMILIES[name] = family
    return family


def get_family(name: str | MXFormat) -> Family:
    """The family registered under ``name`` (a string, or a format: its family).

    >>> import jaxmx
    >>> jaxmx.get_family(jaxmx.get_format("mx6"))
    <jaxmx family 'microexp'>
    >>> jaxmx.get_family("nvfp4").rules.block_sizes
    'tiles'
    """
    name = getattr(name, "family", name)
    try:
        return _FAMILIES[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(_FAMILIES), n=2, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(
            f"unknown family {name!r}{hint}; registered: {', '.join(_FAMILIES)} (a new family "
            "is registered with jaxmx.formats.register_family before its formats are made)"
        ) from None


def list_families() -> list[str]:
    """Names of the registered families, in registration order.

    >>> import jaxmx
    >>> jaxmx.list_families()
    ['ocp', 'nvfp4', 'microexp', 'tensor']
    """
    return list(_FAMILIES)


class _Descriptions(Mapping):
    """family name -> description, read live from the registry."""

    def __getitem__(self, name: str) -> str:
        return _FAMILIES[name].description

    def __iter__(self) -> Iterator[str]:
        return iter(list(_FAMILIES))

    def __len__(self) -> int:
        return len(_FAMILIES)

    def __repr__(self) -> str:
        return repr(dict(self))


DESCRIPTIONS: Mapping[str, str] = _Descriptions()
