"""The all-MiniLM-L6-v2 sentence encoder (a 6-layer BERT) in Flax linen.

Built only from stock Flax layers (``nn.Embed``, ``nn.Dense``,
``nn.LayerNorm``) with default parameter names, so MX is added from the
outside by substitution and this file stays format-agnostic. Attention's two
matmuls are ``jnp.einsum`` calls in the plain function :func:`attention`:
module substitution leaves them in high precision, a jaxpr-level
transformation sees them.

Architecture (Devlin et al. 2019, arXiv:1810.04805, post-norm; the sentence
embedding of Reimers & Gurevych 2019, arXiv:1908.10084)::

    embeddings: word + position + token_type -> LayerNorm
    layer_i (i < depth):  x = LayerNorm(x + attention(x))
                          x = LayerNorm(x + output(gelu(intermediate(x))))
    mean over the unmasked tokens -> L2 normalisation

The sizes default to all-MiniLM-L6-v2's ``config.json`` (Wang et al. 2020,
arXiv:2002.10957, fine-tuned by sentence-transformers).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

__all__ = ["MiniLM", "MiniLMConfig", "attention", "mean_pool"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MiniLMConfig:
    """Hyper-parameters of the BERT encoder; the defaults are all-MiniLM-L6-v2's.

    >>> MiniLMConfig().head_dim
    32
    """

    vocab_size: int = 30522  # WordPiece vocabulary (uncased)
    width: int = 384  # hidden size
    depth: int = 6  # encoder layers
    heads: int = 12  # attention heads; divides width
    mlp_width: int = 1536  # intermediate size of the feed-forward block
    max_len: int = 512  # rows of the position embedding
    type_vocab_size: int = 2  # segment (token type) embeddings
    norm_eps: float = 1e-12  # LayerNorm epsilon

    def __post_init__(self):
        for name in ("vocab_size", "width", "depth", "heads", "mlp_width", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MiniLMConfig.{name} must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(
                f"MiniLMConfig.width ({self.width}) must be divisible by heads ({self.heads})"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.width // self.heads


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention over unpadded keys, its two matmuls as ``jnp.einsum``.

    Args:
      q, k, v: ``(batch, length, heads, head_dim)``.
      mask: boolean ``(batch, length)``, True for real tokens (keys that may
        be attended to). Every sequence needs one True.

    Returns:
      ``(batch, length, heads, head_dim)``.
    """
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``hidden`` (batch, length, width) over the tokens where ``mask`` is True."""
    weights = mask.astype(hidden.dtype)[..., None]
    total = jnp.sum(hidden * weights, axis=1)
    # sentence-transformers clamps the count at 1e-9 to survive empty rows.
    return total / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)


class Embeddings(nn.Module):
    config: MiniLMConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids):
        cfg = self.config
        positions = jnp.arange(input_ids.shape[1])[None]
        x = nn.Embed(cfg.vocab_size, cfg.width, name="word_embeddings")(input_ids)
        x = x + nn.Embed(cfg.max_len, cfg.width, name="position_embeddings")(positions)
        x = x + nn.Embed(cfg.type_vocab_size, cfg.width, name="token_type_embeddings")(
            token_type_ids
        )
        return nn.LayerNorm(epsilon=cfg.norm_eps, name="LayerNorm")(x)


class SelfAttention(nn.Module):
    config: MiniLMConfig

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, cfg.heads, cfg.head_dim)  # noqa: E731
        q = split(nn.Dense(cfg.width, name="query")(x))
        k = split(nn.Dense(cfg.width, name="key")(x))
        v = split(nn.Dense(cfg.width, name="value")(x))
        out = attention(q, k, v, mask).reshape(b, t, cfg.width)
        return nn.Dense(cfg.width, name="output")(out)


class EncoderLayer(nn.Module):
    """Post-norm BERT layer."""

    config: MiniLMConfig

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        x = nn.LayerNorm(epsilon=cfg.norm_eps, name="attention_norm")(
            x + SelfAttention(cfg, name="attention")(x, mask)
        )
        h = nn.gelu(nn.Dense(cfg.mlp_width, name="intermediate")(x), approximate=False)
        return nn.LayerNorm(epsilon=cfg.norm_eps, name="output_norm")(
            x + nn.Dense(cfg.width, name="output")(h)
        )


class MiniLM(nn.Module):
    """BERT encoder returning L2-normalised mean-pooled sentence embeddings.

    >>> import jax, jax.numpy as jnp
    >>> cfg = MiniLMConfig(vocab_size=50, width=16, depth=2, heads=4, mlp_width=32, max_len=8)
    >>> ids = jnp.array([[1, 5, 7, 2, 0, 0], [1, 9, 2, 0, 0, 0]])
    >>> model = MiniLM(cfg)
    >>> params = model.init(jax.random.key(0), ids, ids > 0)
    >>> emb = model.apply(params, ids, ids > 0)
    >>> emb.shape, bool(jnp.allclose(jnp.linalg.norm(emb, axis=-1), 1.0, atol=1e-6))
    ((2, 16), True)
    """

    config: MiniLMConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        *,
        pool: bool = True,
    ) -> jax.Array:
        """Encodes a batch of token sequences.

        Args:
          input_ids: int ``(batch, length)``, ``length <= config.max_len``.
          attention_mask: ``(batch, length)``, nonzero for real tokens, zero
            for padding (which is neither attended to nor pooled).
          token_type_ids: int ``(batch, length)``; zeros if None.
          pool: return sentence embeddings (True) or the last hidden states.

        Returns:
          float32 ``(batch, width)`` unit vectors, or ``(batch, length, width)``
          hidden states when ``pool=False``.
        """
        cfg = self.config
        if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_len:
            raise ValueError(
                f"input_ids must be (batch, length <= {cfg.max_len}), got shape {input_ids.shape}"
            )
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {attention_mask.shape} differs from input_ids "
                f"{input_ids.shape}"
            )
        mask = attention_mask.astype(bool)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = Embeddings(cfg, name="embeddings")(input_ids, token_type_ids)
        for i in range(cfg.depth):
            x = EncoderLayer(cfg, name=f"layer_{i}")(x, mask)
        if not pool:
            return x
        pooled = mean_pool(x, mask)
        # torch.nn.functional.normalize: x / max(||x||, 1e-12).
        return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
