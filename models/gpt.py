"""A GPT-style decoder in Flax linen, built only from stock Flax layers.

The model is deliberately plain: every matmul lives in a standard
``nn.Dense`` / ``nn.DenseGeneral`` (inside ``nn.MultiHeadDotProductAttention``)
or ``nn.Embed`` with its default parameter names and no custom
``dot_general``. Low-precision (MX) execution is added from the outside by
substituting those layers, so this file must stay format-agnostic.

Architecture (GPT-2 style, pre-norm, untied output head)::

    tok_embed + pos_embed -> dropout
    block_i (i < depth):  x + attn(ln_1(x)),  x + mlp(ln_2(x))
    ln_f -> head (Dense to vocab_size)

The nnx twin in :mod:`models.gpt_nnx` uses the same module names, so both
variants have identical parameter trees (paths and shapes).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

# GPT-2 initialises token and position embeddings with N(0, 0.02); the Flax
# default (unit variance) would make the embeddings dominate the residual
# stream at initialisation.
EMBED_INIT = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Hyper-parameters of the GPT decoder (shared by linen and nnx variants).

    >>> GPTConfig(vocab_size=65, context=64, depth=2, width=64, heads=4).head_dim
    16
    """

    vocab_size: int  # number of distinct tokens (characters for char-level LM)
    context: int  # maximum sequence length; size of the position embedding
    depth: int  # number of transformer blocks
    width: int  # residual stream / embedding dimension
    heads: int  # attention heads; must divide width
    mlp_ratio: int = 4  # MLP hidden size is mlp_ratio * width
    dropout: float = 0.0  # dropout rate on embeddings, attention and residuals

    def __post_init__(self):
        for name in ("vocab_size", "context", "depth", "width", "heads", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(
                f"GPTConfig.width ({self.width}) must be divisible by heads ({self.heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.width // self.heads


def check_tokens(tokens: jax.Array, config: GPTConfig) -> None:
    """Validates a token batch against ``config`` (shapes are static under jit).

    Args:
      tokens: integer array of shape ``(batch, length)``.
      config: the model configuration.

    Raises:
      ValueError: if the rank is not 2 or ``length`` exceeds ``config.context``.
      TypeError: if ``tokens`` is not an integer array.
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (batch, length), got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be an integer array, got dtype {tokens.dtype}")
    if tokens.shape[1] > config.context:
        raise ValueError(
            f"sequence length {tokens.shape[1]} exceeds the model context {config.context}"
        )


class Block(nn.Module):
    """One pre-norm transformer block: causal self-attention, then an MLP."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool = False) -> jax.Array:
        """Applies the block.

        Args:
          x: activations of shape ``(batch, length, width)``.
          mask: boolean attention mask broadcastable to
            ``(batch, heads, length, length)``; True where attention is allowed.
          train: enables dropout (needs a ``'dropout'`` rng in ``apply``).

        Returns:
          Activations with the same shape as ``x``.
        """
        cfg = self.config
        h = nn.LayerNorm(name="ln_1")(x)
        h = nn.MultiHeadDotProductAttention(
            num_heads=cfg.heads, dropout_rate=cfg.dropout, name="attn"
        )(h, mask=mask, deterministic=not train)
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=not train)
        h = nn.LayerNorm(name="ln_2")(x)
        h = nn.Dense(cfg.mlp_ratio * cfg.width, name="mlp_fc")(h)
        h = nn.gelu(h)
        h = nn.Dense(cfg.width, name="mlp_proj")(h)
        return x + nn.Dropout(cfg.dropout)(h, deterministic=not train)


class GPT(nn.Module):
    """GPT-style causal decoder returning next-token logits.

    >>> import jax, jax.numpy as jnp
    >>> cfg = GPTConfig(vocab_size=11, context=8, depth=1, width=16, heads=2)
    >>> model = GPT(cfg)
    >>> tokens = jnp.zeros((2, 8), jnp.int32)
    >>> params = model.init(jax.random.key(0), tokens)["params"]
    >>> model.apply({"params": params}, tokens).shape
    (2, 8, 11)
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        """Computes logits for every position.

        Args:
          tokens: int array of shape ``(batch, length)`` with
            ``length <= config.context``.
          train: enables dropout (needs a ``'dropout'`` rng in ``apply``).

        Returns:
          float32 logits of shape ``(batch, length, vocab_size)``; position
          ``t`` depends only on ``tokens[:, :t + 1]``.
        """
        cfg = self.config
        check_tokens(tokens, cfg)
        length = tokens.shape[1]
        x = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=EMBED_INIT, name="tok_embed")(tokens)
        x = x + nn.Embed(cfg.context, cfg.width, embedding_init=EMBED_INIT, name="pos_embed")(
            jnp.arange(length)
        )
        x = nn.Dropout(cfg.dropout)(x, deterministic=not train)
        # One (1, 1, L, L) mask broadcast over batch and heads, instead of a
        # per-example mask, because every sequence in the batch is full length.
        mask = nn.make_causal_mask(jnp.ones((1, length), jnp.int32), dtype=jnp.bool_)
        for i in range(cfg.depth):
            x = Block(cfg, name=f"block_{i}")(x, mask, train=train)
        x = nn.LayerNorm(name="ln_f")(x)
        return nn.Dense(cfg.vocab_size, name="head")(x)
