"""Slow: the jaxmx.optax example studies run end to end (``make test-slow``).

Reduced scale: they check that every variant trains, that the tables carry
what the README reports, and the DropBack budget, not the final accuracies.
"""

from __future__ import annotations

import pytest

from examples import data, dropback_fashion_mnist, optax_lm

pytestmark = pytest.mark.slow


def test_dropback_study_keeps_the_budget(tmp_path):
    if not (data.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST missing: {data.FASHION_MNIST_APT}")
    rows = dropback_fashion_mnist.main(
        [
            "--quick",
            "--variants",
            "fp32,dropback_10x,procrustes_10x",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    by = {r["variant"]: r for r in rows}
    assert by["dropback_10x"]["tracked"] == by["dropback_10x"]["budget"]
    # Only tracked weights (and the few that dropped out in the last step) left their init.
    assert by["dropback_10x"]["changed_from_init"] <= 1.01 * by["dropback_10x"]["tracked"]
    assert by["dropback_10x"]["state_bytes"] <= 40
    assert by["fp32"]["test_accuracy"] > 0.5 and by["procrustes_10x"]["test_accuracy"] > 0.5
    assert (tmp_path / "table.md").exists()
    # The seed summary reads the same runs back: one run per variant, gaps to this FP32.
    summary = {r["variant"]: r for r in dropback_fashion_mnist.summarize([str(tmp_path)])}
    gap = 100 * (by["dropback_10x"]["test_accuracy"] - by["fp32"]["test_accuracy"])
    assert summary["dropback_10x"]["gap_mean"] == pytest.approx(gap)
    assert summary["fp32"]["gap_mean"] == 0.0


def test_optimizer_study_runs_every_variant(tmp_path):
    variants = "fp32,8bit,4bit,mxfp8_mu,bf16_params_nearest,bf16_params_stochastic"
    rows = optax_lm.main(
        [
            "--quick",
            "--variants",
            variants,
            "--recipes",
            "fp32",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    by = {r["variant"]: r for r in rows}
    assert by["fp32"]["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)
    assert by["8bit"]["state_bytes_per_param"] < by["fp32"]["state_bytes_per_param"]
    for r in rows:
        assert r["val_loss"] < 1.1 * by["fp32"]["val_loss"], r
    summary = {r["run"]: r for r in optax_lm.summarize([str(tmp_path)])}
    assert summary["fp32-8bit"]["gap_same_recipe_mean_pct"] == pytest.approx(
        by["8bit"]["gap_same_recipe_pct"]
    )
