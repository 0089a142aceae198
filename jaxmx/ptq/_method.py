"""The protocol a post-training method implements for :func:`jaxmx.quantize_params`."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax

from jaxmx.formats import MXFormat
from jaxmx.tensor import MXTensor


@runtime_checkable
class PTQMethod(Protocol):
    """What ``method=`` of :func:`jaxmx.quantize_params` takes: one weight in, one MXTensor out.

    :class:`ScaleSearch` and :class:`GPTQ` implement it; a new post-training
    method is a (frozen, hashable) object with this one method, and
    :func:`jaxmx.quantize_params` calls it for every weight a rule matched.

    >>> import jaxmx
    >>> isinstance(jaxmx.ptq.ScaleSearch(), jaxmx.ptq.PTQMethod)
    True
    """

    def quantize_weight(
        self,
        path: str,
        x: jax.Array,
        fmt: MXFormat,
        *,
        axis: int,
        block_size: int | None,
        packed: bool,
    ) -> MXTensor:
        """Quantizes the weight ``x`` found at ``path``.

        Args:
          path: the weight's ``/``-joined tree path (``params/Dense_0/kernel``):
            the key into per-weight data such as Hessians.
          x: the float weight.
          fmt: the format the matched rule gives the weight.
          axis: its contraction axis (negative or non-negative), along
            which blocks run.
          block_size: the rule's block size (None: the format's own).
          packed: whether sub-byte codes are to be packed.

        Returns:
          An :class:`~jaxmx.MXTensor` of ``x`` in ``fmt`` along ``axis``.
        """
        ...
