"""The MX paper's training claim as the model grows: MX gaps to FP32 across sizes.

The Shakespeare char-GPT of ``examples/train_lm.py`` is trained at several
widths (depth 4, head size 32, so every contraction is a multiple of the MX
block) under FP32 and the MX training recipes of :mod:`examples.study`.
Each (size, recipe) run starts from that size's FP32 initial parameters and
sees the same batches; the number of steps per size follows one stated rule
(``--rule``):

* ``tokens`` (the default): every size trains on the same tokens in the same
  order, so the only thing that changes between sizes is the model. Compute
  grows in proportion to the parameters.
* ``params``: tokens in proportion to parameters (the Chinchilla direction,
  Hoffmann et al. 2022), anchored so the ``--anchor`` size gets ``--steps``.
* ``flops``: the same training compute (6 x params x tokens) for every size,
  anchored the same way.

Every run lives in ``<out>/<size>/<recipe>/``: ``config.json`` (what it
trains), orbax checkpoints every ``--checkpoint-every`` steps, the
``metrics.json`` curves, and ``result.json`` once it has finished. Rerunning
the same command skips finished runs and resumes interrupted ones from their
last checkpoint, bit for bit (:mod:`examples.training`). After each run the
table ``<out>/results.json`` and ``<out>/results.csv`` is rewritten.

Usage::

    python examples/scaling_study.py --plan        # time a few steps per size, print the plan
    python examples/scaling_study.py               # run (or resume) the whole study
    python examples/scaling_study.py --jobs 2      # two runs at a time
    python examples/scaling_study.py --jobs 2 --no-timing   # resume without timing first
    python examples/scaling_study.py --report      # table, trends and plot from what exists
    python examples/scaling_study.py --report --publish   # and copy them into docs/
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import fcntl
import functools
import json
import multiprocessing
import os
import pathlib
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: make `models`/`examples` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

from examples import data, study, train_lm, training

REPO = pathlib.Path(__file__).resolve().parent.parent
# Depth 4 throughout: only the width grows, and the head size stays at 32 (one
# MX block), so q.k contracts over exactly one block at every size.
HEAD_DIM = 32
SIZES = {
    f"w{w}": {"depth": 4, "width": w, "heads": w // HEAD_DIM} for w in (32, 64, 96, 128, 192, 256)
}
DEFAULT_SIZES = "w32,w64,w128,w256"
# FP32 first, then each MX training recipe of the MX paper with the OCP floor
# scale rule and with round-up (rceil) scales.
DEFAULT_RECIPES = (
    "fp32,mxfp8,mxfp8_rceil,mxfp6,mxfp6_rceil,mxfp6_e2m3,mxfp6_e2m3_rceil,"
    "mxfp4_weights,mxfp4_weights_rceil"
)
RULES = ("tokens", "params", "flops")
TARGET_GAP = 1.0  # percent: "minimal loss" read as within 1% of FP32
DOCS = REPO / "docs"
DOCS_PAGE = "studies/scaling.md"  # the page, with the report between BEGIN and END
DOCS_JSON = "studies/scaling_results.json"
DOCS_PLOT = "img/scaling_study.png"
BEGIN, END = "<!-- scaling-results:begin -->", "<!-- scaling-results:end -->"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setup:
    """Everything a study's runs share; recorded in each run's configuration.

    >>> Setup().steps_for(215_380, anchor_params=215_380)
    1600
    """

    rule: str = "tokens"  # how steps grow with parameters: one of RULES
    steps: int = 1600  # steps of the anchor size (train_lm's default run)
    anchor: str = "w64"  # the size that gets `steps` steps and `lr` (train_lm's model)
    lr: float = 4e-3  # peak learning rate of the anchor size (tuned for it in train_lm)
    lr_exponent: float = 0.5  # lr = lr * (anchor width / width) ** lr_exponent
    batch_size: int = 32  # sequences per step
    context: int = 64  # characters per sequence
    warmup_steps: int = 100  # capped at a quarter of a run's steps
    eval_every: int = 200  # capped at a run's steps
    eval_batches: int = 32  # 32 x 32 x 64 = 65,536 held-out characters
    checkpoint_every: int = 200  # capped at a run's steps
    seed: int = 0  # init, data and dropout seed

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"Setup.rule must be one of {RULES}, got {self.rule!r}")
        if self.anchor not in SIZES:
            raise ValueError(f"Setup.anchor must be one of {sorted(SIZES)}, got {self.anchor!r}")
        if self.steps < 1 or self.lr <= 0:
            raise ValueError(f"need steps >= 1 and lr > 0, got {self.steps} and {self.lr}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context

    def steps_for(self, params: int, *, anchor_params: int) -> int:
        """Training steps of a model with ``params`` parameters under :attr:`rule`."""
        ratio = {"tokens": 1.0, "params": params / anchor_params, "flops": anchor_params / params}
        return max(1, round(self.steps * ratio[self.rule]))

    def lr_for(self, width: int) -> float:
        """Peak learning rate at ``width``: smaller for wider models."""
        return self.lr * (SIZES[self.anchor]["width"] / width) ** self.lr_exponent


@dataclasses.dataclass(frozen=True)
class Job:
    """One run of the study: a size and a recipe."""

    size: str
    recipe: str

    def folder(self, out: pathlib.Path) -> pathlib.Path:
        return out / self.size / self.recipe


# --- Building and training one run -----------------------------------------


def lm_args(size: str, setup: Setup) -> argparse.Namespace:
    """train_lm's resolved arguments for one size, so the model and data are train_lm's."""
    return argparse.Namespace(
        **SIZES[size],
        context=setup.context,
        batch_size=setup.batch_size,
        eval_batches=setup.eval_batches,
        seed=setup.seed,
        dropout=0.0,
        api="linen",
    )


@functools.lru_cache(maxsize=2)
def _built(size: str, setup: Setup):
    # One model, initial params and data functions per size, shared by its recipes.
    return train_lm.build(lm_args(size, setup), data.load_shakespeare())


@functools.lru_cache(maxsize=16)
def _apply_fn(size: str, setup: Setup, recipe: str):
    # The same function object for a size and recipe, so that a run resumed in
    # the same process reuses its compiled steps (training caches them by it).
    return study.get_recipe(recipe)(_built(size, setup)[0])


@functools.cache
def count_params(size: str, setup: Setup) -> int:
    """Parameters of the model at ``size`` (embeddings and output head included)."""
    import jax

    params = _built(size, setup)[1]
    return int(sum(p.size for p in jax.tree.leaves(params)))


def run_plan(job: Job, setup: Setup) -> dict[str, Any]:
    """Steps, learning rate and training config of one run."""
    params = count_params(job.size, setup)
    steps = setup.steps_for(params, anchor_params=count_params(setup.anchor, setup))
    config = training.TrainConfig(
        steps=steps,
        learning_rate=setup.lr_for(SIZES[job.size]["width"]),
        warmup_steps=min(setup.warmup_steps, steps // 4),
        eval_every=min(setup.eval_every, steps),
        log_every=min(10, steps),
        checkpoint_every=min(setup.checkpoint_every, steps),
        seed=setup.seed,
    )
    return {
        "params": params,
        "steps": steps,
        "tokens": steps * setup.tokens_per_step,
        "train": config,
    }


def run_job(
    job: Job,
    setup: Setup,
    out: str | os.PathLike,
    *,
    on_step: Callable[[int, float], None] | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Trains one (size, recipe) run, or resumes it, and writes its ``result.json``.

    Args:
      job: the size and recipe.
      setup: the study's shared settings.
      out: the study's folder; the run uses ``out/<size>/<recipe>/``.
      on_step: passed to :func:`examples.training.train` (e.g. to stop early).
      log: where progress lines go (None: nowhere).

    Returns:
      The run's result: its plan, final validation loss and timings. A run
      whose ``result.json`` exists is not trained again.

    Raises:
      ValueError: if the folder holds a run of another configuration.
    """
    folder = job.folder(pathlib.Path(out))
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    plan = run_plan(job, setup)
    _, params, train_batch, eval_batches, run_info = _built(job.size, setup)
    config = {
        "size": job.size,
        "recipe": job.recipe,
        "params": plan["params"],
        "steps": plan["steps"],
        "tokens": plan["tokens"],
        "setup": dataclasses.asdict(setup),
        "train": dataclasses.asdict(plan["train"]),
    }
    folder.mkdir(parents=True, exist_ok=True)
    recorded = folder / "config.json"
    if recorded.exists() and json.loads(recorded.read_text()) != config:
        raise ValueError(
            f"{folder} holds a run of another configuration ({recorded}); "
            "use another --out or delete that folder"
        )
    training._write_json(recorded, config)
    apply_fn = _apply_fn(job.size, setup, job.recipe)
    name = f"{job.size}/{job.recipe}"
    first: list[tuple[int, float]] = []  # (step, time) of this invocation's first step

    def report(step: int, loss: float) -> None:
        now = time.perf_counter()
        first[:] = first or [(step, now)]
        if log is not None and (step % plan["train"].eval_every == 0 or step == plan["steps"]):
            rate = (now - first[0][1]) / max(1, step - first[0][0])  # after compiling
            log(f"[{name}] step {step}/{plan['steps']} train loss {loss:.4f} ({rate:.2f} s/step)")
        if on_step is not None:
            on_step(step, loss)

    result = training.train(
        apply_fn,
        params,
        train_batch,
        eval_batches,
        plan["train"],
        out_dir=folder,
        name=name,
        run_info={**run_info, "recipe": job.recipe, "size": job.size, "setup": config["setup"]},
        progress=False,
        on_step=report,
    )
    metrics = result.metrics
    summary = {
        **{k: config[k] for k in ("size", "recipe", "params", "steps", "tokens")},
        "width": SIZES[job.size]["width"],
        "lr": plan["train"].learning_rate,
        "val_loss": metrics["final_eval"]["loss"],
        "val_accuracy": metrics["final_eval"]["accuracy"],
        "eval": metrics["eval"],
        "step_time_ms_median": metrics["step_time_ms_median"],
        "total_time_s": metrics["total_time_s"],
    }
    training._write_json(done, summary)
    if log is not None:
        log(f"[{name}] done: val loss {summary['val_loss']:.4f}")
    return summary


# --- The study: jobs in order, one or two at a time ----------------------------


def jobs_for(sizes: Sequence[str], recipes: Sequence[str]) -> list[Job]:
    """Every (size, recipe), smallest size first, so each size completes before the next."""
    return [Job(size, recipe) for size in sizes for recipe in recipes]


_PARENT = None


def _worker_init(parent: int) -> None:
    global _PARENT
    _PARENT = parent


class _Orphaned(Exception):
    """The study process is gone: this worker stops (its run resumes next time)."""


def _check_parent(step: int = 0, loss: float = 0.0) -> None:
    if _PARENT is not None and os.getppid() != _PARENT:
        raise _Orphaned(step)


def _worker(job: Job, setup: Setup, out: str) -> dict[str, Any]:
    try:
        _check_parent()
        return run_job(job, setup, out, on_step=_check_parent, log=lambda s: print(s, flush=True))
    except _Orphaned as stop:
        # train() has closed its checkpoints on the way out; leave at once
        # rather than take the next queued run.
        print(f"[{job.size}/{job.recipe}] the study process is gone; stopped at step {stop}")
        sys.stdout.flush()
        os._exit(0)


def run_study(
    jobs: Sequence[Job], setup: Setup, out: str | os.PathLike, *, workers: int = 1
) -> list[dict[str, Any]]:
    """Runs every job not finished yet (``workers`` at a time) and rewrites the table.

    Only one study may run in a folder at a time (a lock file says which).
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another study is running in {out} (it holds {out}/lock)") from None
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        todo = [j for j in jobs if not (j.folder(out) / "result.json").exists()]
        print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already finished", flush=True)
        failed: list[Job] = []
        if workers == 1:
            for job in todo:
                run_job(job, setup, out, log=lambda s: print(s, flush=True))
                write_table(collect(out, jobs), out)
        else:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=context, initializer=_worker_init, initargs=(os.getpid(),)
            ) as pool:
                futures = {pool.submit(_worker, job, setup, str(out)): job for job in todo}
                for future in concurrent.futures.as_completed(futures):
                    # A failed run is reported and the others go on; rerunning
                    # the study retries it from its last checkpoint.
                    if future.exception() is not None:
                        failed.append(futures[future])
                        print(f"[{futures[future]}] failed: {future.exception()!r}", flush=True)
                    write_table(collect(out, jobs), out)
        table = collect(out, jobs)
        write_table(table, out)
        if failed:
            raise RuntimeError(f"{len(failed)} runs failed (see the log above): {failed}")
        return table["results"]


# --- Timing plan ----------------------------------------------------------------


def measure(size: str, recipe: str, setup: Setup, steps: int = 3) -> float:
    """Seconds per training step at ``size`` under ``recipe`` (after compiling)."""
    import jax.numpy as jnp

    model, params, train_batch, _, _ = _built(size, setup)
    config = training.TrainConfig(steps=10, warmup_steps=1)
    optimizer = training.make_optimizer(config)
    step = training.make_train_step(study.get_recipe(recipe)(model), optimizer, setup.seed)
    p, s = training._commit(params), training._commit(optimizer.init(params))
    x, y = (jnp.asarray(a) for a in train_batch(0))
    p, s, loss = step(p, s, x, y, jnp.int32(0))
    float(loss)
    t0 = time.perf_counter()
    for i in range(steps):
        p, s, loss = step(p, s, x, y, jnp.int32(i + 1))
        float(loss)
    return (time.perf_counter() - t0) / steps


def plan_table(
    sizes: Sequence[str], recipes: Sequence[str], setup: Setup, workers: int, timing: Mapping
) -> str:
    """The plan: per size its params, steps, tokens per parameter, lr and estimated hours."""
    lines = [
        f"rule: {setup.rule}; anchor {setup.anchor} at {setup.steps} steps of "
        f"{setup.tokens_per_step} tokens; {len(recipes)} recipes",
        f"{'size':<6}{'params':>11}{'steps':>8}{'tok/param':>11}{'lr':>9}"
        f"{'s/step fp32':>13}{'s/step mx':>11}{'hours':>8}",
    ]
    total = 0.0
    for size in sizes:
        plan = run_plan(Job(size, "fp32"), setup)
        t_fp32, t_mx = timing[size]
        hours = plan["steps"] * (t_fp32 + (len(recipes) - 1) * t_mx) * 1.08 / 3600  # + evals
        total += hours
        lines.append(
            f"{size:<6}{plan['params']:>11,}{plan['steps']:>8}"
            f"{plan['tokens'] / plan['params']:>11.1f}{plan['train'].learning_rate:>9.2e}"
            f"{t_fp32:>13.3f}{t_mx:>11.3f}{hours:>8.2f}"
        )
    lines.append(
        f"estimated total: {total:.1f} h of one-run-at-a-time time at the measured rates "
        f"(--jobs {workers} shares the cores; measure both before relying on it)"
    )
    return "\n".join(lines)


# --- Results table, trends, plot ----------------------------------------------------


def _progress(folder: pathlib.Path) -> int | None:
    metrics = folder / "metrics.json"
    if not metrics.exists():
        return None
    evals = json.loads(metrics.read_text()).get("eval") or [{"step": 0}]
    return evals[-1]["step"]


def collect(out: str | os.PathLike, jobs: Sequence[Job] | None = None) -> dict[str, Any]:
    """Reads every finished run under ``out``; lists the expected ones that are missing.

    Args:
      out: the study's folder.
      jobs: the runs expected; None: those found on disk.

    Returns:
      ``{"results": [...], "missing": [...]}``; a missing run records how far
      it got (``step``: the last evaluated step, None if it never started).
    """
    out = pathlib.Path(out)
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/*/result.json"))]
    have = {(r["size"], r["recipe"]) for r in results}
    if jobs is None:
        jobs = [Job(p.parent.parent.name, p.parent.name) for p in out.glob("*/*/config.json")]
    missing = []
    for job in jobs:
        if (job.size, job.recipe) not in have:
            missing.append(
                {"size": job.size, "recipe": job.recipe, "step": _progress(job.folder(out))}
            )
    return {"results": results, "missing": missing}


def write_table(table: Mapping[str, Any], out: str | os.PathLike) -> None:
    """Writes ``results.json`` (everything) and ``results.csv`` (one row per run)."""
    out = pathlib.Path(out)
    training._write_json(out / "results.json", dict(table))
    keys = ("size", "recipe", "params", "steps", "tokens", "lr", "val_loss", "step_time_ms_median")
    with open(out / "results.csv.tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        for r in table["results"]:
            writer.writerow([r[k] for k in keys])
    os.replace(out / "results.csv.tmp", out / "results.csv")


def gaps(results: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Per MX recipe, ``(params, gap to FP32 in %)`` at every size where both finished."""
    ref = {r["size"]: r["val_loss"] for r in results if r["recipe"] == "fp32"}
    out: dict[str, list[tuple[int, float]]] = {}
    for r in sorted(results, key=lambda r: r["params"]):
        if r["recipe"] != "fp32" and r["size"] in ref:
            gap = 100 * (r["val_loss"] - ref[r["size"]]) / ref[r["size"]]
            out.setdefault(r["recipe"], []).append((r["params"], gap))
    return out


def fmt_params(n: float) -> str:
    """A parameter count in two significant digits.

    >>> fmt_params(214_996), fmt_params(1.07e7), fmt_params(3.2e10)
    ('210K', '11M', '32B')
    """
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{float(f'{n / scale:.2g}'):g}{unit}"
    return f"{n:.2g}"


def fit_trend(points: Sequence[tuple[int, float]], target: float = TARGET_GAP) -> dict[str, Any]:
    """Fits ``gap = a + b * log10(params)`` and says where it would reach ``target`` %.

    Returns:
      ``a``, ``b`` (points of gap per 10x parameters), ``b_se`` (its
      standard error; None below three sizes), ``trend`` (``shrinks``,
      ``grows`` or ``flat``: the slope is more than two standard errors from
      zero, or not), ``reach`` (parameters where the fitted gap equals
      ``target``; None when it never does) and ``reach_text``.

    >>> fit = fit_trend([(1e5, 4.0), (1e6, 3.0), (1e7, 2.0)])
    >>> round(fit["b"], 6), fit["trend"], f"{fit['reach']:.3g}"
    (-1.0, 'shrinks', '1e+08')
    """
    if len(points) < 2:
        return {
            "a": None,
            "b": None,
            "b_se": None,
            "trend": "one size",
            "reach": None,
            "reach_text": "needs two sizes",
        }
    x = np.log10([p for p, _ in points])
    y = np.array([g for _, g in points])
    b, a = np.polyfit(x, y, 1)
    se = None
    if len(points) > 2:
        resid = y - (a + b * x)
        se = float(np.sqrt(resid @ resid / (len(x) - 2) / ((x - x.mean()) ** 2).sum()))
    if se is None:
        trend = "shrinks" if b < 0 else "grows"
    else:
        trend = "shrinks" if b < -2 * se else "grows" if b > 2 * se else "flat"
    top = a + b * x.max()
    reach, text = None, f"does not reach {target:g}%"
    if b < 0:
        reach = float(10 ** ((target - a) / b))
        if top > target:
            text = f"reaches {target:g}% at about {fmt_params(reach)} params (extrapolated)"
        elif reach >= 10 ** x.min():
            text = f"within {target:g}% from about {fmt_params(reach)} params (measured range)"
        else:
            text = f"within {target:g}% at every size measured"
    elif top <= target:
        text = f"within {target:g}% but not shrinking"
    return {
        "a": float(a),
        "b": float(b),
        "b_se": se,
        "trend": trend,
        "reach": reach,
        "reach_text": text,
    }


def report(table: Mapping[str, Any], recipes: Sequence[str] | None = None) -> dict[str, Any]:
    """The study's findings from the collected runs: the table rows, fits and missing runs."""
    results = table["results"]
    if recipes is None:
        seen = {r["recipe"] for r in results} | {m["recipe"] for m in table["missing"]}
        recipes = [r for r in study.RECIPES if r in seen]
    by_size: dict[str, dict[str, Any]] = {}
    for r in sorted(results, key=lambda r: r["params"]):
        row = by_size.setdefault(
            r["size"],
            {
                "size": r["size"],
                "params": r["params"],
                "steps": r["steps"],
                "tokens": r["tokens"],
                "lr": r["lr"],
                "loss": {},
            },
        )
        row["loss"][r["recipe"]] = r["val_loss"]
    fits = {name: fit_trend(points) for name, points in gaps(results).items()}
    return {
        "recipes": list(recipes),
        "rows": list(by_size.values()),
        "fits": fits,
        "missing": list(table["missing"]),
        "results": results,
    }


def format_report(rep: Mapping[str, Any]) -> str:
    """The report as Markdown: the table, one line per recipe's trend, the missing runs."""
    recipes = rep["recipes"]
    mx = [r for r in recipes if r != "fp32"]
    head = ["size", "params", "steps", "tokens/param", "peak lr", "FP32 val loss"]
    lines = [
        "| " + " | ".join(head + mx) + " |",
        "|" + "---|" * (len(head) + len(mx)),
    ]
    for row in rep["rows"]:
        ref = row["loss"].get("fp32")
        cells = [
            row["size"],
            f"{row['params']:,}",
            str(row["steps"]),
            f"{row['tokens'] / row['params']:.1f}",
            f"{row['lr']:.2g}",
            f"{ref:.4f}" if ref is not None else "-",
        ]
        for name in mx:
            loss = row["loss"].get(name)
            if loss is None:
                cells.append("-")
            elif ref is None:
                cells.append(f"{loss:.4f}")
            else:
                cells.append(f"{loss:.4f} ({100 * (loss - ref) / ref:+.2f}%)")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each MX cell: final validation loss (nats/char) and its gap to FP32 at that size.",
        "",
        "| recipe | sizes | gap at smallest | gap at largest | fitted change per 10x params "
        "| trend | where the fitted gap reaches 1% |",
        "|---|---|---|---|---|---|---|",
    ]
    points = gaps(rep["results"])
    for name in mx:
        if name not in rep["fits"]:
            lines.append(f"| {name} | 0 | - | - | - | no data | - |")
            continue
        fit, pts = rep["fits"][name], points[name]
        slope = "-" if fit["b"] is None else f"{fit['b']:+.2f} points"
        if fit["b_se"] is not None:
            slope += f" ± {fit['b_se']:.2f}"
        lines.append(
            f"| {name} | {len(pts)} | {pts[0][1]:+.2f}% | {pts[-1][1]:+.2f}% | {slope} "
            f"| {fit['trend']} | {fit['reach_text']} |"
        )
    fits = [f for f in rep["fits"].values() if f["b"] is not None]
    if fits:
        shrink = sum(f["trend"] == "shrinks" for f in fits)
        lines += [
            "",
            f"The gap to FP32 shrinks with size for {shrink} of {len(fits)} MX recipes "
            "(fitted slope in log10 parameters more than two standard errors below zero"
            + (
                ", or below zero where only two sizes exist"
                if any(f["b_se"] is None for f in fits)
                else ""
            )
            + ").",
        ]
    if rep["missing"]:
        lines += ["", describe_missing(rep["missing"], rep["results"])]
    else:
        lines += ["", "Every planned run has finished."]
    return "\n".join(lines)


def describe_missing(missing: Sequence[Mapping[str, Any]], results: Sequence[Mapping]) -> str:
    """One sentence on the runs not finished: those under way, then those not started.

    >>> print(describe_missing([{"size": "w32", "recipe": "mxfp6", "step": 200},
    ...     {"size": "w32", "recipe": "mxfp8", "step": None},
    ...     {"size": "w64", "recipe": "fp32", "step": None}], [{"size": "w32"}]))
    Missing runs: 3 of 4. Under way: w32/mxfp6 (at step 200).
    Not started: w32/mxfp8; every run of w64.
    """
    text = f"Missing runs: {len(missing)} of {len(missing) + len(results)}."
    going = [f"{m['size']}/{m['recipe']} (at step {m['step']})" for m in missing if m["step"]]
    if going:
        text += " Under way: " + ", ".join(going) + "."
    busy = {r["size"] for r in results} | {m["size"] for m in missing if m["step"]}
    parts, whole = [], []
    for size in dict.fromkeys(m["size"] for m in missing):
        names = [m["recipe"] for m in missing if m["size"] == size and not m["step"]]
        if names and size not in busy:
            whole.append(size)
        elif names:
            parts.append(", ".join(f"{size}/{n}" for n in names))
    if whole:
        parts.append("every run of " + ", ".join(whole))
    if parts:
        text += " Not started: " + "; ".join(parts) + "."
    return text


_COLORS = {"mxfp8": "C0", "mxfp6": "C1", "mxfp6_e2m3": "C2", "mxfp4_weights": "C3", "mxfp4": "C4"}


def plot_report(rep: Mapping[str, Any], path: str | os.PathLike) -> pathlib.Path:
    """Validation loss and gap to FP32 against parameters (log x), fitted trends dashed."""
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, gap_ax = fig.subplots(1, 2)
    points = gaps(rep["results"])
    for i, name in enumerate(rep["recipes"]):
        base = name.removesuffix("_rceil")
        color = "black" if name == "fp32" else _COLORS.get(base, f"C{5 + i % 5}")
        marker, style = ("s", "--") if name.endswith("_rceil") else ("o", "-")
        runs = sorted((r for r in rep["results"] if r["recipe"] == name), key=lambda r: r["params"])
        if runs:
            loss_ax.plot(
                [r["params"] for r in runs],
                [r["val_loss"] for r in runs],
                style,
                marker=marker,
                color=color,
                label=name,
            )
        if name in points:
            xs = np.array([p for p, _ in points[name]], dtype=float)
            gap_ax.plot(
                xs,
                [g for _, g in points[name]],
                marker,
                color=color,
                fillstyle="none" if name.endswith("_rceil") else "full",
            )
            fit = rep["fits"][name]
            if fit["b"] is not None:
                grid = np.geomspace(xs.min(), xs.max(), 50)
                gap_ax.plot(grid, fit["a"] + fit["b"] * np.log10(grid), style, color=color)
    gap_ax.axhline(TARGET_GAP, color="gray", linestyle=":", label=f"{TARGET_GAP:g}% gap")
    gap_ax.axhline(0, color="black", linewidth=0.8)
    for ax in (loss_ax, gap_ax):
        ax.set_xscale("log")
        ax.set_xlabel("parameters (log scale)")
        ax.grid(alpha=0.3, which="both")
    loss_ax.set_ylabel("final validation loss (nats/char)")
    loss_ax.set_title("validation loss")
    # Gaps run from a few tenths of a percent to tens of percent: a symmetric
    # log scale (linear within +-1%) keeps both readable.
    gap_ax.set_yscale("symlog", linthresh=TARGET_GAP)
    values = [g for pts in points.values() for _, g in pts] or [0.0]
    low, high = min(0.0, min(values)) - 0.5, max(2.0, 1.3 * max(values))
    gap_ax.set_ylim(low, high)
    ticks = (-20, -10, -5, -2, -1, -0.5, 0, 0.5, 1, 2, 5, 10, 20, 50, 100, 200)
    gap_ax.set_yticks([t for t in ticks if low <= t <= high])
    gap_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    gap_ax.yaxis.set_minor_locator(NullLocator())
    gap_ax.set_ylabel("gap to FP32 validation loss (%, symmetric log scale)")
    gap_ax.set_title("gap to FP32 (lines: fitted a + b log10 params)")
    fig.legend(loc="outside right upper", title="recipe (square: rceil)")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def publish(rep: Mapping[str, Any], text: str, docs: str | os.PathLike = DOCS) -> None:
    """Copies the table, the plot and the report into ``docs``.

    Writes ``studies/scaling_results.json`` and ``img/scaling_study.png``, and
    replaces the text between the markers of ``studies/scaling.md``.
    """
    docs = pathlib.Path(docs)
    payload = {k: rep[k] for k in ("recipes", "rows", "fits", "missing", "results")}
    (docs / DOCS_JSON).write_text(json.dumps(payload, indent=1) + "\n")
    plot_report(rep, docs / DOCS_PLOT)
    page = docs / DOCS_PAGE
    source = page.read_text()
    if BEGIN not in source or END not in source:
        raise ValueError(f"{page} lacks the markers {BEGIN} and {END}")
    figure = f"![Gap to FP32 against parameters](../{DOCS_PLOT})"
    block = f"{BEGIN}\n{text}\n\n{figure}\n{END}"
    page.write_text(
        re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, source, flags=re.S)
    )


# --- Command line -------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"from {', '.join(SIZES)}")
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help="from examples/study.py")
    parser.add_argument("--rule", choices=RULES, default=Setup.rule, help="steps per size")
    parser.add_argument("--steps", type=int, default=Setup.steps, help="steps of --anchor")
    parser.add_argument("--anchor", default=Setup.anchor, help="the size the rule starts from")
    parser.add_argument("--lr", type=float, default=Setup.lr, help="peak lr of --anchor")
    parser.add_argument(
        "--lr-exponent",
        type=float,
        default=Setup.lr_exponent,
        help="lr scales as (anchor width / width) ** this",
    )
    parser.add_argument(
        "--batch-size", type=int, default=Setup.batch_size, help="sequences per step"
    )
    parser.add_argument(
        "--context", type=int, default=Setup.context, help="characters per sequence"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=Setup.checkpoint_every,
        help="steps between checkpoints of a run",
    )
    parser.add_argument("--seed", type=int, default=Setup.seed, help="initial weights and batches")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (processes)")
    parser.add_argument("--out", default="runs/scaling", help="the study's folder")
    parser.add_argument("--plan", action="store_true", help="time each size, print the plan")
    parser.add_argument(
        "--no-timing", action="store_true", help="start (or resume) without timing each size first"
    )
    parser.add_argument("--report", action="store_true", help="report what has finished")
    parser.add_argument("--publish", action="store_true", help="with --report: write docs/")
    args = parser.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown or not args.sizes:
        parser.error(f"unknown sizes {unknown}; known: {', '.join(SIZES)}")
    args.recipes = study.parse_recipes(args.recipes)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.publish and not args.report:
        parser.error("--publish goes with --report")
    return args


def setup_from_args(args: argparse.Namespace) -> Setup:
    """The study's settings from the flags; a setting without a flag keeps its default."""
    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(Setup) if hasattr(args, f.name)
    }
    return Setup(**given)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    setup = setup_from_args(args)
    jobs = jobs_for(args.sizes, args.recipes)
    out = pathlib.Path(args.out)
    if args.report:
        rep = report(collect(out, jobs), args.recipes)
        text = format_report(rep)
        plot = plot_report(rep, out / "scaling.png")
        print(text)
        print(f"\nplot: {plot}")
        if args.publish:
            publish(rep, text)
            print(f"published in {DOCS}: {DOCS_PAGE}, {DOCS_JSON}, {DOCS_PLOT}")
        return rep
    if args.plan or not args.no_timing:
        mx = next((r for r in args.recipes if r != "fp32"), "fp32")
        timing = {}
        for size in args.sizes:
            timing[size] = (measure(size, "fp32", setup), measure(size, mx, setup))
        print(plan_table(args.sizes, args.recipes, setup, args.jobs, timing), flush=True)
    if args.plan:
        return None
    run_study(jobs, setup, out, workers=args.jobs)
    rep = report(collect(out, jobs), args.recipes)
    print(format_report(rep))
    return rep


if __name__ == "__main__":
    main()
