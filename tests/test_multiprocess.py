"""Two processes of two devices train exactly as one process of four devices.

examples/launch.py starts tests/_multiprocess_worker.py as 2 JAX processes
(jax.distributed over gloo) with 2 CPU devices each; it trains the tiny
char-GPT of examples/train_lm.py for 2 steps through the shared loop
(examples/training.py) under MXFP8, data parallel with fully-sharded
parameters (the quantized dot gathers each weight as MX codes and scales).
The same run on a mesh of 4 devices of this process is the reference. Both
are the same SPMD program on the same 4-device mesh: every device computes
the same values from the same inputs; only the collectives that *add*
across devices may add in another order (gloo's against XLA's in-process
ones). The tolerances follow from that, with n = 4 devices and u = 2^-24:

* A float32 sum of n terms t_d, in any order, lies within (n-1) u sum|t_d|
  of the exact sum (to first order), so two orders differ by at most
  d = 2 (n-1) u sum_d |t_d|.
* Loss of step 1 and of step 2: both are taken at the initial parameters
  (warmup starts the learning rate at 0, checked, so step 1's update is
  exactly zero in both runs), and each is a sum of 4 positive per-device
  partial sums: |delta| <= 2 (n-1) u loss.
* Gradients at the initial parameters, for batches 0 and 1: per element
  d_b = 2 (n-1) u S_b, where S_b sums |each device's share| (the gradient of
  its slice of the batch, computed on one device).
* Parameters after step 2: p2 = p0 - lr1 (r + wd p0), r = m^/(sqrt(v^) + eps)
  of AdamW after two steps, a function of the two gradients of each element
  alone (no global-norm clipping in this run). The bound propagates d_0 and
  d_1 through r: twice the largest change of r over the corners of the box
  g_b +- d_b (first order, doubled for the remainder) where the box is small
  (d_b < 1e-3 |g|); elsewhere the bound 2 R that no change of the
  gradients can exceed (|r| <= R by Cauchy-Schwarz); plus the float32
  rounding of the update in each run (a few ulps of each term).

Measured on a loaded 2-core machine this test takes about two minutes (three
processes each compile the MX training step of the GPT), so it is marked
slow; the checkpoint test below takes about 40 seconds.

The test fails if a process gets the wrong slice of a batch, a weight is
gathered wrongly, or the gradients are not summed over every device: each
of those moves the loss or the parameters by far more than these bounds.
"""

from __future__ import annotations

import pathlib
import sys
import threading

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples import launch, training  # noqa: E402
from examples.parallel import Parallel  # noqa: E402
from tests import _multiprocess_worker as worker  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (CPU) devices")

U = 2.0**-24
N = 4  # devices in both runs
TIMEOUT_S = 300


def _adam_r(g0, g1, b1, b2, eps):
    """AdamW's m^/(sqrt(v^) + eps) after two steps with gradients g0, g1 (float64)."""
    m = (1 - b1) * (b1 * g0 + g1)
    v = (1 - b2) * (b2 * g0 * g0 + g1 * g1)
    return (m / (1 - b1**2)) / (np.sqrt(v / (1 - b2**2)) + eps)


def _r_bound(g0, g1, d0, d1, b1, b2, eps):
    """How far r can move when g0, g1 move by at most d0, d1 (elementwise)."""
    r = _adam_r(g0, g1, b1, b2, eps)
    corners = [
        np.abs(_adam_r(g0 + s0 * d0, g1 + s1 * d1, b1, b2, eps) - r)
        for s0 in (-1, 1)
        for s1 in (-1, 1)
    ]
    first_order = 2 * np.max(corners, axis=0)
    # |m^| <= R sqrt(v^) for every g: m^ = a0 g0 + a1 g1, v^ = c0 g0^2 + c1 g1^2.
    a0, a1 = (1 - b1) * b1 / (1 - b1**2), (1 - b1) / (1 - b1**2)
    c0, c1 = (1 - b2) * b2 / (1 - b2**2), (1 - b2) / (1 - b2**2)
    R = np.sqrt(a0**2 / c0 + a1**2 / c1)
    small = np.maximum(d0, d1) < 1e-3 * np.maximum(np.abs(g0), np.abs(g1))
    return np.where(small, first_order, 2 * R), r, R


class _Sink:
    """Collects the launcher's prefixed output lines."""

    def __init__(self, log: list):
        self.log = log

    def write(self, text):
        self.log.append(text)

    def flush(self):
        pass


def _launch_workers(out: pathlib.Path, log: list, status: dict) -> None:
    script = str(ROOT / "tests" / "_multiprocess_worker.py")
    status["code"] = launch.launch(
        [script, str(out)], processes=2, devices=2, timeout=TIMEOUT_S, sink=_Sink(log)
    )


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path):
    log, status = [], {}
    # The 2 processes run while this process computes the reference; launch
    # stops both when either fails or after TIMEOUT_S.
    thread = threading.Thread(target=_launch_workers, args=(tmp_path, log, status))
    thread.start()
    try:
        mesh = Parallel.over_devices(jax.devices()[:N], fsdp=True)
        ref = worker.train_run(mesh)
        grads = worker.gradients(mesh)
    finally:
        thread.join(TIMEOUT_S + 30)
    output = "".join(log)
    assert status.get("code") == 0, f"the 2 processes failed:\n{output[-6000:]}"
    assert "process 0 of 2" in output
    got = dict(np.load(tmp_path / "result.npz"))

    # Losses of steps 1 and 2, both at the initial parameters.
    loss_bound = 2 * (N - 1) * U * ref["losses"]
    np.testing.assert_array_less(np.abs(got["losses"] - ref["losses"]), loss_bound + 1e-300)

    config = grads["config"]
    b1, b2, eps, wd = config.b1, config.b2, 1e-8, config.weight_decay
    lr1 = float(training.lr_schedule(config)(1))
    assert float(training.lr_schedule(config)(0)) == 0.0 and lr1 > 0
    p0 = {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(grads["params"])
    }
    assert set(p0) == {k for k in got if k != "losses"} == {k for k in ref if k != "losses"}
    moved = 0
    for key, p in p0.items():
        g0, g1 = grads[f"g0{key}"], grads[f"g1{key}"]
        d0 = 2 * (N - 1) * U * grads[f"s0{key}"]
        d1 = 2 * (N - 1) * U * grads[f"s1{key}"]
        dr, r, R = _r_bound(g0, g1, d0, d1, b1, b2, eps)
        decay = wd * p.astype(np.float64) if p.ndim >= 2 else 0.0
        update = np.abs(r) + np.abs(decay)
        # float32 rounding in each run: of r (about 8 operations, each within u
        # of the magnitudes it combines, which R bounds relative to sqrt(v^)),
        # of adding the decay, and of p0 - lr1 * update.
        rounding = 2 * lr1 * (8 * U * (R + np.abs(r)) + 2 * U * update)
        rounding = rounding + 4 * U * (np.abs(p) + lr1 * update)
        bound = lr1 * dr + rounding
        diff = np.abs(got[key].astype(np.float64) - ref[key].astype(np.float64))
        worst = np.argmax(diff - bound)
        assert (diff <= bound).all(), (
            f"{key}: after 2 steps the 2-process and 1-process parameters differ by "
            f"{diff.flat[worst]:.3g} where the bound is {bound.flat[worst]:.3g}"
        )
        moved += int((ref[key] != p).sum())
    assert moved > 0.5 * sum(p.size for p in p0.values())  # the second step did train


def test_sharded_checkpoints_move_between_meshes(tmp_path):
    """jaxmx.save from 1 x 4 devices restores on 2 x 2, and 2 x 2's on 1 x 4.

    The state (tests/_checkpoint_worker.py) holds float32 parameters, MX
    copies of them (MXFP4 packed, MXFP8) and AdamW moments compressed to
    MXFP8 by jaxmx.optax.compress_state, every leaf cut over the 4 devices.
    On each mesh a run trains 2 steps, saves, trains 2 more, and restores
    its save and trains the same 2 steps again: the restored state must be
    the saved one and the resumed run must end on the uninterrupted run's
    bits. Across meshes a restore must give the saved bits: these are
    copies, no arithmetic.
    """
    from tests import _checkpoint_worker as ck

    one = tmp_path / "from_1x4"
    run = ck.Run(ck.mesh_of(jax.devices()[:N]))
    mine = ck.save_and_resume(run, one)
    assert mine["restored_equal"] and mine["resumed_equal"] and mine["trained"]

    log, status = [], {}
    two, out = tmp_path / "from_2x2", tmp_path / "workers.npz"
    script = str(ROOT / "tests" / "_checkpoint_worker.py")
    status["code"] = launch.launch(
        [script, str(one), str(two), str(out)],
        processes=2,
        devices=2,
        timeout=TIMEOUT_S,
        sink=_Sink(log),
    )
    output = "".join(log)
    assert status["code"] == 0, f"the 2 processes failed:\n{output[-6000:]}"
    theirs = dict(np.load(out))
    assert theirs["restored_equal"] and theirs["resumed_equal"] and theirs["trained"]
    # 1 x 4 -> 2 x 2: the workers restored exactly what this process saved.
    for key, value in mine["after2"].items():
        np.testing.assert_array_equal(theirs[f"restored{key}"], value, err_msg=key)
    # 2 x 2 -> 1 x 4: this process restores exactly what the workers saved.
    back = ck.bits(run.load(two))
    assert back.keys() == mine["after2"].keys()
    for key, value in back.items():
        np.testing.assert_array_equal(value, theirs[f"after2{key}"], err_msg=key)
    # Every kind of leaf was there: MX codes and scales, compressed moments.
    assert any(k.endswith(".data") for k in back) and any(".codes" in k for k in back)
