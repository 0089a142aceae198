"""Fuzzer: every registered format as compressed optimizer state (jaxmx.optax.mx).

Two contracts, over every format of the registry (``jaxmx.list_formats()``:
the OCP formats, NVFP4, the shared-microexponent formats and per-tensor FP8):

1. ``mx(fmt)`` under ``jax.jit`` decodes to ``jaxmx.dequantize(jaxmx.quantize(x,
   fmt, axis=-1))`` with the format's defaults, bit for bit, on random values
   and shapes of rank 0 to 3 with odd last axes. Shapes ``jaxmx.quantize``
   does not take follow the codec's documented rule: a scalar is a
   one-element vector, NVFP4's last axis is zero-padded to whole blocks, an
   empty tensor decodes to zeros.
2. ``compress_state`` with both Adam moments in the format trains, checkpoints
   with orbax mid-training and resumes bit-identically: the restored state
   equals the saved one, and the resumed run ends where the uninterrupted
   one does.

XLA compiles are the cost, so shapes come from a small pool that the
examples share. The default profile (``make test``) draws a few examples per
format; ``JAXMX_FUZZ=large`` (see conftest.py) draws ten times as many from a
larger pool, and runs the orbax round trip per format with random shapes
and stochastic rounding where the format has it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxmx
import jaxmx.optax as jo

FORMATS = jaxmx.list_formats()
LARGE = settings.default.max_examples > 100
# Rank 0 to 3, odd last axes (partial blocks of 16 and 32), an empty tensor.
SHAPES = [(), (7,), (3, 17), (2, 3, 33), (2, 0)]
if LARGE:
    SHAPES += [(1,), (16,), (5, 47), (4, 64), (2, 2, 65), (3, 1, 9), (0,)]


def _examples(n: int) -> int:
    """``n`` examples under the default profile (100 examples), scaled with the loaded one."""
    return max(1, n * settings.default.max_examples // 100)


def _fuzz(n: int):
    return settings(
        max_examples=_examples(n),
        phases=tuple(p for p in settings.default.phases if LARGE or p.name != "shrink"),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _values(shape, seed: int) -> np.ndarray:
    """Normal values over a random range of magnitudes, with exact zeros."""
    rng = np.random.default_rng(seed)
    x = np.asarray(rng.standard_normal(shape) * 10.0 ** rng.uniform(-8, 4), np.float32)
    return np.where(rng.random(shape) < 0.1, np.float32(0), x)


def reference(x: np.ndarray, fmt: str) -> np.ndarray:
    """dequantize(quantize(x)) with the format's defaults, along the last axis.

    Shapes quantize refuses: a scalar as a one-element vector; NVFP4's last
    axis zero-padded to whole blocks (jaxmx's meaning of a partial block);
    no elements, zeros.
    """
    shape = np.shape(x)
    if not np.size(x):
        return np.zeros(shape, np.float32)
    v = jnp.asarray(x).reshape(shape or (1,))
    n, f = v.shape[-1], jaxmx.get_format(fmt)
    if f.family == "nvfp4" and n % f.block_size:
        v = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, -n % f.block_size)])
    out = np.asarray(jaxmx.dequantize(jaxmx.quantize(v, fmt, axis=-1)))
    return out[..., :n].reshape(shape)


@functools.cache
def _codec_fns(fmt: str):
    codec = jo.mx(fmt)
    return codec, jax.jit(codec.encode), jax.jit(codec.decode)


def _shapes_for(fmt: str) -> list[tuple[int, ...]]:
    """The shapes one format is tried on: two of the pool, rotating (every shape is
    some formats'), or in the large profile all of it."""
    if LARGE:
        return SHAPES
    i = FORMATS.index(fmt)
    return [SHAPES[i % len(SHAPES)], SHAPES[(i + 2) % len(SHAPES)]]


@pytest.mark.parametrize("fmt", FORMATS)
@_fuzz(3)
@given(seed=st.integers(0, 2**32 - 1), data=st.data())
def test_mx_codec_is_dequantize_of_quantize(fmt, seed, data):
    codec, encode, decode = _codec_fns(fmt)
    assert codec.block_size == jaxmx.get_format(fmt).block_size  # the format's default
    shapes = _shapes_for(fmt)
    if LARGE:
        shapes = [data.draw(st.sampled_from(shapes))]
    for shape in shapes:
        x = _values(shape, seed)
        c = encode(jnp.asarray(x))
        got = np.asarray(decode(c))
        assert got.shape == shape and got.dtype == np.float32
        np.testing.assert_array_equal(got, reference(x, fmt), err_msg=f"shape {shape}")
        if x.size >= 16:  # random normals: some element is off every grid of 8 bits or less
            assert not np.array_equal(got, x), f"shape {shape}: the codec did not quantize"
        # Checkpoint-friendly leaves: bytes, and the float32 tensor scale of
        # NVFP4 and per-tensor FP8.
        assert all(a.dtype in (jnp.uint8, jnp.float32) for a in (c.codes, *c.scales))


# --- compress_state and orbax ------------------------------------------------------------


def _grads(params, i):
    # Deterministic, cheap to compile (a PRNG in the step costs seconds of XLA:CPU
    # compile time), different at every step and element.
    return jax.tree.map(lambda p: 1e-2 * jnp.sin(3.0 * p + 0.7 * i + 1.0), params)


@functools.cache
def _step(opt):
    def step(p, s, i):
        u, s = opt.update(_grads(p, i), s, p)
        return optax.apply_updates(p, u), s

    return jax.jit(step)


def _train(opt, params, state, steps, start=0):
    for i in range(start, start + steps):
        params, state = _step(opt)(params, state, i)
    return params, state


def _same_bits(x, y) -> bool:
    x, y = np.asarray(x), np.asarray(y)  # on the host: no compile per leaf shape
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _bitwise_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and jax.tree.all(
        jax.tree.map(_same_bits, a, b)
    )


def _resume_check(opt, params, tmp_path, steps=4):
    # Committed like jit outputs and restored arrays, so the step compiles once
    # (jit keys its cache on commitment).
    params = jax.device_put(params, jax.devices()[0])
    init = jax.jit(opt.init)  # one compile for every codec's encoding of the zero moments
    full = _train(opt, params, init(params), steps)
    half = _train(opt, params, init(params), steps // 2)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", {"params": half[0], "state": half[1]})
        ckpt.wait_until_finished()
        target = jax.tree.map(
            ocp.utils.to_shape_dtype_struct, {"params": half[0], "state": half[1]}
        )
        restored = ckpt.restore(tmp_path / "ckpt", target)
    assert _bitwise_equal(restored["state"], half[1])
    resumed = _train(opt, restored["params"], restored["state"], steps - steps // 2, steps // 2)
    assert _bitwise_equal(resumed, full)
    return full


def _compressed_formats(state) -> set[str]:
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, jo.Compressed))
    return {x.codec.format for x in leaves if isinstance(x, jo.Compressed)}


def test_every_format_resumes_bit_identically_from_orbax(tmp_path):
    # One optimizer, one compiled step, one checkpoint for every format: each
    # parameter's first moment in one format and its second moment in another.
    half = (len(FORMATS) + 1) // 2
    pairs = [(FORMATS[i], FORMATS[(i + half) % len(FORMATS)]) for i in range(half)]
    shapes = [(3, 17), (), (2, 3, 33), (40,)]
    params = {f"p{i}": jnp.asarray(_values(shapes[i % len(shapes)], i)) for i in range(len(pairs))}
    opt = optax.multi_transform(
        {
            f"p{i}": jo.compress_state(optax.adamw(1e-2), {"mu": mu, "nu": nu}, min_size=0)
            for i, (mu, nu) in enumerate(pairs)
        },
        {f"p{i}": f"p{i}" for i in range(len(pairs))},
    )
    _, state = _resume_check(opt, params, tmp_path)
    assert _compressed_formats(state) == set(FORMATS)


@pytest.mark.skipif(not LARGE, reason="JAXMX_FUZZ=large: one orbax round trip per format")
@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=3, deadline=None)
@given(shape=st.sampled_from([s for s in SHAPES if np.prod(s) > 0]), seed=st.integers(0, 2**16))
def test_each_format_resumes_bit_identically_from_orbax(fmt, shape, seed, tmp_path_factory):
    # Stochastic rounding where the family defines it (OCP, NVFP4): the key
    # lives in the state and must resume too.
    stochastic = jaxmx.get_format(fmt).family in ("ocp", "nvfp4")
    rounding = "stochastic" if stochastic else "nearest_even"
    codec = jo.mx(fmt, rounding=rounding)
    opt = jo.compress_state(
        optax.adamw(1e-2),
        {"mu": codec, "nu": codec},
        min_size=0,
        key=jax.random.key(seed) if stochastic else None,
    )
    params = {"w": jnp.asarray(_values(shape, seed)), "b": jnp.asarray(_values((5,), seed + 1))}
    _, state = _resume_check(opt, params, tmp_path_factory.mktemp("ckpt"), steps=6)
    assert _compressed_formats(state) == {codec.format}
