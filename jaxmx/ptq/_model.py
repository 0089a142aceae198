"""PTQ of any JAX function in one call: find its weights, calibrate, quantize, serve."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmx import _hadamard
from jaxmx._paths import path_string
from jaxmx.formats import get_family
from jaxmx.ptq._gptq import GPTQ
from jaxmx.ptq._model_report import PTQReport, TiedWeight, WeightResult
from jaxmx.ptq._model_serve import _activation, _is_node, _operand_axis, _PTQFunction, _Weight
from jaxmx.ptq._rotate import _rotate
from jaxmx.ptq._search import ScaleSearch
from jaxmx.ptq._uses import leaf_axis
from jaxmx.quantize import quantize
from jaxmx.rules import RulesLike, parse_rules
from jaxmx.tensor import MXTensor

__all__ = ["PTQReport", "TiedWeight", "WeightResult", "quantize_model"]

METHODS = ("direct", "search", "gptq", "hadamard", "hadamard_search", "hadamard_gptq")


# --------------------------------------------------------------------------
# quantize_model.
# --------------------------------------------------------------------------


def quantize_model(
    fn: Callable,
    params: Any,
    calibration: Iterable,
    rules: RulesLike = "mxfp4",
    *,
    method: str = "gptq",
    packed: bool = True,
    hadamard_size: int | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    scale_search: bool = False,
    weighted_search: bool = False,
) -> tuple[Callable, object]:
    """Post-training quantization of any JAX function ``fn(params, *inputs)`` in one call.

    1. ``fn`` is traced on the first calibration batch, and
       :func:`jaxmx.intercept`'s planner decides each matmul by ``rules``.
       Every parameter leaf that is an operand of an MX matmul, whole (through
       transposes, reshapes and casts, into ``jit``, ``cond``, ``checkpoint``
       bodies), is a weight; its contraction axis comes from the matmul's
       dimension numbers, its format from the rule (the config's weight
       formats, ``rhs``, wherever the weight sits, as ``intercept``'s
       ``weights=`` gives them; its ``scale_mode`` and block size too). A
       matmul of two activations (attention's q.k and p.v) gets the rule's
       ``config.for_activations()``.
    2. For ``gptq`` (and ``weighted_search``), ``fn`` runs in float over every
       calibration batch and each weight's Hessian ``X^T X`` is summed over
       the activation rows ``X`` of all the matmuls that read it.
    3. ``hadamard_*`` rotates each weight along its contraction axis by the
       block-diagonal Hadamard (:func:`rotate`; the Hessian becomes
       ``R^T H R``), and the serving function rotates the activation of every
       matmul that reads it, inside ``jaxmx.intercept``, so products are
       unchanged before quantization (no model code changes: linen, nnx,
       Equinox and plain functions alike).
    4. Each weight is quantized (:func:`jaxmx.quantize`, :class:`ScaleSearch`
       or :class:`GPTQ`) into an :class:`~jaxmx.MXTensor` blocked along its
       contraction axis, in place in the parameter tree.

    Tied parameters (read by a matmul and by something else, such as an
    embedding table that is also the output head) keep their float value
    for the other reads and get a quantized copy for the matmuls: the leaf
    becomes a :class:`TiedWeight` ``(value, matmul)``. Parameters left float
    (a matmul in high precision, a slice of a stacked weight read by a
    ``lax.scan``, a weight contracted over two axes, ...) are listed with
    the reason in ``serve_fn.report``; where their matmul is MX, it casts
    them at run time as ``jaxmx.intercept`` does.

    Args:
      fn: ``fn(params, *inputs)``: ``model.apply``, a function around an nnx
        or Equinox module, any JAX function.
      params: the parameter pytree (linen variables, an nnx ``State``, an
        Equinox module's arrays, a dict).
      calibration: an iterable of batches, each an input tuple (or one
        array) for ``fn(params, *batch)``. The first traces ``fn``; GPTQ
        collects Hessians over all of them.
      rules: what :func:`jaxmx.intercept` takes (a format or preset name, a
        :class:`~jaxmx.DotConfig`, or ``[(pattern, config), ...]``): which
        matmuls run in MX and in which formats. Weight-only:
        ``DotConfig(rhs="mxfp4")``; ``"mxfp4"`` quantizes activations too.
      method: ``"direct"`` (cast with the rule's scale rule), ``"search"``
        (per-block scale search), ``"gptq"``, or ``"hadamard"``,
        ``"hadamard_search"``, ``"hadamard_gptq"``: the same after the
        rotation.
      packed: pack sub-byte codes (two FP4 codes a byte).
      hadamard_size: Hadamard order (a power of two); None: the weight's
        block size, at most 32. Weights whose contraction length it does not
        divide are not rotated (the report says so).
      damp, act_order: GPTQ's dampening and row order (:class:`GPTQ`).
      scale_search: GPTQ on block scales from a scale search.
      weighted_search: scale search weighted by the Hessian diagonal.

    Returns:
      ``(serve_fn, qparams)``: ``serve_fn(qparams, *inputs)`` runs ``fn``
      with the rules' MX matmuls from the quantized weights (jittable; its
      ``coverage`` says what runs where, ``report`` is the
      :class:`PTQReport`), and ``qparams`` is ``params`` with MXTensor
      weights.

    Raises:
      ValueError: an unknown method, empty calibration, options that do not
        apply to the method.
      TypeError: ``fn`` not callable, calibration not an iterable of batches.

    >>> import jax, jax.numpy as jnp, jaxmx
    >>> def mlp(p, x):
    ...     return jax.nn.relu(x @ p["w1"]) @ p["w2"]
    >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    >>> params = {"w1": jax.random.normal(k1, (64, 128)), "w2": jax.random.normal(k2, (128, 8))}
    >>> calib = [jax.random.normal(k3, (256, 64))]
    >>> serve, q = jaxmx.ptq.quantize_model(mlp, params, calib, jaxmx.DotConfig(rhs="mxfp4"))
    >>> q["w1"].format.name, serve.report.quantized
    ('mxfp4_e2m1', ('w1', 'w2'))
    >>> serve(q, calib[0]).shape
    (256, 8)
    """
    start = time.perf_counter()
    if not callable(fn):
        raise TypeError(
            f"quantize_model takes a callable fn(params, *inputs), got {type(fn).__name__}"
        )
    rotate, base = _check_method(method)
    _check_options(method, base, rotate, hadamard_size, act_order, scale_search, weighted_search)
    if not isinstance(packed, (bool, np.bool_)):
        raise TypeError(f"packed must be True or False, got {packed!r}")
    batches = _check_calibration(calibration)
    rules = parse_rules(rules)

    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_node)[0]
    leaves = {path_string(p): x for p, x in flat}
    traced, _ = _PTQFunction(fn, rules, "plan")._traced((params, *batches[0]), {})
    uses, sites = traced.ptq
    weights, notes = _plan(leaves, uses, sites, traced.plan.decisions, rotate, hadamard_size)

    # The weights whose matmuls all have an activation: those a Hessian is collected for.
    targets = {p: w for p, w in weights.items() if all(_activation(u) for u in uses.matmuls[p])}
    hessians, ran = {}, 0
    if (base == "gptq" or weighted_search) and targets:
        hessians, ran = _collect(fn, rules, params, batches, targets), len(batches)

    quantized, results = {}, {}
    for path, w in weights.items():
        t, used, note = _quantize_weight(
            w,
            leaves[path],
            base,
            hessians.get(path),
            uses.matmuls[path],
            collectable=path in targets,
            packed=packed,
            damp=damp,
            act_order=act_order,
            scale_search=scale_search,
            weighted_search=weighted_search,
        )
        quantized[path] = t
        results[path] = WeightResult(
            path=path,
            shape=tuple(leaves[path].shape),
            action="tied" if w.tied else "quantized",
            method=("hadamard_" if w.rotate else "") + used,
            format=w.fmt.name,
            axis=w.axis,
            hadamard=w.rotate,
            note="; ".join(n for n in (notes.get(path, ""), note) if n),
        )
    for path, why in notes.items():
        if path not in weights:
            results[path] = WeightResult(
                path=path, shape=tuple(np.shape(leaves[path])), action="float", note=why
            )

    def put(path, x):
        t = quantized.get(path_string(path))
        if t is None:
            return x
        return TiedWeight(x, t) if weights[path_string(path)].tied else t

    qparams = jax.tree_util.tree_map_with_path(put, params, is_leaf=_is_node)
    serve_fn = _PTQFunction(fn, rules, "serve", {p: weights[p] for p in quantized})
    order = [p for p in leaves if p in results]
    serve_fn.report = PTQReport(
        method=method,
        batches=ran,
        weights=tuple(results[p] for p in order),
        seconds=time.perf_counter() - start,
    )
    return serve_fn, qparams


def _check_method(method) -> tuple[bool, str]:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(
            f"unknown method {method!r}; allowed: {', '.join(repr(m) for m in METHODS)}"
        )
    rotate = method.startswith("hadamard")
    base = method.removeprefix("hadamard").removeprefix("_") or "direct"
    return rotate, base


def _check_options(method, base, rotate, size, act_order, scale_search, weighted_search):
    for name, value in (
        ("act_order", act_order),
        ("scale_search", scale_search),
        ("weighted_search", weighted_search),
    ):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if (act_order or scale_search) and base != "gptq":
        raise ValueError(
            f"act_order and scale_search are GPTQ options; method {method!r} takes neither "
            "(use 'gptq' or 'hadamard_gptq')"
        )
    if weighted_search and base != "search":
        raise ValueError(
            f"weighted_search applies to 'search' and 'hadamard_search', not to {method!r}"
        )
    if size is not None:
        if not rotate:
            raise ValueError(f"hadamard_size applies to the 'hadamard*' methods, not to {method!r}")
        _hadamard.check_size(size)


def _check_calibration(calibration) -> list[tuple]:
    if isinstance(calibration, (jax.Array, np.ndarray)):
        raise TypeError(
            "calibration must be an iterable of batches (input tuples or single arrays), "
            f"got one array of shape {tuple(calibration.shape)}: pass [x] for one batch, "
            "or list(x) to take its rows as batches"
        )
    if isinstance(calibration, (str, bytes, dict)) or not isinstance(calibration, Iterable):
        raise TypeError(
            "calibration must be an iterable of batches (input tuples or single arrays) for "
            f"fn(params, *batch), got {type(calibration).__name__}"
        )
    batches = [b if isinstance(b, tuple) else (b,) for b in calibration]
    if not batches:
        raise ValueError(
            "calibration is empty: quantize_model traces fn on its first batch (and GPTQ "
            "collects Hessians over all of them); give at least one batch"
        )
    return batches


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _plan(leaves, uses, sites, decisions, rotate, size) -> tuple[dict, dict]:
    """``({path: _Weight}, {path: note})``: the weights, and why others stay float."""
    weights, notes = {}, {}
    for path, us in uses.matmuls.items():
        x = leaves.get(path)
        why, keys = None, set()
        if isinstance(x, MXTensor):
            why = "already an MXTensor"
        elif not _is_float(x):
            why = f"a {np.dtype(x.dtype)} parameter (quantize_model takes float weights)"
        for u in us if why is None else ():
            site = sites.get(u.addr)
            where = site.path if site is not None else u.op
            if u.other is not None:
                why = f"{where} multiplies it by another parameter ({u.other})"
            elif u.scanned:
                why = (
                    f"{where} reads one slice of it per lax.scan iteration (stacked layers); "
                    "quantize_model quantizes weights its matmuls read whole"
                )
            elif u.addr not in decisions:
                why = f"{where} runs in high precision" + (
                    f": {site.reason}" if site is not None else ""
                )
            else:
                cfg = decisions[u.addr]  # its weight (rhs) formats, wherever it sits
                fmt, axis = cfg.role("rhs"), _operand_axis(u)
                if fmt is None:
                    why = f"the rule of {where} gives its weight no format"
                elif axis is None:
                    why = f"{where} contracts it over several axes or has it in a batch axis"
                elif (axis := leaf_axis(u.views, axis)) is None:
                    why = f"{where} reads it through a reshape that splits its contraction axis"
                else:
                    block = cfg.block_size if cfg.rhs_block_size is None else cfg.rhs_block_size
                    keys.add((axis, fmt, block, cfg.scale_mode))
            if why is not None:
                break
        if why is None and len(keys) > 1:
            why = "its matmuls read it with different axes, formats, block sizes or scale rules"
        if why is not None:
            if any(u.addr in decisions for u in us):
                why += " (an MX matmul casts it at run time)"
            notes[path] = why
            continue
        ((axis, fmt, block, scale_mode),) = keys
        rot = None
        if rotate:
            n = leaves[path].shape[axis]
            order = size
            if order is None:
                b = block if block is not None else fmt.block_size
                order = min(32, b) if isinstance(b, int) else None
            if order is None or not all(_activation(u) for u in us):
                notes[path] = "not rotated: a matmul reading it has no activation to rotate"
            elif n % order:
                notes[path] = (
                    f"not rotated: its contraction length {n} is not a multiple of {order}"
                )
            else:
                rot = order
        weights[path] = _Weight(
            path, axis, fmt, block, scale_mode, tied=path in uses.others, rotate=rot
        )
    for path, x in leaves.items():
        if path in uses.matmuls or np.ndim(x) < 2 or isinstance(x, TiedWeight):
            continue
        others = sorted(set(uses.others.get(path, ())))
        notes[path] = f"read by no matmul ({', '.join(others)})" if others else "read by no matmul"
    return weights, notes


def _collect(fn, rules, params, batches, targets) -> dict:
    """``{path: X^T X}`` (float64) over the calibration batches, the function in float."""
    return _PTQFunction(fn, rules, "collect", targets).hessians(params, batches)


def _rotate_hessian(h: np.ndarray, size: int) -> np.ndarray:
    """``R^T H R`` for the block-diagonal Hadamard ``R`` of order ``size`` (float64)."""
    n = h.shape[0]
    r = np.sign(_hadamard.hadamard(size)).astype(np.float64) / np.sqrt(size)
    blocks = np.asarray(h, np.float64).reshape(n // size, size, n // size, size)
    return np.einsum("ij,aibk,kl->ajbl", r, blocks, r).reshape(n, n)


def _quantize_weight(
    w: _Weight,
    x,
    base: str,
    hessian,
    uses,
    *,
    collectable,
    packed,
    damp,
    act_order,
    scale_search,
    weighted_search,
) -> tuple[MXTensor, str, str]:
    """``(MXTensor, method used, note)`` for one weight; ``collectable``: its matmuls all
    have an activation to collect a Hessian from."""
    xf = jnp.asarray(x, jnp.float32)
    if w.rotate:
        xf = _rotate(xf, w.axis, w.rotate)
    used, note = base, ""
    searchable = get_family(w.fmt).searchable
    if base != "direct" and not searchable:
        used, note = "direct", f"{w.fmt.name} has no scale search: direct cast"
    elif base == "gptq" and hessian is None:
        used = "search" if scale_search else "direct"
        note = (
            f"no calibration batch reached its matmuls: {used}"
            if collectable
            else f"a {uses[0].op} reading it has no input Hessian: {used}"
        )
    elif weighted_search and hessian is None:
        note = "no calibration batch reached its matmuls: unweighted search"
    if hessian is not None and w.rotate:
        hessian = _rotate_hessian(hessian, w.rotate)
    pack = bool(packed) and w.fmt.element.bits < 8
    kw = dict(axis=w.axis, block_size=w.block_size, packed=pack)
    if used == "gptq":
        search = ScaleSearch(scale_mode=w.scale_mode) if scale_search else None
        method = GPTQ(
            hessians={w.path: hessian},
            damp=damp,
            scale_mode=w.scale_mode,
            search=search,
            act_order=act_order,
        )
        t = method.quantize_weight(w.path, xf, w.fmt, **kw)
    elif used == "search":
        h = {w.path: hessian} if weighted_search and hessian is not None else None
        t = ScaleSearch(scale_mode=w.scale_mode, hessians=h).quantize_weight(
            w.path, xf, w.fmt, **kw
        )
    else:
        t = quantize(xf, w.fmt, scale_mode=w.scale_mode, **kw)
    if t.dtype != x.dtype:
        t = dataclasses.replace(t, dtype=np.dtype(x.dtype))
    return t, used, note
