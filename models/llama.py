"""A Llama decoder (SmolLM2-135M architecture) in Flax linen, with a KV cache.

Built only from stock Flax layers, like the other reference models: every
projection is an ``nn.Dense`` with Flax's default parameter names and no
custom ``dot_general``, so MX is added from the outside by substitution
(``jaxmx.flax.quantize_model``) and this file stays format-agnostic.

Architecture (Touvron et al. 2023, arXiv:2302.13971; the SmolLM2 sizes are
those of its ``config.json``)::

    embed_tokens
    layers_i (i < depth):  x + self_attn(input_layernorm(x))        (RMSNorm, RoPE, GQA)
                           x + mlp(post_attention_layernorm(x))     (SwiGLU)
    norm -> embed_tokens.attend (tied output head)

Module names follow Hugging Face ``transformers``' ``LlamaForCausalLM`` so
that checkpoints map one to one. Attention's two matmuls (q.k and p.v) are
``jnp.einsum`` calls inside the plain function :func:`attention`, not a
Flax layer: module substitution leaves them (and the tied head, whose
``Embed.attend`` has no injection point) in high precision, while a
jaxpr-level transformation sees them like every other ``dot_general``.

Decoding: ``model.apply(params, tokens, cache=cache)`` appends ``tokens``
to a :class:`KVCache` of fixed capacity and returns ``(logits, cache)``;
:func:`generate` runs a jitted prefill plus a ``lax.scan`` of greedy steps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

__all__ = [
    "KVCache",
    "Llama",
    "LlamaConfig",
    "apply_rope",
    "attention",
    "generate",
    "init_cache",
    "rope_angles",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Hyper-parameters of the Llama decoder; the defaults are SmolLM2-135M's.

    >>> cfg = LlamaConfig()
    >>> cfg.head_dim, cfg.heads // cfg.kv_heads
    (64, 3)
    """

    vocab_size: int = 49152  # tokens in the vocabulary (and rows of the tied head)
    width: int = 576  # residual stream / embedding dimension
    depth: int = 30  # decoder layers
    heads: int = 9  # query heads
    kv_heads: int = 3  # key/value heads (grouped-query attention); divides heads
    mlp_width: int = 1536  # hidden size of the SwiGLU MLP
    rope_theta: float = 100000.0  # RoPE base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    max_len: int = 8192  # longest sequence (prompt plus generated tokens)
    tie_embeddings: bool = True  # output head reuses the token embedding

    def __post_init__(self):
        for name in ("vocab_size", "width", "depth", "heads", "kv_heads", "mlp_width", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(
                f"LlamaConfig.width ({self.width}) must be divisible by heads ({self.heads})"
            )
        if self.heads % self.kv_heads:
            raise ValueError(
                f"LlamaConfig.heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.width // self.heads


class KVCache(NamedTuple):
    """Keys and values of the tokens seen so far, in fixed-capacity buffers.

    A pytree, so it passes through ``jit`` and ``lax.scan``; the capacity
    (``keys[0].shape[1]``) is static, the fill level ``length`` is data.
    Slots at and beyond ``length`` hold zeros and are masked out.
    """

    # One (batch, capacity, kv_heads, head_dim) array per layer.
    keys: tuple[jax.Array, ...]
    # Same shapes as keys.
    values: tuple[jax.Array, ...]
    # int32 scalar: tokens written so far; the next token's position.
    length: jax.Array


def init_cache(config: LlamaConfig, batch: int, capacity: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty :class:`KVCache` for ``batch`` sequences of up to ``capacity`` tokens.

    >>> c = init_cache(LlamaConfig(depth=2), batch=1, capacity=16)
    >>> len(c.keys), c.keys[0].shape, int(c.length)
    (2, (1, 16, 3, 64), 0)
    """
    if not 1 <= capacity <= config.max_len:
        raise ValueError(f"capacity must be in [1, {config.max_len}], got {capacity}")
    shape = (batch, capacity, config.kv_heads, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.depth))
    return KVCache(keys=zeros, values=zeros, length=jnp.zeros((), jnp.int32))


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotary angles ``position * theta**(-2i/head_dim)``.

    Su et al. 2021 (arXiv:2104.09864), eq. 15, with the frequencies of
    Hugging Face's Llama (``inv_freq = 1 / theta**(arange(0, d, 2) / d)``).

    Args:
      positions: integer positions of any shape ``P``.
      head_dim: the (even) width rotated.
      theta: the base frequency.

    Returns:
      ``(cos, sin)``, float32 of shape ``P + (head_dim // 2,)``.
    """
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` by RoPE in the "rotate half" layout.

    The pairs rotated together are ``(x[i], x[i + d/2])`` (Hugging Face's
    ``rotate_half``), not adjacent elements (the paper's and llama.cpp's
    layout); the two agree once the q/k projection rows are permuted, which
    is what llama.cpp's converter does and the GGUF loader undoes.

    Args:
      x: ``(batch, length, heads, head_dim)``.
      cos, sin: ``(batch or 1, length, head_dim // 2)`` from :func:`rope_angles`.

    Returns:
      An array like ``x``.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query softmax attention, its two matmuls as ``jnp.einsum``.

    Query head ``h`` reads key/value head ``h // (heads // kv_heads)``
    (Ainslie et al. 2023, arXiv:2305.13245); the groups are an einsum axis,
    so keys and values are never repeated in memory.

    Args:
      q: ``(batch, length, heads, head_dim)``.
      k, v: ``(batch, keys, kv_heads, head_dim)``.
      mask: boolean, broadcastable to ``(batch, length, keys)``; True where
        query ``t`` may attend to key ``s``. Every query needs one True.

    Returns:
      ``(batch, length, heads, head_dim)``.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k) / math.sqrt(d)
    scores = jnp.where(mask[:, None, None], scores.astype(jnp.float32), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


class SelfAttention(nn.Module):
    """RoPE grouped-query self-attention with an optional KV cache."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_kv=None, start=None):
        cfg = self.config
        b, t, _ = x.shape
        dense = functools.partial(nn.Dense, use_bias=False)
        q = dense(cfg.heads * cfg.head_dim, name="q_proj")(x)
        k = dense(cfg.kv_heads * cfg.head_dim, name="k_proj")(x)
        v = dense(cfg.kv_heads * cfg.head_dim, name="v_proj")(x)
        q = apply_rope(q.reshape(b, t, cfg.heads, cfg.head_dim), cos, sin)
        k = apply_rope(k.reshape(b, t, cfg.kv_heads, cfg.head_dim), cos, sin)
        v = v.reshape(b, t, cfg.kv_heads, cfg.head_dim)
        if cache_kv is not None:
            # Write this step's keys and values at the fill level, then
            # attend over the whole (masked) buffer: one shape for every step.
            ck, cv = cache_kv
            index = (0, start, 0, 0)
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), index)
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), index)
            cache_kv = (k, v)
        out = attention(q, k, v, mask)
        out = dense(cfg.width, name="o_proj")(out.reshape(b, t, cfg.width))
        return out, cache_kv


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020, arXiv:2002.05202): down(silu(gate x) * up x)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        dense = functools.partial(nn.Dense, use_bias=False)
        gate = dense(self.config.mlp_width, name="gate_proj")(x)
        up = dense(self.config.mlp_width, name="up_proj")(x)
        return dense(self.config.width, name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_kv=None, start=None):
        cfg = self.config
        h = nn.RMSNorm(epsilon=cfg.norm_eps, name="input_layernorm")(x)
        h, cache_kv = SelfAttention(cfg, name="self_attn")(h, cos, sin, mask, cache_kv, start)
        x = x + h
        h = nn.RMSNorm(epsilon=cfg.norm_eps, name="post_attention_layernorm")(x)
        return x + MLP(cfg, name="mlp")(h), cache_kv


class Llama(nn.Module):
    """Llama causal decoder returning next-token logits.

    >>> import jax, jax.numpy as jnp
    >>> cfg = LlamaConfig(vocab_size=32, width=16, depth=2, heads=4, kv_heads=2,
    ...                   mlp_width=24, max_len=16)
    >>> model = Llama(cfg)
    >>> tokens = jnp.arange(6, dtype=jnp.int32)[None]
    >>> params = model.init(jax.random.key(0), tokens)
    >>> full = model.apply(params, tokens)
    >>> full.shape
    (1, 6, 32)
    >>> logits, cache = model.apply(params, tokens[:, :4], cache=init_cache(cfg, 1, 8))
    >>> step, cache = model.apply(params, tokens[:, 4:], cache=cache)
    >>> bool(jnp.allclose(step, full[:, 4:], atol=1e-5)), int(cache.length)
    (True, 6)
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, cache: KVCache | None = None):
        """Computes logits, optionally appending to a KV cache.

        Args:
          tokens: int array ``(batch, length)``. Without a cache they sit at
            positions ``0 .. length - 1``; with one, right after the tokens
            already cached.
          cache: a :class:`KVCache` (from :func:`init_cache`) or None.

        Returns:
          Without a cache: float32 logits ``(batch, length, vocab_size)``,
          position ``t`` depending only on ``tokens[:, :t + 1]``. With a
          cache: ``(logits, cache)``, the cache holding ``length`` more
          tokens. Writing past the capacity is not checked under ``jit``
          (``dynamic_update_slice`` clamps); :func:`generate` sizes it.
        """
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, length), got shape {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must be an integer array, got dtype {tokens.dtype}")
        t = tokens.shape[1]
        if cache is None:
            start = jnp.zeros((), jnp.int32)
            keys = t
        else:
            start = cache.length
            keys = cache.keys[0].shape[1]
            if t > keys:
                raise ValueError(f"{t} tokens do not fit a KV cache of capacity {keys}")
        positions = start + jnp.arange(t, dtype=jnp.int32)
        # Query at position p sees keys at positions <= p; with a cache the
        # key slot index is the position, and unwritten slots lie beyond p.
        mask = (jnp.arange(keys, dtype=jnp.int32)[None, :] <= positions[:, None])[None]
        cos, sin = rope_angles(positions[None], cfg.head_dim, cfg.rope_theta)

        embed = nn.Embed(cfg.vocab_size, cfg.width, name="embed_tokens")
        x = embed(tokens)
        new_keys, new_values = [], []
        for i in range(cfg.depth):
            cache_kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, cache_kv = DecoderLayer(cfg, name=f"layers_{i}")(x, cos, sin, mask, cache_kv, start)
            if cache is not None:
                new_keys.append(cache_kv[0])
                new_values.append(cache_kv[1])
        x = nn.RMSNorm(epsilon=cfg.norm_eps, name="norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, name="lm_head")(x)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        return logits, KVCache(tuple(new_keys), tuple(new_values), start + t)


ApplyFn = Callable[..., Any]


@functools.partial(jax.jit, static_argnames=("apply_fn", "config", "max_new_tokens"))
def generate(
    apply_fn: ApplyFn,
    params: Any,
    prompt: jax.Array,
    *,
    config: LlamaConfig,
    max_new_tokens: int,
) -> jax.Array:
    """Greedy decoding: one prefill of the prompt, then one token per step.

    Args:
      apply_fn: ``model.apply`` of a :class:`Llama` (or of an MX-substituted
        one); must be hashable (bound methods of linen modules are).
      params: its variables, ``{"params": ...}``.
      prompt: int32 ``(batch, length)``.
      config: the model's config (sizes the cache).
      max_new_tokens: tokens to generate; the cache holds
        ``length + max_new_tokens``.

    Returns:
      int32 ``(batch, max_new_tokens)``: the argmax continuation (it runs
      past an end-of-sequence token; cut it off outside).
    """
    batch, length = prompt.shape
    cache = init_cache(config, batch, length + max_new_tokens)
    logits, cache = apply_fn(params, prompt, cache=cache)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def step(carry, _):
        token, cache = carry
        logits, cache = apply_fn(params, token[:, None], cache=cache)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return (nxt, cache), token

    (_, _), tokens = jax.lax.scan(step, (first, cache), None, length=max_new_tokens)
    return tokens.T
