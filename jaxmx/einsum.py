"""Two-operand einsum on top of the quantized dot_general.

The subscripts are translated into ``dot_general`` dimension numbers, so the
operands are quantized along the labels the einsum contracts (blocks along
the last contracted label, in the order they appear in the first operand),
forward and backward, exactly as :func:`jaxmx.dot_general` does.
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp

from jaxmx.config import DotConfig
from jaxmx.dot import dot_general
from jaxmx.tensor import MXTensor

__all__ = ["einsum"]


def _split(subscripts: str, a_ndim: int, b_ndim: int) -> tuple[str, str, str]:
    """Parses ``"ab,bc->ac"``; expands ``...``; infers an implicit output."""
    if not isinstance(subscripts, str):
        raise TypeError(f"einsum subscripts must be a string, got {subscripts!r}")
    s = subscripts.replace(" ", "")
    if s.count("->") > 1:
        raise ValueError(f"einsum subscripts {subscripts!r} have more than one '->'")
    if set(s) - set(string.ascii_letters + ".,->"):
        raise ValueError(
            f"einsum subscripts {subscripts!r}: labels must be letters (plus ',', '->', '...')"
        )
    if "->" in s:
        ins, out = s.split("->")
        if "," in out:
            raise ValueError(
                f"einsum subscripts {subscripts!r}: the output term {out!r} must be one term "
                "(jaxmx.einsum returns one array), without ','"
            )
    else:
        ins, out = s, None
    parts = ins.split(",")
    if len(parts) != 2:
        raise ValueError(f"jaxmx.einsum takes exactly two operands, got subscripts {subscripts!r}")
    used = set(s) - set(".,->")
    free_letters = [c for c in string.ascii_letters if c not in used]
    ell_a = a_ndim - len(parts[0].replace("...", ""))
    ell_b = b_ndim - len(parts[1].replace("...", ""))
    n_ell = max(ell_a, ell_b, 0)
    ell = "".join(free_letters[:n_ell])

    def expand(p: str, n: int, ndim: int) -> str:
        if "..." in p:
            p = p.replace("...", ell[n_ell - n :] if n else "")
        if len(p) != ndim:
            raise ValueError(
                f"einsum subscripts {subscripts!r}: operand term {p!r} does not match rank {ndim}"
            )
        return p

    a = expand(parts[0], max(ell_a, 0), a_ndim)
    b = expand(parts[1], max(ell_b, 0), b_ndim)
    if out is None:
        counts = {c: (a + b).count(c) for c in set(a + b)}
        out = ell + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ell))
    else:
        out = out.replace("...", ell)
    for term in (a, b, out):
        if len(set(term)) != len(term):
            raise ValueError(
                f"einsum subscripts {subscripts!r}: a label repeated within one term "
                "(a trace or diagonal) is not supported by jaxmx.einsum"
            )
    if missing := "".join(sorted(set(out) - set(a + b))):
        raise ValueError(
            f"einsum subscripts {subscripts!r}: output labels {missing!r} are not in any "
            "operand; every output label must appear in an input term"
        )
    return a, b, out


def einsum(
    subscripts: str,
    a: jax.typing.ArrayLike | MXTensor,
    b: jax.typing.ArrayLike | MXTensor,
    *,
    config: DotConfig,
    precision: jax.lax.PrecisionLike = None,
    preferred_element_type: jax.typing.DTypeLike | None = None,
    out_sharding: jax.sharding.NamedSharding | jax.sharding.PartitionSpec | None = None,
    key: jax.Array | None = None,
) -> jax.Array:
    """``jnp.einsum`` of two operands with MX-quantized matmuls.

    Labels shared by both operands and the output are batch axes, labels
    shared by the operands only are contracted (blocks run along the last of
    them, as ordered in ``a``), labels of one operand only are free, or summed
    out in high precision first if they are not in the output. The keyword
    arguments match what ``flax.nnx.Einsum`` passes to its ``einsum_op``.

    Args:
      subscripts: e.g. ``"bsk,nk->bsn"``; ``...`` and implicit outputs work.
      a, b: the operands: float arrays, or :class:`~jaxmx.MXTensor` operands
        blocked along a contracted label (used as they are; see
        :func:`jaxmx.dot_general`).
      config: a :class:`~jaxmx.DotConfig` (``lhs`` is ``a``, ``rhs`` is ``b``).
      precision, preferred_element_type, out_sharding, key: as for
        :func:`jaxmx.dot_general`.

    >>> import jax.numpy as jnp, jaxmx
    >>> q = jnp.ones((2, 5, 4, 32)); k = jnp.ones((2, 7, 4, 32))
    >>> jaxmx.einsum("...qhd,...khd->...hqk", q, k, config=jaxmx.preset("mxfp8")).shape
    (2, 4, 5, 7)
    """
    a, b = (x if isinstance(x, MXTensor) else jnp.asarray(x) for x in (a, b))
    ta, tb, to = _split(subscripts, a.ndim, b.ndim)
    # Labels in one operand and not in the output: sum them out first.
    for which in ("a", "b"):
        term, other, x = (ta, tb, a) if which == "a" else (tb, ta, b)
        drop = [i for i, c in enumerate(term) if c not in other and c not in to]
        if drop and isinstance(x, MXTensor):
            raise ValueError(
                f"einsum {subscripts!r}: labels {''.join(term[i] for i in drop)!r} of the "
                f"MXTensor operand {which} are summed out before the matmul, which an "
                "MXTensor cannot do without decoding; dequantize it first, or keep those "
                "labels in the output"
            )
        if drop:
            x = jnp.sum(x, axis=tuple(drop))
            term = "".join(c for i, c in enumerate(term) if i not in drop)
            if which == "a":
                ta, a = term, x
            else:
                tb, b = term, x
    batch = [c for c in ta if c in tb and c in to]
    contract = [c for c in ta if c in tb and c not in to]
    for c in batch + contract:
        if a.shape[ta.index(c)] != b.shape[tb.index(c)]:
            raise ValueError(
                f"einsum label {c!r} has size {a.shape[ta.index(c)]} in the first operand and "
                f"{b.shape[tb.index(c)]} in the second; jaxmx.einsum does not broadcast"
            )
    dims = (
        (tuple(ta.index(c) for c in contract), tuple(tb.index(c) for c in contract)),
        (tuple(ta.index(c) for c in batch), tuple(tb.index(c) for c in batch)),
    )
    y = dot_general(a, b, dims, precision, preferred_element_type, config=config, key=key)
    labels = _result_labels(ta, tb, batch, contract)
    perm = tuple(labels.index(c) for c in to)
    y = y if perm == tuple(range(len(perm))) else jnp.transpose(y, perm)
    if out_sharding is not None:
        # Constrained after the transpose, where the output has its final layout.
        y = jax.lax.with_sharding_constraint(y, out_sharding)
    return y


def _result_labels(ta: str, tb: str, batch, contract) -> str:
    """Label order of dot_general's result: batch, a's free, b's free."""
    return (
        "".join(batch)
        + "".join(c for c in ta if c not in batch and c not in contract)
        + "".join(c for c in tb if c not in batch and c not in contract)
    )
