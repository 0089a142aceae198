"""GPTQ onto fixed block grids: rows rounded in turn, each error pushed onto the rest."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmx.formats import MXFormat, get_family
from jaxmx.ptq._checks import _check_format, _check_scale_mode, _spec
from jaxmx.ptq._hessians import _hessian_of
from jaxmx.ptq._search import ScaleSearch, _check_importance, _search_tensor
from jaxmx.quantize import check_array, quantize_spec
from jaxmx.spec import check_axis, check_flag
from jaxmx.tensor import MXTensor

# --------------------------------------------------------------------------
# GPTQ with fixed block scales.
# --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(3, 4))
def _gptq_rows(w, u, e, fmt, chunk):
    """GPTQ's lazy-batch loop (Frantar et al. 2023, Algorithm 1) over rows of ``w``.

    ``w``: (n, R) float32, rows in quantization order (the contraction axis);
    ``u``: (n, n) upper Cholesky factor of the inverse Hessian; ``e``: (n, R)
    the fixed grid parameter of each entry (``Family.grid``).
    ``n`` is a multiple of ``chunk``. Returns the quantized values, shaped like ``w``.
    """
    to_grid = get_family(fmt).round_to_grid
    n = w.shape[0]
    rows = jnp.arange(n)

    def one_chunk(c, carry):
        w, q = carry
        i0 = c * chunk
        wc = lax.dynamic_slice_in_dim(w, i0, chunk, 0)
        uc = lax.dynamic_slice(u, (i0, i0), (chunk, chunk))
        ec = lax.dynamic_slice_in_dim(e, i0, chunk, 0)

        def one_row(r, st):
            wc, qc, errs = st
            qr = to_grid(wc[r], ec[r], fmt)
            err = (wc[r] - qr) / uc[r, r]
            # uc is upper triangular: only rows after r move.
            wc = wc - uc[r][:, None] * err[None, :]
            return wc, qc.at[r].set(qr), errs.at[r].set(err)

        zeros = jnp.zeros_like(wc)
        _, qc, errs = lax.fori_loop(0, chunk, one_row, (wc, zeros, zeros))
        # The rows after this chunk get its errors in one product.
        ur = lax.dynamic_slice_in_dim(u, i0, chunk, 0) * (rows >= i0 + chunk)[None, :]
        w = w - jnp.matmul(ur.T, errs, precision=lax.Precision.HIGHEST)
        return w, lax.dynamic_update_slice_in_dim(q, qc, i0, 0)

    _, q = lax.fori_loop(0, n // chunk, one_chunk, (w, jnp.zeros_like(w)))
    return q


def _inverse_hessian_factor(hessian: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1`` and the dead inputs."""
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0  # inputs never seen in calibration: weight is irrelevant
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    try:
        hinv = np.linalg.inv(np.linalg.cholesky(h))
    except np.linalg.LinAlgError:
        raise ValueError(
            "the damped Hessian is not positive definite (non-finite or not X^T X); "
            f"raise damp (now {damp}) or check the calibration inputs"
        ) from None
    hinv = hinv.T @ hinv  # H^-1 = L^-T L^-1
    return np.linalg.cholesky(hinv).T, dead


def quantize_gptq(
    w: jax.typing.ArrayLike,
    format: str | MXFormat,
    hessian: jax.typing.ArrayLike,
    *,
    axis: int = 0,
    block_size: int | None = None,
    scale_mode: str = "floor",
    search: ScaleSearch | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    packed: bool = False,
) -> MXTensor:
    """GPTQ with MX block scales fixed from the original weights.

    1. Block exponents come from ``w`` itself: by ``scale_mode`` (as a
       direct cast), or by ``search`` (:class:`ScaleSearch`; its block
       errors weighted by ``diag(hessian)``).
    2. ``H = hessian + damp * mean(diag(hessian)) * I`` (inputs whose
       Hessian diagonal is 0 were never active: their weights become 0).
    3. Rows along ``axis`` (the contraction axis) are rounded in order onto
       their block's fixed grid; each row's error, divided by the diagonal of
       the upper Cholesky factor ``U`` of ``H^-1``, is subtracted from the
       later rows with weights ``U[i, i+1:]`` (Frantar et al. 2023,
       arXiv:2210.17323, Algorithm 1, lazy batches of up to 128 rows).

    This minimizes ``||X w - X w_q||^2`` greedily for the calibration inputs
    ``X`` with ``hessian = X^T X``; a direct cast ignores ``X``.

    Args:
      w: float weight; ``axis`` its contraction axis.
      format: MX format with power-of-two scales.
      hessian: ``(n, n)`` with ``n = w.shape[axis]``: ``sum X^T X`` over the
        calibration rows ``X`` (``(tokens, n)``) fed to this weight.
      axis: contraction axis of ``w``.
      block_size: elements per block; None: the format's.
      scale_mode: rule for the fixed exponents (ignored with ``search``).
      search: take the fixed exponents from a per-block scale search.
      damp: dampening, a fraction of the Hessian's mean diagonal (GPTQ: 1%).
      act_order: quantize rows in order of decreasing Hessian diagonal (the
        inputs with the most energy first; GPTQ's ``act_order``/``desc_act``),
        which the fixed block scales allow (GPTQ's ``static_groups``).
      packed: pack sub-byte codes.

    Returns:
      An :class:`~jaxmx.MXTensor` of ``w``'s shape blocked along ``axis``.

    >>> import jax, jax.numpy as jnp, jaxmx
    >>> x = jax.random.normal(jax.random.key(0), (256, 64))
    >>> w = jax.random.normal(jax.random.key(1), (64, 16))
    >>> t = jaxmx.ptq.quantize_gptq(w, "mxfp4", x.T @ x)
    >>> d = jaxmx.quantize(w, "mxfp4", axis=0)
    >>> out_err = lambda t: float(jnp.linalg.norm(x @ w - x @ jaxmx.dequantize(t)))
    >>> out_err(t) < out_err(d)
    True
    """
    fmt = _check_format(format)
    w = check_array(w, "w").astype(jnp.float32)
    axis = check_axis(axis, w.ndim)  # the rows: the contraction axis
    spec = _spec(fmt, w.ndim, axis, block_size, _check_scale_mode(scale_mode), packed)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 <= damp < 1:
        raise ValueError(f"damp must be a float in [0, 1) (GPTQ uses 0.01), got {damp!r}")
    act_order = check_flag(act_order, "act_order")
    if search is not None and not isinstance(search, ScaleSearch):
        raise TypeError(f"search must be a ScaleSearch or None, got {type(search).__name__}")
    n = w.shape[axis]
    hessian = np.asarray(hessian)
    if hessian.shape != (n, n):
        raise ValueError(
            f"hessian must have shape ({n}, {n}) (w.shape[axis] squared) for w of shape "
            f"{tuple(w.shape)} along axis {axis}, got {hessian.shape}"
        )
    if not np.all(np.isfinite(hessian)):
        raise ValueError("hessian holds NaN or Inf")
    if not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError("w holds NaN or Inf; GPTQ needs finite weights")

    # 1. Fixed scales from w (a direct cast's, or a search's), and each
    #    entry's grid parameter (Family.grid).
    mode = _check_scale_mode(scale_mode if search is None else search.scale_mode)
    imp = None
    if search is not None and not spec.tiles:
        imp = _check_importance(np.diag(hessian), w.shape, spec.axis)
    unpacked = dataclasses.replace(spec, packed=False, scale_mode=mode)
    if search is not None:
        like = _search_tensor(w, unpacked, search.offsets, imp)
    else:
        like = quantize_spec(w, None, None, unpacked)
    family = get_family(fmt)
    params = family.grid(like)
    rows_e = jnp.moveaxis(params, axis, 0).reshape(n, -1)
    rows_w = jnp.moveaxis(w, axis, 0).reshape(n, -1)

    # 2. Inverse Hessian factor (rows permuted by act_order); dead inputs quantize to 0.
    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(n)
    u, dead = _inverse_hessian_factor(hessian[np.ix_(order, order)], float(damp))
    rows_w = jnp.where(jnp.asarray(dead)[:, None], 0.0, rows_w[order])
    rows_e = rows_e[order]

    # 3. Rows in lazy batches (padded with identity rows that quantize to 0).
    chunk = min(128, -(-n // 16) * 16)
    pad = -n % chunk
    u = np.pad(u, ((0, pad), (0, pad)))
    u[n:, n:] = np.eye(pad)
    rows_w = jnp.pad(rows_w, ((0, pad), (0, 0)))
    rows_e = jnp.pad(rows_e, ((0, pad), (0, 0)))
    q = _gptq_rows(rows_w, jnp.asarray(u, jnp.float32), rows_e, fmt, chunk)[:n]
    q = q[np.argsort(order)]
    moved = jnp.moveaxis(w, axis, 0).shape
    q = jnp.moveaxis(q.reshape(moved), 0, axis)

    # 4. The codes of q on the fixed scales (q is on them: no value moves).
    return family.onto(q, like, spec)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class GPTQ:
    """``method=`` of :func:`jaxmx.quantize_params`: GPTQ with fixed block scales.

    Weights without a Hessian are an error (a silent direct cast would hide
    a calibration that missed layers).

    >>> import jax, jax.numpy as jnp, jaxmx
    >>> x = jax.random.normal(jax.random.key(0), (128, 64))
    >>> params = {"d": {"kernel": jnp.ones((64, 4))}}
    >>> q = jaxmx.quantize_params(params, "mxfp4",
    ...                           method=jaxmx.ptq.GPTQ(hessians={"d/kernel": x.T @ x}))
    >>> q["d"]["kernel"].shape
    (64, 4)
    """

    # Leaf path (as quantize_params names it, "params/layer/kernel") -> X^T X.
    hessians: Mapping[str, jax.Array]
    # Dampening as a fraction of the mean Hessian diagonal.
    damp: float = 0.01
    # Rule for the fixed block exponents.
    scale_mode: str = "floor"
    # Or fixed exponents from a per-block scale search.
    search: ScaleSearch | None = None
    # Rows in order of decreasing Hessian diagonal (GPTQ's act_order).
    act_order: bool = False

    def __post_init__(self):
        if not isinstance(self.hessians, Mapping):
            raise TypeError(
                f"hessians must be a dict {{path: X^T X}}, got {type(self.hessians).__name__}"
            )
        _check_scale_mode(self.scale_mode)

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
        """Quantizes the weight at ``path`` with its Hessian."""
        return quantize_gptq(
            x,
            fmt,
            _hessian_of(self.hessians, path, "GPTQ"),
            axis=axis,
            block_size=block_size,
            scale_mode=self.scale_mode,
            search=self.search,
            damp=self.damp,
            act_order=self.act_order,
            packed=packed,
        )
