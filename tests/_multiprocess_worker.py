"""One run of tests/test_multiprocess.py: the tiny char-GPT trained by the shared loop.

Run as a script by examples/launch.py (each process of a multi-process run)
it trains on the mesh of every device of every process and process 0
writes the per-step losses and the final parameters to ``<out>/result.npz``.
Imported, :func:`train_run` is the same run on a mesh of given devices in
this process, and :func:`gradients` the reference quantities for the
test's bounds.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make `examples`, `models`, `tests` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax
import numpy as np

from examples import parallel as par
from examples import train_lm, training
from examples.data import CharDataset

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. " * 40
STEPS = 2
RECIPE = "mxfp8"
# Width 128: every matmul weight has an axis of 4 devices x 32, so FSDP cuts
# them all; a batch of 8 gives each of the 4 devices 2 sequences.
ARGV = [
    "--quick",
    "--width", "128",
    "--context", "16",
    "--batch-size", "8",
    "--steps", str(STEPS),
    "--warmup-steps", "1",
    "--eval-batches", "1",
    "--recipes", RECIPE,
    "--no-progress",
]  # fmt: skip
# No global-norm clipping: each parameter's update is then a function of its
# own gradients alone, which the test's bound propagates.
GRAD_CLIP = 0.0


def setup():
    """The model, host parameters, batches and loop settings, as train_lm builds them."""
    from examples import study

    args = train_lm.parse_args(ARGV)
    model, params, train_batch, eval_batches, _ = train_lm.build(args, CharDataset.from_text(TEXT))
    config = dataclasses.replace(study.train_config_from_args(args), grad_clip=GRAD_CLIP)
    return model, jax.tree.map(np.asarray, params), train_batch, eval_batches, config


def apply_fn_for(model, fsdp_axis: str | None):
    from examples import study

    return study.get_recipe(RECIPE)(model, fsdp=fsdp_axis)


def train_run(parallel: par.Parallel) -> dict:
    """Trains STEPS steps on ``parallel``'s mesh; every process returns the
    losses and the whole final parameters (host arrays)."""
    model, params, train_batch, eval_batches, config = setup()
    losses = []
    result = training.train(
        apply_fn_for(model, parallel.axis if parallel.fsdp else None),
        params,
        train_batch,
        eval_batches,
        config,
        progress=False,
        on_step=lambda step, loss: losses.append(loss),
        parallel=parallel,
    )
    flat = jax.tree_util.tree_leaves_with_path(parallel.gather(result.params))
    return {
        "losses": np.array(losses, np.float64),
        **{jax.tree_util.keystr(p): np.asarray(v) for p, v in flat},
    }


def gradients(parallel: par.Parallel) -> dict:
    """At the initial parameters, for batches 0 and 1: the loss gradient on
    ``parallel``'s mesh, and sum over devices of |each device's share| (the
    gradient of its slice of the batch, taken alone on one device)."""
    model, params, train_batch, _, config = setup()
    fsdp_fn = apply_fn_for(model, parallel.axis if parallel.fsdp else None)
    plain_fn = apply_fn_for(model, None)

    def loss(apply_fn, p, x, y, wrap=None):
        p = p if wrap is None else wrap(p)
        return training.cross_entropy(apply_fn(p, x, train=True), y)

    mesh_grad = jax.jit(jax.grad(lambda p, x, y: loss(fsdp_fn, p, x, y, parallel.for_model)))
    slice_grad = jax.jit(jax.vmap(jax.grad(lambda p, x, y: loss(plain_fn, p, x, y)), (None, 0, 0)))
    n = parallel.size
    placed = parallel.put(params)
    out = {}
    for b in range(2):
        x, y = train_batch(b)
        with jax.set_mesh(parallel.mesh):
            g = mesh_grad(placed, parallel.put_batch(x), parallel.put_batch(y))
        shape = (n, x.shape[0] // n, *x.shape[1:])
        parts = slice_grad(params, x.reshape(shape), y.reshape(shape))
        g = jax.tree_util.tree_leaves_with_path(parallel.gather(g))
        parts = jax.tree.leaves(parts)
        for (path, gi), pi in zip(g, parts, strict=True):
            key = jax.tree_util.keystr(path)
            out[f"g{b}{key}"] = np.asarray(gi, np.float64)
            # Each device's share of the mean over the whole batch: 1/n of its slice's mean.
            out[f"s{b}{key}"] = np.abs(np.asarray(pi, np.float64) / n).sum(axis=0)
    out["params"] = params
    out["config"] = config
    return out


def main(out: str) -> None:
    par.initialize_from_env()
    result = train_run(par.Parallel.over_devices(fsdp=True))
    if par.is_main_process():
        pathlib.Path(out).mkdir(parents=True, exist_ok=True)
        np.savez(pathlib.Path(out) / "result.npz", **result)
        print(f"process 0 of {jax.process_count()}: losses {result['losses'].tolist()}")


if __name__ == "__main__":
    main(sys.argv[1])
