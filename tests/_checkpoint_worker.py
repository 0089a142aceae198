"""Sharded training state with MX leaves, saved and restored across meshes.

Used by tests/test_multiprocess.py. The state of a small two-matmul model
trained with MX matmuls under FSDP: float32 parameters and MX copies of them
(an ``MXTensor`` per weight, MXFP4 packed and MXFP8, cut by
:func:`jaxmx.fsdp_shardings` with blocks whole), and AdamW's moments
compressed by :func:`jaxmx.optax.compress_state` (MXFP8 first moment).
Every leaf is cut over a one-axis mesh of every device of every process;
:func:`jaxmx.save` writes it from all processes.

Run as a script (each process of examples/launch.py) with
``LOAD_DIR SAVE_DIR OUT``: restores ``LOAD_DIR`` (written by another mesh)
onto this one, runs :func:`save_and_resume` into ``SAVE_DIR``, and process 0
writes what it found to ``OUT`` (an ``.npz`` of the leaves' bits).
"""

from __future__ import annotations

import functools
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make `examples`, `tests` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxmx
from examples import parallel as par

K, H = 256, 128  # w1 (256, 128), w2 (128, 256): each cut over 4 devices along an axis of 128+
BATCH = 8
DN = (((1,), (0,)), ((), ()))
CONFIG = jaxmx.preset("mxfp8", fsdp="data")
# The MX copies: (format, axis, packed) per weight.
COPIES = {"w1": ("mxfp4", 0, True), "w2": ("mxfp8", 1, False)}


def mesh_of(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(devices), ("data",))


def _initial_params() -> dict:
    rng = np.random.default_rng(0)
    return {
        "w1": (rng.standard_normal((K, H)) / 16).astype(np.float32),
        "w2": (rng.standard_normal((H, K)) / 16).astype(np.float32),
    }


def _batch(step: int) -> np.ndarray:
    return np.random.default_rng([1, step]).standard_normal((BATCH, K)).astype(np.float32)


def _loss(params, x):
    h = jax.nn.relu(jaxmx.dot_general(x, params["w1"], DN, config=CONFIG))
    y = jaxmx.dot_general(h, params["w2"], DN, config=CONFIG)
    return jnp.mean((y - x) ** 2)


def _copies(params) -> dict:
    return {
        k: jaxmx.quantize(params[k], fmt, axis=axis, packed=packed)
        for k, (fmt, axis, packed) in COPIES.items()
    }


@functools.cache
def optimizer() -> optax.GradientTransformation:
    # Imported and made on first use: importing jaxmx.optax starts JAX's
    # backend, and a process of a multi-process run must join the run first.
    import jaxmx.optax

    return jaxmx.optax.compress_state(optax.adamw(1e-2), "mxfp8")


class Run:
    """The jitted step and the state layout on one mesh."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        params = _initial_params()
        abstract = {
            "params": jax.eval_shape(lambda: params),
            "opt": jax.eval_shape(optimizer().init, params),
            "mx": jax.eval_shape(_copies, params),
        }
        self.shardings = jaxmx.fsdp_shardings(abstract, mesh)
        self.abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract,
            self.shardings,
        )
        self.batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

        def step(state, x):
            grads = jax.grad(_loss)(state["params"], x)
            updates, opt = optimizer().update(grads, state["opt"], state["params"])
            new = optax.apply_updates(state["params"], updates)
            return {"params": new, "opt": opt, "mx": _copies(new)}

        self._step = jax.jit(step, out_shardings=self.shardings)
        put = par.Parallel(mesh).put
        p = put(params, self.shardings["params"])
        with jax.set_mesh(mesh):
            opt = jax.jit(optimizer().init, out_shardings=self.shardings["opt"])(p)
            mx = jax.jit(_copies, out_shardings=self.shardings["mx"])(p)
        self.initial = {"params": p, "opt": opt, "mx": mx}

    def step(self, state, i: int):
        x = par.Parallel(self.mesh).put(_batch(i), self.batch_sharding)
        with jax.set_mesh(self.mesh):
            return self._step(state, x)

    def train(self, state, start: int, stop: int):
        for i in range(start, stop):
            state = self.step(state, i)
        return state

    def save(self, path, state) -> None:
        # jaxmx.save takes dicts, lists and MXTensor / array leaves: the
        # compressed optimizer state goes as the list of its leaves.
        tree = {**state, "opt": jax.tree.leaves(state["opt"])}
        jaxmx.save(path, tree)

    def load(self, path):
        target = {**self.abstract, "opt": jax.tree.leaves(self.abstract["opt"])}
        tree = jaxmx.load(path, target=target)
        opt = jax.tree.unflatten(jax.tree.structure(self.abstract["opt"]), tree["opt"])
        return {**tree, "opt": opt}


def bits(state) -> dict:
    """Every leaf of ``state`` as the unsigned integers of its bits, whole, on the host."""

    def one(a):
        a = np.asarray(a)
        carrier = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
        return a.view(carrier)

    gathered = par.to_host(state)
    return {
        jax.tree_util.keystr(p): one(a) for p, a in jax.tree_util.tree_leaves_with_path(gathered)
    }


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def save_and_resume(run: Run, path) -> dict:
    """Trains 2 steps, saves, trains 2 more; restores the save and trains the
    same 2 steps again. Returns the bits after step 2 and whether the resumed
    run ended bit for bit where the uninterrupted one did."""
    state2 = run.train(run.initial, 0, 2)
    run.save(path, state2)
    state4 = run.train(state2, 2, 4)
    restored = run.load(path)
    resumed = run.train(restored, 2, 4)
    after2 = bits(state2)
    return {
        "after2": after2,
        "restored_equal": same_bits(bits(restored), after2),
        "resumed_equal": same_bits(bits(resumed), bits(state4)),
        "trained": not same_bits(after2, bits(run.initial)),
    }


def main(load_dir: str, save_dir: str, out: str) -> None:
    par.initialize_from_env()
    run = Run(mesh_of())
    restored = bits(run.load(load_dir))
    result = save_and_resume(run, save_dir)
    if par.is_main_process():
        flags = {k: np.array(result[k]) for k in ("restored_equal", "resumed_equal", "trained")}
        np.savez(
            out,
            **{f"restored{k}": v for k, v in restored.items()},
            **{f"after2{k}": v for k, v in result["after2"].items()},
            **flags,
        )
        print(f"process 0 of {jax.process_count()}: { ({k: bool(v) for k, v in flags.items()}) }")


if __name__ == "__main__":
    main(*sys.argv[1:4])
