"""MX counterparts of Flax linen's matmul layers.

Each class is the linen layer with one more field, ``mx``: a
:class:`~jaxmx.DotConfig` (or preset name) for its matmuls, or ``None`` for
high precision. Parameters keep the names, shapes and dtypes of the linen
originals, so checkpoints load both ways.

>>> import jax, jax.numpy as jnp
>>> from jaxmx.flax import linen as mxnn
>>> layer = mxnn.Dense(8, mx="mxfp8")
>>> params = layer.init(jax.random.key(0), jnp.ones((2, 32)))
>>> jax.tree.map(jnp.shape, params)
{'params': {'bias': (8,), 'kernel': (32, 8)}}
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
from flax import linen as nn
from flax.linen import module as linen_module

from jaxmx.config import DotConfig
from jaxmx.einsum import einsum as mx_einsum
from jaxmx.flax._ops import MXAttention, MXConv, MXDotGeneral, as_config

__all__ = ["Dense", "DenseGeneral", "Einsum", "Conv", "MultiHeadDotProductAttention"]


def _inject(module, field: str, value, default=None) -> None:
    current = getattr(module, field)
    if current is not default and current != value:
        raise ValueError(
            f"{type(module).__name__} has a custom {field}={current!r}; it cannot also take mx="
        )
    object.__setattr__(module, field, value)  # linen modules are frozen dataclasses


class _MXFields:
    """Mixin: points the layer's matmul fields at jaxmx when ``mx`` is set.

    ``_mx_fields`` lists ``(field, make(config), Flax's default)``.
    """

    _mx_fields: ClassVar[tuple] = ()

    def __post_init__(self):
        cfg = as_config(self.mx)
        if cfg is not None:
            for field, make, default in self._mx_fields:
                _inject(self, field, make(cfg), default)
        super().__post_init__()


class Dense(_MXFields, nn.Dense):
    """``nn.Dense`` whose matmul is a :func:`jaxmx.dot_general` with config ``mx``."""

    mx: DotConfig | str | None = None
    _mx_fields: ClassVar[tuple] = (("dot_general", MXDotGeneral, None),)


class DenseGeneral(_MXFields, nn.DenseGeneral):
    """``nn.DenseGeneral`` whose matmul is a :func:`jaxmx.dot_general` with config ``mx``."""

    mx: DotConfig | str | None = None
    _mx_fields: ClassVar[tuple] = (("dot_general", MXDotGeneral, None),)


class Conv(_MXFields, nn.Conv):
    """``nn.Conv`` whose convolution is a :func:`jaxmx.conv_general_dilated`."""

    mx: DotConfig | str | None = None
    _mx_fields: ClassVar[tuple] = (("conv_general_dilated", MXConv, None),)


class MultiHeadDotProductAttention(_MXFields, nn.MultiHeadDotProductAttention):
    """``nn.MultiHeadDotProductAttention`` with MX projections and attention matmuls.

    The q/k/v/out projections use ``mx``; the two attention matmuls (q.k and
    p.v) use ``mx.for_activations()``, since both of their operands are
    activations.
    """

    mx: DotConfig | str | None = None
    _mx_fields: ClassVar[tuple] = (
        ("qkv_dot_general", MXDotGeneral, None),
        ("out_dot_general", MXDotGeneral, None),
        ("attention_fn", lambda cfg: MXAttention(cfg.for_activations()), nn.dot_product_attention),
    )


class Einsum(nn.Einsum):
    """``nn.Einsum`` whose contraction is a :func:`jaxmx.einsum` with config ``mx``."""

    mx: DotConfig | str | None = None

    def __post_init__(self):
        as_config(self.mx)  # a wrong mx fails where the layer is written
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs, einsum_str: str | None = None):
        return einsum_forward(self, inputs, einsum_str, config=as_config(self.mx))


def einsum_forward(
    module: nn.Einsum, inputs, einsum_str: str | None = None, *, config: DotConfig | None
):
    """The computation of ``nn.Einsum`` with an MX contraction.

    linen's ``Einsum`` has no injection point for its contraction, so jaxmx
    restates its ``__call__`` here: same arguments (``einsum_str`` from the
    call or, when None, from the module), same ``kernel`` and ``bias``
    parameters, created in the module's compact context (its own
    ``__call__``, or a method interceptor); only the contraction differs.

    Args:
      module: the ``nn.Einsum`` (or subclass) whose call this is.
      inputs: the left operand.
      einsum_str: the equation, if given at the call.
      config: the contraction's DotConfig; None runs ``jnp.einsum``.
    """
    einsum_str = linen_module.merge_param("einsum_str", module.einsum_str, einsum_str)
    einsum_str = einsum_str.replace(" ", "")
    if "->" not in einsum_str or einsum_str.count(",") != 1:
        raise ValueError(
            f"Einsum needs an explicit two-operand equation with '->', got {einsum_str!r}"
        )
    kernel = module.param("kernel", module.kernel_init, module.shape, module.param_dtype)
    bias = None
    if module.use_bias:
        # The parent class's helper, so the bias shape is exactly linen's.
        bias_shape, broadcast_shape = module._get_bias_shape(einsum_str, inputs, kernel)
        bias = module.param("bias", module.bias_init, bias_shape, module.param_dtype)
    inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
    if config is None:
        y = jnp.einsum(
            einsum_str,
            inputs,
            kernel,
            precision=module.precision,
            preferred_element_type=module.preferred_element_type,
        )
    else:
        y = mx_einsum(
            einsum_str,
            inputs,
            kernel,
            config=config,
            precision=module.precision,
            preferred_element_type=module.preferred_element_type,
        )
    if bias is not None:
        y = y + bias.reshape(broadcast_shape)
    return y
