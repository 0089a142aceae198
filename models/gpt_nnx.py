"""The GPT decoder of :mod:`models.gpt`, written with Flax nnx.

Same architecture, same module names and therefore the same parameter tree
(paths and shapes) as the linen :class:`models.gpt.GPT`; only the random
initial values differ, because linen and nnx split rngs differently.
:func:`linen_to_nnx_params` copies trained or initial linen parameters into an
nnx model, which is how the two variants can be compared exactly.

As in the linen file, only stock layers (``nnx.Linear``, ``nnx.Embed``,
``nnx.LayerNorm``, ``nnx.MultiHeadAttention``) with default parameter names are
used and no custom ``dot_general`` is passed: MX execution is injected later
by substituting these layers from outside.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from models.gpt import EMBED_INIT, GPTConfig, check_tokens


def _dropout_kwargs(train: bool, rngs: nnx.Rngs | None) -> dict[str, Any]:
    return {"deterministic": not train, "rngs": rngs}


class BlockNNX(nnx.Module):
    """One pre-norm transformer block: causal self-attention, then an MLP."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        """Creates the block's layers.

        Args:
          config: the model configuration.
          rngs: parameter initialisation rngs.
        """
        width = config.width
        self.ln_1 = nnx.LayerNorm(width, rngs=rngs)
        # keep_rngs=False: dropout keys are passed per call, so the module holds
        # only Params and a functional apply needs no mutable rng state.
        self.attn = nnx.MultiHeadAttention(
            num_heads=config.heads,
            in_features=width,
            dropout_rate=config.dropout,
            decode=False,
            keep_rngs=False,
            rngs=rngs,
        )
        self.ln_2 = nnx.LayerNorm(width, rngs=rngs)
        self.mlp_fc = nnx.Linear(width, config.mlp_ratio * width, rngs=rngs)
        self.mlp_proj = nnx.Linear(config.mlp_ratio * width, width, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout)

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        *,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Applies the block.

        Args:
          x: activations of shape ``(batch, length, width)``.
          mask: boolean attention mask broadcastable to
            ``(batch, heads, length, length)``; True where attention is allowed.
          train: enables dropout.
          rngs: rngs with a ``dropout`` stream; required when ``train`` is True
            and the dropout rate is positive.

        Returns:
          Activations with the same shape as ``x``.
        """
        drop = _dropout_kwargs(train, rngs)
        h = self.attn(self.ln_1(x), mask=mask, **drop)
        x = x + self.dropout(h, **drop)
        h = self.mlp_proj(nnx.gelu(self.mlp_fc(self.ln_2(x))))
        return x + self.dropout(h, **drop)


class GPTnnx(nnx.Module):
    """GPT-style causal decoder returning next-token logits (nnx variant).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> cfg = GPTConfig(vocab_size=11, context=8, depth=1, width=16, heads=2)
    >>> model = GPTnnx(cfg, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 8), jnp.int32)).shape
    (2, 8, 11)
    """

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        """Creates the model.

        Args:
          config: the model configuration.
          rngs: parameter initialisation rngs.
        """
        self.config = config
        self.tok_embed = nnx.Embed(
            config.vocab_size, config.width, embedding_init=EMBED_INIT, rngs=rngs
        )
        self.pos_embed = nnx.Embed(
            config.context, config.width, embedding_init=EMBED_INIT, rngs=rngs
        )
        self.embed_dropout = nnx.Dropout(config.dropout)
        # Blocks are attributes block_0..block_{depth-1} rather than an
        # nnx.List so that parameter paths (e.g. "block_0/attn/query") are
        # identical to the linen model's; path-based substitution rules and
        # linen_to_nnx_params then work unchanged across both variants.
        for i in range(config.depth):
            setattr(self, f"block_{i}", BlockNNX(config, rngs=rngs))
        self.ln_f = nnx.LayerNorm(config.width, rngs=rngs)
        self.head = nnx.Linear(config.width, config.vocab_size, rngs=rngs)

    def __call__(
        self, tokens: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """Computes logits for every position.

        Args:
          tokens: int array of shape ``(batch, length)`` with
            ``length <= config.context``.
          train: enables dropout.
          rngs: rngs with a ``dropout`` stream; required when ``train`` is True
            and ``config.dropout > 0``.

        Returns:
          float32 logits of shape ``(batch, length, vocab_size)``; position
          ``t`` depends only on ``tokens[:, :t + 1]``.
        """
        cfg = self.config
        check_tokens(tokens, cfg)
        length = tokens.shape[1]
        drop = _dropout_kwargs(train, rngs)
        x = self.tok_embed(tokens) + self.pos_embed(jnp.arange(length))
        x = self.embed_dropout(x, **drop)
        mask = nnx.make_causal_mask(jnp.ones((1, length), jnp.int32), dtype=jnp.bool_)
        for i in range(cfg.depth):
            x = getattr(self, f"block_{i}")(x, mask, train=train, rngs=rngs)
        return self.head(self.ln_f(x))


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    return {
        jax.tree_util.keystr(path): jnp.shape(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def linen_to_nnx_params(model: nnx.Module, linen_params: Mapping[str, Any]) -> None:
    """Copies a linen parameter tree into an nnx model in place.

    Works for any nnx model whose module names mirror the linen model's (as
    :class:`GPTnnx` mirrors :class:`models.gpt.GPT`, and ``CNNnnx`` mirrors
    ``CNN``); the two trees must have the same paths and shapes.

    Args:
      model: the nnx model to overwrite.
      linen_params: the ``"params"`` collection of the linen model.

    Raises:
      ValueError: if the paths or any shape differ; the message lists them.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from models.gpt import GPT
    >>> cfg = GPTConfig(vocab_size=11, context=8, depth=1, width=16, heads=2)
    >>> tokens = jnp.arange(16).reshape(2, 8) % 11
    >>> params = GPT(cfg).init(jax.random.key(0), tokens)["params"]
    >>> model = GPTnnx(cfg, rngs=nnx.Rngs(1))
    >>> linen_to_nnx_params(model, params)
    >>> bool(jnp.allclose(model(tokens), GPT(cfg).apply({"params": params}, tokens), atol=1e-5))
    True
    """
    state = nnx.state(model, nnx.Param)
    linen_params = flax.core.unfreeze(linen_params)
    want = _shapes_by_path(nnx.to_pure_dict(state))
    got = _shapes_by_path(linen_params)
    if want != got:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        raise ValueError(
            "linen parameters do not match the nnx model: "
            f"missing {missing}, unexpected {extra}, shape mismatch at {shapes}"
        )
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, linen_params))
    nnx.update(model, state)
