"""Recipe studies: the same model trained in FP32 and in MX recipes, side by side.

A recipe maps the FP32 model to an ``apply_fn`` that consumes the *same*
float32 parameter pytree (the optimizer's master weights): ``fp32`` runs the
model as written; each MX recipe substitutes every matmul of the model with
``jaxmx.flax.quantize_model`` and a :func:`jaxmx.preset`, without editing the
model's code. :func:`run_recipes` trains every requested recipe from the same
initial params on the same batches; :func:`report_study` prints the table
and writes the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import jaxmx
import jaxmx.flax
from examples.parallel import Parallel, is_main_process
from examples.training import (
    ApplyFn,
    BatchFn,
    EvalBatchesFn,
    TrainConfig,
    apply_fn_for,
    train,
)

# --- Recipes ---------------------------------------------------------------
# A recipe maps the FP32 model to an apply_fn that consumes the *same* float32
# parameter pytree. MX recipes substitute the model's matmul layers; they are
# added here, in this one dict, and the CLIs pick them up via --recipes.


def fp32(model: Any, fsdp: str | None = None) -> ApplyFn:
    """The reference recipe: the model exactly as written, in float32.

    ``fsdp`` changes nothing here: sharded float32 weights are gathered by
    XLA as they are.
    """
    del fsdp
    return apply_fn_for(model)


def mx_recipe(
    preset: str, *, keep: Sequence[str] = (), **overrides: Any
) -> Callable[[Any], ApplyFn]:
    """A recipe running every matmul of the model in ``jaxmx.preset(preset)``.

    Args:
      preset: a :func:`jaxmx.list_presets` name.
      keep: path patterns of matmul modules to leave in high precision.
      **overrides: DotConfig fields to change, e.g. ``scale_mode="rceil"``.

    Returns:
      ``recipe(model, fsdp=None) -> apply_fn``. nnx models are cloned first,
      so the model handed in stays FP32 for the other recipes. ``fsdp``: the
      mesh axis the weights are sharded over, which makes every MX matmul
      all-gather its weight as MX codes and scales (``DotConfig.fsdp``).
    """
    config = jaxmx.preset(preset, **overrides)

    def recipe(model: Any, fsdp: str | None = None) -> ApplyFn:
        if isinstance(model, nnx.Module):
            model = nnx.clone(model)
        cfg = config if fsdp is None else config.replace(fsdp=fsdp)
        rules = [*((k, None) for k in keep), (".*", cfg)]
        return apply_fn_for(jaxmx.flax.quantize_model(model, rules))

    recipe.__name__ = preset
    recipe.__doc__ = jaxmx.list_presets()[preset] + (f"; with {overrides}" if overrides else "")
    return recipe


def vector_ops_recipe(
    matmuls: str | None, fmt: str = "bfloat16", rounding: str = "nearest_even", **overrides: Any
) -> Callable[[Any], ApplyFn]:
    """A recipe that emulates low-precision vector units around the matmuls.

    Every elementwise op and reduction of the model's forward pass (norms,
    softmax, activations, residual adds) has its float outputs rounded to
    ``fmt`` with ``rounding`` (``jaxmx.intercept(..., vector_ops=...)``);
    the matmuls run in FP32 (``matmuls=None``) or in ``jaxmx.preset(matmuls)``
    through the same ``intercept``, as the MX paper's emulator sets it up.

    Stochastic rounding draws from the training step's key (a new key every
    step); evaluation rounds with one fixed key, so it is reproducible.
    """
    rules = None if matmuls is None else [(".*", jaxmx.preset(matmuls, **overrides))]

    def recipe(model: Any, fsdp: str | None = None) -> ApplyFn:
        if fsdp is not None:
            raise ValueError("vector-op recipes do not take fsdp=; run them data parallel")
        base = apply_fn_for(model)

        def apply_fn(params, x, *, train: bool = False, rng=None):
            key = None
            if rounding == "stochastic":
                key = jax.random.fold_in(jax.random.key(0) if rng is None else rng, 0x7EC)
            ops = jaxmx.VectorOps(fmt, rounding, key=key)
            run = jaxmx.intercept(
                lambda p, x: base(p, x, train=train, rng=rng), rules, vector_ops=ops, warn=False
            )
            return run(params, x)

        apply_fn.mx_recipe = {
            "matmuls": matmuls,
            "vector_ops": {"format": fmt, "rounding": rounding},
            **({"overrides": overrides} if overrides else {}),
        }
        return apply_fn

    name = f"{matmuls or 'fp32'}_{fmt}_ops" + ("_sr" if rounding == "stochastic" else "")
    recipe.__name__ = name
    recipe.__doc__ = f"{matmuls or 'FP32'} matmuls, vector ops in {fmt} ({rounding})"
    return recipe


_E2M3 = {"lhs": "mxfp6_e2m3", "rhs": "mxfp6_e2m3", "grad": "mxfp6_e2m3"}

# fp32 and the training recipes of the MX paper and its successors; every
# matmul in the chosen formats (attention's q.k and p.v and the output head
# included; the embedding is a lookup, not a matmul).
RECIPES: dict[str, Callable[[Any], ApplyFn]] = {
    "fp32": fp32,
    **{
        name: mx_recipe(name)
        for name in ("mxfp8", "mxfp8_rceil", "mxfp8_e5m2_grads", "mxfp6", "mxfp4_weights", "mxfp4")
    },
    # The same recipes with round-up (RCEIL) scales, which never clip a block max.
    **{
        f"{name}_rceil": mx_recipe(name, scale_mode="rceil")
        for name in ("mxfp6", "mxfp4_weights", "mxfp4")
    },
    # Whole-model emulation: every vector op in bfloat16 (nearest-even or
    # stochastic), with FP32 or MX matmuls.
    **{
        r.__name__: r
        for r in (
            vector_ops_recipe(None),
            vector_ops_recipe(None, rounding="stochastic"),
            vector_ops_recipe("mxfp8"),
            vector_ops_recipe("mxfp6"),
        )
    },
    # MXFP6 E2M3 everywhere: the other OCP FP6 element, three mantissa bits
    # and two exponent bits (the MX paper trains with E3M2).
    **{
        f"mxfp6_e2m3{suffix}": mx_recipe("mxfp6", scale_mode=mode, **_E2M3)
        for suffix, mode in (("", "floor"), ("_rceil", "rceil"))
    },
}


def get_recipe(name: str) -> Callable[[Any], ApplyFn]:
    """Looks up a recipe in :data:`RECIPES`.

    Args:
      name: recipe name, e.g. ``"fp32"``.

    Returns:
      The recipe function ``model -> apply_fn``.

    Raises:
      ValueError: for an unknown name; the message lists the known ones.

    >>> get_recipe("fp32").__name__
    'fp32'
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def parse_recipes(spec: str) -> list[str]:
    """Splits a comma-separated recipe list and validates every name.

    >>> parse_recipes("fp32")
    ['fp32']
    """
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError(f"no recipe names in {spec!r}; known: {', '.join(sorted(RECIPES))}")
    for name in names:
        get_recipe(name)
    if len(set(names)) != len(names):
        raise ValueError(f"recipe list {spec!r} repeats a name")
    return names


# --- Plots and tables -----------------------------------------------------------


def load_metrics(run: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Returns a metrics dict given the dict itself or a ``metrics.json`` path."""
    if isinstance(run, Mapping):
        return dict(run)
    return json.loads(pathlib.Path(run).read_text())


def plot_runs(
    runs: Sequence[str | os.PathLike | Mapping[str, Any]], path: str | os.PathLike
) -> pathlib.Path:
    """Plots train loss, eval loss and eval accuracy of several runs on one figure.

    Uses matplotlib's Agg canvas directly (no pyplot), so it works headless
    and never touches global backend state.

    Args:
      runs: metrics dicts (as returned by :func:`train`) or ``metrics.json`` paths.
      path: output PNG path; parent folders are created.

    Returns:
      The PNG path.
    """
    if not runs:
        raise ValueError("plot_runs needs at least one run")
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    titles = ("train loss", "eval loss", "eval accuracy")
    ylabels = ("cross-entropy (nats)", "cross-entropy (nats)", "accuracy (fraction correct)")
    runs = [load_metrics(r) for r in runs]
    for run in runs:
        curves = (run["train"], run["eval"], run["eval"])
        for ax, key, points in zip(axes, ("loss", "loss", "accuracy"), curves, strict=True):
            ax.plot([p["step"] for p in points], [p[key] for p in points], label=run["name"])
    for ax, kind in zip(axes[:2], ("train", "eval"), strict=True):
        # Recipes differ by a few percent at the end; clipping the initial
        # transient (first 10% of steps) keeps those gaps visible.
        tails = [
            p["loss"]
            for run in runs
            for p in run[kind]
            if p["step"] >= 0.1 * run["config"]["train"]["steps"]
        ]
        if tails:
            low, high = min(tails), max(tails)
            ax.set_ylim(low - 0.05 * (high - low) - 1e-3, high + 0.05 * (high - low) + 1e-3)
    for ax, title, ylabel in zip(axes, titles, ylabels, strict=True):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    # One legend for the three panels, beside them rather than over the curves.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=9)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def run_recipes(
    recipes: Sequence[str],
    model: Any,
    params: Any,
    train_batch: BatchFn,
    eval_batches: EvalBatchesFn,
    config: TrainConfig,
    out_root: str | os.PathLike,
    *,
    run_info: Mapping[str, Any] | None = None,
    progress: bool = True,
    parallel: Parallel | None = None,
) -> list[dict[str, Any]]:
    """Trains each recipe in turn from the same params on the same batches.

    Args:
      recipes: names in :data:`RECIPES`.
      model: the FP32 model handed to each recipe.
      params: shared initial float32 params.
      train_batch: see :func:`train`.
      eval_batches: see :func:`train`.
      config: shared loop settings.
      out_root: each recipe writes to ``out_root/<recipe>/`` (and resumes from it).
      run_info: description of model and data, recorded with each run.
      progress: show progress bars.
      parallel: the mesh to run on (data parallel, FSDP with ``parallel.fsdp``).

    Returns:
      The metrics dict of each recipe, in order.
    """
    results = []
    fsdp = parallel.axis if parallel is not None and parallel.fsdp else None
    for name in recipes:
        apply_fn = get_recipe(name)(model, fsdp=fsdp)
        result = train(
            apply_fn,
            params,
            train_batch,
            eval_batches,
            config,
            out_dir=pathlib.Path(out_root) / name,
            name=name,
            run_info={**dict(run_info or {}), "recipe": name},
            progress=progress,
            parallel=parallel,
        )
        results.append(result.metrics)
    return results


def run_cli(
    args: argparse.Namespace,
    built: tuple,
    metric: str,
    title: str,
    parallel: Parallel | None = None,
) -> list[dict]:
    """The common tail of the example CLIs: train every recipe, print the table.

    Args:
      args: resolved arguments (``recipes``, ``out``, ``no_progress`` and the
        common training flags).
      built: ``(model, params, train_batch, eval_batches, run_info)``.
      metric: ``"loss"`` or ``"accuracy"`` for the summary table.
      title: what is trained, for the first line printed.
      parallel: the mesh to run on; None: one device. Only process 0 prints
        and writes the table and plot.

    Returns:
      The metrics dict of each recipe.
    """
    recipes = parse_recipes(args.recipes)
    model, params, train_batch, eval_batches, run_info = built
    n_params = sum(p.size for p in jax.tree.leaves(params))
    main = is_main_process()
    if main:
        where = "" if parallel is None else f" on {parallel.describe()}"
        print(f"{title} with {n_params:,} params; recipes: {recipes}{where}")
    results = run_recipes(
        recipes,
        model,
        params,
        train_batch,
        eval_batches,
        train_config_from_args(args),
        args.out,
        run_info=run_info,
        progress=not args.no_progress,
        parallel=parallel,
    )
    if main:
        print(report_study(results, args.out, metric))
    return results


def format_table(results: Sequence[Mapping[str, Any]], metric: str) -> str:
    """Formats final ``metric`` ("loss" or "accuracy") per recipe, with the gap to fp32.

    The gap is relative: ``100 * (value - fp32) / fp32``.
    """
    if metric not in ("loss", "accuracy"):
        raise ValueError(f"metric must be 'loss' or 'accuracy', got {metric!r}")
    ref = next((r["final_eval"][metric] for r in results if r["name"] == "fp32"), None)
    label = "final val loss" if metric == "loss" else "test accuracy"
    lines = [f"{'recipe':<16} {label:>14} {'gap to fp32 %':>14} {'median step ms':>15}"]
    for r in results:
        value = r["final_eval"][metric]
        gap = f"{100 * (value - ref) / ref:+.2f}" if ref else "n/a"
        ms = r["step_time_ms_median"]
        ms_text = f"{ms:.1f}" if ms is not None else "n/a"
        lines.append(f"{r['name']:<16} {value:>14.4f} {gap:>14} {ms_text:>15}")
    return "\n".join(lines)


def report_study(results: Sequence[Mapping[str, Any]], out_root, metric: str) -> str:
    """Plots the runs to ``out_root/loss.png``, writes ``summary.txt`` and returns the table."""
    out_root = pathlib.Path(out_root)
    plot = plot_runs(results, out_root / "loss.png")
    table = format_table(results, metric)
    text = f"{table}\nplot: {plot}"
    (out_root / "summary.txt").write_text(text + "\n")
    return text


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Adds the flags shared by the example CLIs.

    Numeric flags default to None so :func:`resolve_defaults` can tell an
    explicit value from a default (``--quick`` only changes the defaults).
    """
    known = ", ".join(sorted(RECIPES))
    parser.add_argument("--recipes", default="fp32", help=f"comma-separated, from: {known}")
    parser.add_argument("--steps", type=int, help="optimizer updates")
    parser.add_argument("--batch-size", type=int, help="examples per batch")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, help="linear warmup steps")
    parser.add_argument("--eval-every", type=int, help="evaluation interval (steps)")
    parser.add_argument("--log-every", type=int, help="train-loss logging interval")
    parser.add_argument("--checkpoint-every", type=int, help="checkpoint interval; 0 = at the end")
    parser.add_argument("--seed", type=int, default=0, help="init, data and dropout seed")
    parser.add_argument("--out", help="output folder (default runs/<name>); reruns resume")
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test configuration")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def resolve_defaults(
    args: argparse.Namespace, defaults: Mapping[str, Any], quick: Mapping[str, Any]
) -> argparse.Namespace:
    """Fills every flag left at None from ``quick`` (with --quick) or ``defaults``."""
    table = {**defaults, **quick} if args.quick else defaults
    for key, value in table.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Builds the :class:`TrainConfig` from resolved common flags."""
    return TrainConfig(
        steps=args.steps,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        eval_every=args.eval_every,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
