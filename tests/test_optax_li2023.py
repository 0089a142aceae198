"""The 4-bit AdamW state of jaxmx.optax against a float64 NumPy model of Li et al. 2023.

Li, Chen and Zhu, "Memory Efficient Optimizers with 4-bit States" (NeurIPS
2023), written here from the paper's description, sharing no code with
jaxmx.optax (nor with tests/test_optax_reference.py, whose dynamic map is
built decade by decade; this one is built from the map's bit layout):

* The optimizer (their Algorithm 1, the compression framework): at each
  step the stored states are decompressed, the ordinary AdamW step runs in
  full precision on them (new moments from the decompressed old ones and the
  gradient, the parameter update from the new moments), and the new moments
  are compressed for the next step. The second moment is stored as ``v``
  itself, not ``sqrt(v)``.
* A quantizer is a normalization followed by a mapping (section 2): each
  value is divided by a scale, and the result is stored as the index of the
  nearest entry of a small table ``T``; decoding multiplies ``T[index]`` by
  the scale.
* First moment (section 3): the tensor, flattened, is cut into blocks of 128
  consecutive entries, each divided by its largest magnitude; the table is
  the signed 4-bit dynamic-exponent map (Dettmers 2016). Its bit layout: a
  sign bit, then ``E`` zero bits giving the decade ``10**-E``, then a one
  bit, then the remaining bits a fixed-point fraction that picks the midpoint
  of one of the equal parts of [0.1, 1]; no bits after the sign means 0, and
  the pattern "negative zero" stands for +1. At 4 bits: 0, +-0.0055,
  +-0.0325, +-0.0775, +-0.2125, +-0.4375, +-0.6625, +-0.8875 and 1.
* Second moment (section 4): a table that contains 0 sends the many tiny
  second moments to 0, and ``m / sqrt(v)`` then explodes (the zero-point
  problem); the fix is a table without zero, the linear map ``(i + 1) / 16``.
  The normalization is rank-1: entry ``(i, j)`` of a matrix is divided by
  the smaller of the largest magnitude of row ``i`` and of column ``j``.

The tests compare jaxmx's ``compress_state(optax.adamw(lr), "4bit")`` with
the model one step at a time from the same state (every code equal, except
where the float64 value sits within float32 rounding of a decision point),
and over a free run. ``python -m tests.test_optax_li2023`` prints the study
of the 1M-parameter problem (jaxmx against the model, and the model with
each part of the scheme alone).
"""

from __future__ import annotations

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmx.optax as jo

LR = 1e-2
B1, B2, EPS, WD = 0.9, 0.999, 1e-8, 1e-4  # optax.adamw's defaults


# --- The float64 model ----------------------------------------------------------------


def de_map(bits: int = 4) -> np.ndarray:
    """The signed dynamic-exponent map, from its bit layout."""
    values = {0.0, 1.0}  # all bits after the sign zero: 0; "negative zero": +1
    after_sign = bits - 1
    for zeros in range(after_sign):  # the decade 10**-zeros, then the indicator bit
        fraction_bits = after_sign - 1 - zeros
        parts = 2**fraction_bits
        for j in range(parts):
            q = (0.1 + (j + 0.5) * 0.9 / parts) * 10.0**-zeros
            values |= {q, -q}
    out = np.array(sorted(values))
    assert len(out) == 2**bits
    return out


def linear_map(bits: int = 4) -> np.ndarray:
    """The linear map without zero: ``(i + 1) / 2**bits``."""
    return (np.arange(2**bits) + 1.0) / 2**bits


def nearest(n: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index of the table entry nearest to each ``n`` (an exact tie: the smaller magnitude)."""
    mids = (table[:-1] + table[1:]) / 2
    return np.where(
        n >= 0, np.searchsorted(mids, n, side="left"), np.searchsorted(mids, n, side="right")
    )


def blockwise(x: np.ndarray, table: np.ndarray, block: int = 128):
    """(codes, block maxima, normalized values, decoded) of block-wise normalization."""
    flat = np.asarray(x, np.float64).reshape(-1)
    blocks = np.concatenate([flat, np.zeros(-flat.size % block)]).reshape(-1, block)
    scale = np.abs(blocks).max(axis=1)
    n = np.divide(blocks, scale[:, None], out=np.zeros_like(blocks), where=scale[:, None] > 0)
    codes = nearest(n, table)
    decoded = (table[codes] * scale[:, None]).reshape(-1)[: flat.size].reshape(np.shape(x))
    return codes, scale, n, decoded


def rank1(x: np.ndarray, table: np.ndarray):
    """(codes, (row maxima, column maxima), normalized values, decoded) of a matrix."""
    a = np.abs(np.asarray(x, np.float64))
    rows, cols = a.max(axis=1), a.max(axis=0)
    scale = np.minimum(rows[:, None], cols[None, :])
    n = np.divide(x, scale, out=np.zeros_like(a), where=scale > 0)
    codes = nearest(n, table)
    return codes, (rows, cols), n, table[codes] * scale


def adamw(p, g, m, v, t: int, lr: float = LR):
    """One AdamW step (decoupled weight decay): (update, new m, new v), full precision."""
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    m_hat, v_hat = m / (1 - B1**t), v / (1 - B2**t)
    return -lr * (m_hat / (np.sqrt(v_hat) + EPS) + WD * p), m, v


def model_step(p, g, m_stored, v_stored, t: int, first=True, second=True, lr: float = LR):
    """Li et al.'s step: AdamW on the decoded states, then the new states quantized."""
    u, m, v = adamw(p, g, m_stored, v_stored, t, lr)
    m_q = blockwise(m, de_map()) if first else None
    v_q = rank1(v, linear_map()) if second else None
    return u, m, v, m_q, v_q


# --- The problem: weighted least squares, curvatures spread over decades ------------------


def problem(shape, seed: int = 0):
    """``mean(a * (w - target)**2)``, ``a = exp(N(0, 1))``, ``target ~ N(0, 1/4)``, from w = 0."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    target = jax.random.normal(k1, shape) * 0.5
    a = jnp.exp(jax.random.normal(k2, shape))
    return target, a


def loss64(w, target, a) -> float:
    return float(np.mean(np.asarray(a, np.float64) * (w - np.asarray(target, np.float64)) ** 2))


@functools.cache
def _jaxmx_step(shape, seed, preset):
    target, a = problem(shape, seed)
    inner = optax.adamw(LR)
    opt = jo.compress_state(inner, preset) if preset else inner

    def loss(w):
        return jnp.mean(a * (w - target) ** 2)

    @jax.jit
    def step(w, state):
        g = jax.grad(loss)(w)
        u, state = opt.update(g, state, w)
        return optax.apply_updates(w, u), state, g, u

    return opt, step


def _unpack(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    return np.stack([codes & 15, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1)


def _near_decision_point(n: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Whether ``n`` lies within float32 rounding (a few ulps) of a midpoint of ``table``."""
    mids = (table[:-1] + table[1:]) / 2
    gap = np.abs(n.reshape(-1)[:, None] - mids[None, :]).min(axis=1).reshape(n.shape)
    return gap <= 2.0**-20 * np.maximum(np.abs(n), 2.0**-100)


def _check_codes(got, model_codes, n, table, what):
    differ = got != model_codes
    assert np.all(_near_decision_point(n[differ], table)), (
        f"{what}: {int(differ.sum())} codes differ, not all within float32 rounding of a "
        f"decision point: n={n[differ][:5]}"
    )
    assert np.all(np.abs(got - model_codes) <= 1), what  # a neighbour, never further
    return int(differ.sum())


def test_the_models_maps_are_jaxmx_maps():
    # maps.py against the paper's definitions: the map values, rounded to float32 once.
    np.testing.assert_array_equal(
        jo.dynamic_map(signed=True, bits=4).values, de_map().astype(np.float32)
    )
    np.testing.assert_array_equal(jo.linear_map(bits=4).values, linear_map().astype(np.float32))
    four = jo.codecs.PRESETS["4bit"]["codecs"]
    assert four["mu"].block_size == 128 and four["mu"].qmap.signed
    assert four["nu"] == jo.rank1(4)  # rank-1, the linear map without zero


def test_4bit_adamw_is_the_model_step_by_step():
    # From the same state each step (jaxmx's, decoded), the model in float64:
    # every stored code equal but where float32 rounding decides a near-tie,
    # the scales and the parameter update equal to float32 rounding.
    shape = (96, 75)  # 7200 elements: a partial last block of 128, an odd last axis
    opt, step = _jaxmx_step(shape, 1, "4bit")
    w = jnp.zeros(shape)
    state = opt.init(w)
    differ = total = 0
    for t in range(1, 13):
        adam = state.inner_state[0]
        m_stored = np.asarray(adam.mu.codec.decode(adam.mu), np.float64)
        v_stored = np.asarray(adam.nu.codec.decode(adam.nu), np.float64)
        w_before = np.asarray(w, np.float64)
        w, state, g, u = step(w, state)
        u_model, _, _, (m_codes, m_scale, m_n, _), (v_codes, v_scales, v_n, _) = model_step(
            w_before, np.asarray(g, np.float64), m_stored, v_stored, t
        )
        # optax forms the bias correction 1 - b2**t in float32, from 0.999 rounded
        # to float32: at t = 1 it is off by 1.3e-5 relatively, the update by half that.
        np.testing.assert_allclose(np.asarray(u, np.float64), u_model, rtol=2e-5, atol=1e-12)
        mu, nu = state.inner_state[0].mu, state.inner_state[0].nu
        np.testing.assert_allclose(np.asarray(mu.scales[0]), m_scale, rtol=2.0**-20)
        for got, want in zip(nu.scales, v_scales, strict=True):
            np.testing.assert_allclose(np.asarray(got), want, rtol=2.0**-20)
        differ += _check_codes(_unpack(mu.codes), m_codes, m_n, de_map(), f"step {t} m")
        v_got = _unpack(nu.codes)[:, : shape[1]]
        differ += _check_codes(v_got, v_codes, v_n, linear_map(), f"step {t} v")
        total += m_codes.size + v_codes.size
    assert differ <= 1e-4 * total  # near-ties are rare


def test_4bit_adamw_follows_the_models_loss_curve():
    # A free run of each (jaxmx in float32, the model in float64) for 60 steps:
    # the same loss curve, far above full-precision AdamW's.
    shape = (96, 75)
    target, a = problem(shape, 2)
    opt, step = _jaxmx_step(shape, 2, "4bit")
    fp_opt, fp_step = _jaxmx_step(shape, 2, None)
    w, state = jnp.zeros(shape), opt.init(jnp.zeros(shape))
    w_fp, fp_state = jnp.zeros(shape), fp_opt.init(jnp.zeros(shape))
    p = m = v = np.zeros(shape)
    tgt, a64 = np.asarray(target, np.float64), np.asarray(a, np.float64)
    for t in range(1, 61):
        w, state, _, _ = step(w, state)
        w_fp, fp_state, _, _ = fp_step(w_fp, fp_state)
        g = 2 * a64 * (p - tgt) / p.size
        u, _, _, m_q, v_q = model_step(p, g, m, v, t)
        p, m, v = p + u, m_q[3], v_q[3]
        if t % 20 == 0:
            got, want = loss64(np.asarray(w, np.float64), target, a), loss64(p, target, a)
            assert got == pytest.approx(want, rel=0.02), t
    assert loss64(p, target, a) > 2 * loss64(np.asarray(w_fp, np.float64), target, a)


# --- The study: ``python -m tests.test_optax_li2023`` ------------------------------------

STUDY_SHAPE = (1024, 1024)  # 1M parameters
STUDY_STEPS = (10, 50, 100, 200)


def study_jaxmx(preset, steps=STUDY_STEPS):
    opt, step = _jaxmx_step(STUDY_SHAPE, 0, preset)
    target, a = problem(STUDY_SHAPE, 0)
    w, state = jnp.zeros(STUDY_SHAPE), opt.init(jnp.zeros(STUDY_SHAPE))
    out = {}
    for t in range(1, max(steps) + 1):
        w, state, _, _ = step(w, state)
        if t in steps:
            out[t] = loss64(np.asarray(w, np.float64), target, a)
    return out


def study_model(first=True, second=True, second_map=None, steps=STUDY_STEPS):
    """The model; ``first``/``second`` False keeps that moment in float64;
    ``second_map`` replaces the linear map (same rank-1 normalization)."""
    target, a = problem(STUDY_SHAPE, 0)
    tgt, a64 = np.asarray(target, np.float64), np.asarray(a, np.float64)
    p = m = v = np.zeros(STUDY_SHAPE)
    out = {}
    for t in range(1, max(steps) + 1):
        g = 2 * a64 * (p - tgt) / p.size
        u, m, v = adamw(p, g, m, v, t)
        p = p + u
        if first:
            m = blockwise(m, de_map())[3]
        if second:
            v = rank1(v, linear_map() if second_map is None else second_map)[3]
        if t in steps:
            out[t] = loss64(p, target, a)
    return out


def unsigned_de0_map(bits: int = 4) -> np.ndarray:
    """Li et al.'s other fix of the zero point: the unsigned dynamic-exponent map without 0."""
    values = {1.0}
    for zeros in range(bits - 1):
        parts = 2 ** (bits - 1 - zeros)
        values |= {(0.1 + (j + 0.5) * 0.9 / parts) * 10.0**-zeros for j in range(parts)}
    return np.array(sorted(values))


@pytest.mark.slow
def test_study_the_model_has_jaxmx_loss_curve():
    got, want = study_jaxmx("4bit", (100,)), study_model(steps=(100,))
    assert got[100] == pytest.approx(want[100], rel=0.02)
    assert got[100] > 4 * study_jaxmx(None, (100,))[100]


def main() -> None:
    rows = [
        ("jaxmx AdamW (float32 state)", lambda: study_jaxmx(None)),
        ("jaxmx 8-bit state", lambda: study_jaxmx("8bit")),
        ("jaxmx 4-bit state", lambda: study_jaxmx("4bit")),
        ("model: AdamW, float64 state", lambda: study_model(False, False)),
        ("model: Li et al. 4-bit (m and v)", lambda: study_model()),
        ("model: 4-bit m only (v float64)", lambda: study_model(True, False)),
        ("model: 4-bit v only (m float64)", lambda: study_model(False, True)),
        (
            "model: 4-bit, v with DE-0 map",
            lambda: study_model(True, True, unsigned_de0_map()),
        ),
        ("model: 4-bit v only, DE-0 map", lambda: study_model(False, True, unsigned_de0_map())),
    ]
    print(f"loss after step {', '.join(map(str, STUDY_STEPS))} (1024x1024, AdamW lr {LR})")
    for name, run in rows:
        t0 = time.perf_counter()
        out = run()
        cells = "  ".join(f"{out[s]:.4f}" for s in STUDY_STEPS)
        print(f"{name:<36} {cells}   ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
