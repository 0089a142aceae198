"""A small convolutional classifier for 28x28x1 images, in linen and in nnx.

Architecture (both variants, same module names and parameter shapes)::

    conv_1: Conv(32, 3x3) -> ReLU -> 2x2 average pool   (28 -> 14)
    conv_2: Conv(64, 3x3) -> ReLU -> 2x2 average pool   (14 -> 7)
    flatten -> dense_1: Dense(128) -> ReLU -> dense_2: Dense(num_classes)

Average pooling (rather than max) keeps the forward pass linear between the
non-linearities, which makes quantization error easier to attribute to the
matmul/conv layers. Only stock layers with default parameter names are used,
so MX execution can be substituted from outside.
"""

from __future__ import annotations

import jax
from flax import linen as nn
from flax import nnx

IMAGE_SHAPE = (28, 28, 1)  # height, width, channels expected by both models
_FLAT_FEATURES = 7 * 7 * 64  # spatial size after two 2x2 pools, times conv_2 channels


def check_images(images: jax.Array) -> None:
    """Validates an image batch (shapes are static under jit).

    Args:
      images: array of shape ``(batch, 28, 28, 1)``.

    Raises:
      ValueError: if the shape is not ``(batch, 28, 28, 1)``.
    """
    if images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(
            f"images must have shape (batch, 28, 28, 1), got shape {tuple(images.shape)}"
        )


def _pool(x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))


class CNN(nn.Module):
    """Two conv layers and two dense layers (linen).

    >>> import jax, jax.numpy as jnp
    >>> model = CNN()
    >>> images = jnp.zeros((3, 28, 28, 1))
    >>> params = model.init(jax.random.key(0), images)["params"]
    >>> model.apply({"params": params}, images).shape
    (3, 10)
    """

    num_classes: int = 10  # size of the output logits

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """Computes class logits.

        Args:
          images: float array of shape ``(batch, 28, 28, 1)``.
          train: accepted for interface parity with the GPT models; the CNN has
            no dropout, so it has no effect.

        Returns:
          Logits of shape ``(batch, num_classes)``.
        """
        del train
        check_images(images)
        x = _pool(nn.relu(nn.Conv(32, (3, 3), name="conv_1")(images)))
        x = _pool(nn.relu(nn.Conv(64, (3, 3), name="conv_2")(x)))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128, name="dense_1")(x))
        return nn.Dense(self.num_classes, name="dense_2")(x)


class CNNnnx(nnx.Module):
    """The :class:`CNN` architecture written with Flax nnx.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> CNNnnx(rngs=nnx.Rngs(0))(jnp.zeros((3, 28, 28, 1))).shape
    (3, 10)
    """

    def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs):
        """Creates the layers.

        Args:
          num_classes: size of the output logits.
          rngs: parameter initialisation rngs.
        """
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.conv_1 = nnx.Conv(IMAGE_SHAPE[-1], 32, (3, 3), rngs=rngs)
        self.conv_2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
        self.dense_1 = nnx.Linear(_FLAT_FEATURES, 128, rngs=rngs)
        self.dense_2 = nnx.Linear(128, num_classes, rngs=rngs)

    def __call__(
        self, images: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """Computes class logits.

        Args:
          images: float array of shape ``(batch, 28, 28, 1)``.
          train: accepted for interface parity; no effect (no dropout).
          rngs: accepted for interface parity; unused.

        Returns:
          Logits of shape ``(batch, num_classes)``.
        """
        del train, rngs
        check_images(images)
        x = _pool(nnx.relu(self.conv_1(images)))
        x = _pool(nnx.relu(self.conv_2(x)))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.dense_1(x))
        return self.dense_2(x)
