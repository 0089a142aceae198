"""LeNet-300-100: the fully connected MNIST network of LeCun et al. (1998).

Architecture (the network DropBack and most pruning papers use)::

    flatten 28x28x1 -> dense_1: Dense(300) -> ReLU -> dense_2: Dense(100) -> ReLU
                    -> dense_3: Dense(num_classes)

266,610 parameters for 10 classes, all in three kernels and three biases.
"""

from __future__ import annotations

import jax
from flax import linen as nn

from models.cnn import check_images


class LeNet300100(nn.Module):
    """LeNet-300-100 (linen), with Flax's default initializers.

    >>> import jax, jax.numpy as jnp
    >>> model = LeNet300100()
    >>> images = jnp.zeros((2, 28, 28, 1))
    >>> params = model.init(jax.random.key(0), images)["params"]
    >>> sum(p.size for p in jax.tree.leaves(params)), model.apply({"params": params}, images).shape
    (266610, (2, 10))
    """

    num_classes: int = 10  # size of the output logits

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """Computes class logits.

        Args:
          images: float array of shape ``(batch, 28, 28, 1)``.
          train: accepted for interface parity with the other models; no effect.

        Returns:
          Logits of shape ``(batch, num_classes)``.
        """
        del train
        check_images(images)
        x = images.reshape(images.shape[0], -1)
        x = nn.relu(nn.Dense(300, name="dense_1")(x))
        x = nn.relu(nn.Dense(100, name="dense_2")(x))
        return nn.Dense(self.num_classes, name="dense_3")(x)
