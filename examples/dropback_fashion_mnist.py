"""DropBack and Procrustes on Fashion-MNIST: LeNet-300-100, plain SGD, fewer tracked weights.

The setting of the DropBack paper (Golub et al., arXiv:1806.06949, section 4:
LeNet-300-100 trained with plain SGD), on Fashion-MNIST instead of MNIST.
Every variant starts from the same initial weights (drawn by
``jaxmx.optax.initial_params``, so DropBack can regenerate them) and sees the
same batches; FP32 is plain SGD, the others chain
``jaxmx.optax.dropback`` after it with a budget of 1/5, 1/10 and 1/25 of
the weights, and Procrustes adds decaying initial values and the running
threshold estimate. Each run writes ``metrics.json`` and orbax checkpoints
to ``<out>/<variant>/`` (reruns resume); at the end a table (test accuracy,
gap to FP32, tracked weights, weights that differ from their initial
value, state bytes) is printed and written with a plot.

Usage::

    python examples/dropback_fashion_mnist.py              # the study (about 30 minutes on 2 cores)
    python examples/dropback_fashion_mnist.py --quick      # smoke test, seconds
    python examples/dropback_fashion_mnist.py --summarize runs/a,runs/b   # seeds side by side
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make `models`/`examples` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from examples.requires import TRAINING, require

if __name__ == "__main__":  # every missing package named at once, before any import
    require(*TRAINING, later=["fashion-mnist"])

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import jaxmx.optax
from examples import data, study, training
from models import LeNet300100

# name -> dropback arguments (None: plain SGD, the FP32 baseline).
VARIANTS: dict[str, dict | None] = {
    "fp32": None,
    "dropback_3x": {"tracked": 1 / 3},
    "dropback_5x": {"tracked": 1 / 5},
    "dropback_10x": {"tracked": 1 / 10},
    "dropback_25x": {"tracked": 1 / 25},
    "dropback_10x_per_tensor": {"tracked": 1 / 10, "scope": "per_tensor"},
    # Procrustes: running threshold; initial values decaying slowly (0.999 per
    # step: 2e-16 of w0 after 60 epochs) or fast enough that untracked weights
    # are exactly 0 from about step 17,000 on (0.995).
    "procrustes_10x": {"tracked": 1 / 10, "init_decay": 0.999, "threshold": "quantile"},
    "procrustes_10x_sparse": {"tracked": 1 / 10, "init_decay": 0.995, "threshold": "quantile"},
}
DEFAULT_VARIANTS = ",".join(VARIANTS)
# Tuned on FP32 and DropBack 10x: 60 epochs beat 20 (FP32 88.7% -> 89.5%, gap
# 1.5 -> 1.4 points); lr 0.05 and 0.3 and a cosine decay gave larger gaps.
DEFAULTS = {
    "steps": 36000,  # 60 epochs of 60000 images
    "batch_size": 100,
    "lr": 0.1,
    "eval_every": 3000,
    "log_every": 100,
    "checkpoint_every": 6000,
    "min_lr_ratio": 1.0,  # 1: constant learning rate; below 1: cosine decay to that fraction
}
_FLAGS = {  # what each of DEFAULTS means, for --help
    "steps": "optimizer updates",
    "batch_size": "images per batch",
    "lr": "learning rate",
    "eval_every": "evaluation interval (steps)",
    "log_every": "train-loss logging interval",
    "checkpoint_every": "checkpoint interval",
    "min_lr_ratio": "final fraction of the learning rate; 1 keeps it constant",
}
QUICK = {"steps": 60, "batch_size": 32, "eval_every": 30, "log_every": 10, "checkpoint_every": 30}
EVAL_BATCH = 1000


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line (``--quick`` changes the defaults)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=f"defaults: {DEFAULTS}"
    )
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"from: {', '.join(VARIANTS)}")
    for name, what in _FLAGS.items():
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=type(DEFAULTS[name]),
            help=f"{what} ({DEFAULTS[name]})",
        )
    p.add_argument("--seed", type=int, default=0, help="init, data and threshold seed")
    p.add_argument("--out", help="output folder (default runs/dropback_fashion_mnist)")
    p.add_argument("--results", help="also write the JSON results here (e.g. docs/results/...)")
    p.add_argument("--plot", help="also write the plot here (e.g. docs/img/optax_dropback.png)")
    p.add_argument("--eval-examples", type=int, default=10000, help="test images (first N)")
    p.add_argument("--quick", action="store_true", help="tiny smoke-test configuration")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--summarize",
        help="comma-separated output folders of finished runs (e.g. one per seed): "
        "print their accuracies and gaps side by side instead of training",
    )
    args = p.parse_args(argv)
    table = {**DEFAULTS, **QUICK} if args.quick else DEFAULTS
    for key, value in table.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = f"runs/dropback_fashion_mnist{'_quick' if args.quick else ''}"
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in VARIANTS]
    if unknown or not args.variant_list:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    return args


def make_optimizer(variant: str, lr, init_key) -> optax.GradientTransformation:
    """Plain SGD (no momentum), followed by DropBack for every variant but ``fp32``."""
    sgd = optax.sgd(lr)
    spec = VARIANTS[variant]
    if spec is None:
        return sgd
    return optax.chain(sgd, jaxmx.optax.dropback(init_key=init_key, **spec))


def run(args: argparse.Namespace) -> list[dict]:
    """Trains every variant; returns one result row per variant."""
    train_batch, eval_batches = data.classification_batches(
        data.load_fashion_mnist(),
        batch_size=args.batch_size,
        seed=args.seed,
        eval_examples=args.eval_examples,
        eval_batch=EVAL_BATCH,
    )

    model = LeNet300100()
    init_key = jax.random.key(args.seed)
    shapes = jax.eval_shape(model.init, init_key, jnp.zeros((1, 28, 28, 1)))["params"]
    params0 = jaxmx.optax.initial_params(init_key, shapes)
    config = training.TrainConfig(
        steps=args.steps,
        learning_rate=args.lr,
        warmup_steps=0,
        min_lr_ratio=args.min_lr_ratio,
        eval_every=args.eval_every,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    apply_fn = training.apply_fn_for(model)
    total = sum(p.size for p in jax.tree.leaves(params0))
    print(f"LeNet-300-100 with {total:,} params; variants: {args.variant_list}")
    rows, metrics = [], []
    for variant in args.variant_list:
        opt = make_optimizer(variant, training.lr_schedule(config), init_key)
        result = training.train(
            apply_fn,
            params0,
            train_batch,
            eval_batches,
            config,
            optimizer=opt,
            out_dir=pathlib.Path(args.out) / variant,
            name=variant,
            run_info={
                "model": "LeNet-300-100",
                "data": "fashion-mnist",
                "batch_size": args.batch_size,
                "min_lr_ratio": args.min_lr_ratio,
                "variant": variant,
                "dropback": VARIANTS[variant],
            },
            progress=not args.no_progress,
        )
        metrics.append(result.metrics)
        changed = sum(
            int(jnp.sum(a != b))
            for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(params0), strict=True)
        )
        row = {
            "variant": variant,
            "dropback": VARIANTS[variant],
            "test_accuracy": result.metrics["final_eval"]["accuracy"],
            "step_ms": result.metrics["step_time_ms_median"],
            "total": total,
            "changed_from_init": changed,
        }
        if VARIANTS[variant] is not None:
            stats = jaxmx.optax.dropback_stats(result.opt_state[1], result.params)
            row.update(
                tracked=stats["tracked"],
                budget=round(VARIANTS[variant]["tracked"] * total),
                compression=stats["compression"],
                zero_fraction=stats["zero_fraction"],
                state_bytes=stats["state_bytes"],
            )
        else:
            row.update(tracked=total, budget=total, compression=1.0, zero_fraction=0.0)
            row["state_bytes"] = jaxmx.optax.state_nbytes(result.opt_state)
        rows.append(row)
    ref = next((r["test_accuracy"] for r in rows if r["variant"] == "fp32"), None)
    for r in rows:
        r["gap_points"] = 100 * (r["test_accuracy"] - ref) if ref is not None else None
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    study.plot_runs(metrics, out / "curves.png")
    if args.plot:
        study.plot_runs(metrics, args.plot)
    text = json.dumps({"config": vars(args) | {"variant_list": None}, "rows": rows}, indent=1)
    (out / "results.json").write_text(text)
    if args.results:
        pathlib.Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.results).write_text(text)
    return rows


def format_table(rows: list[dict]) -> str:
    """The README table: accuracy, gap, tracked weights, weights off their init, state."""
    lines = [
        "| variant | test accuracy | gap to FP32 (points) | tracked weights | compression "
        "| weights != init | weights == 0 | optimizer state bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = "-" if r["variant"] == "fp32" else f"{r['gap_points']:+.2f}"
        lines.append(
            f"| {r['variant']} | {100 * r['test_accuracy']:.2f}% | {gap} | {r['tracked']:,} "
            f"| {r['compression']:.1f}x | {r['changed_from_init']:,} "
            f"| {100 * r['zero_fraction']:.1f}% | {r['state_bytes']:,} |"
        )
    return "\n".join(lines)


def tail_means(metrics: dict, fraction: float = 0.1) -> dict:
    """Train loss and test accuracy averaged over the last ``fraction`` of training.

    With a constant learning rate the test accuracy moves by a few tenths of a
    point from one evaluation to the next; a mean over the last evaluations
    is the steadier figure. The train loss shows how well a budget fits.
    """
    steps = metrics["config"]["train"]["steps"]
    train = [t["loss"] for t in metrics["train"] if t["step"] > (1 - fraction) * steps]
    evals = [e["accuracy"] for e in metrics["eval"] if e["step"] > (1 - 2 * fraction) * steps]
    return {"train_loss_tail": float(np.mean(train)), "test_accuracy_tail": float(np.mean(evals))}


def summarize(folders: list[str], results=None, plot=None) -> list[dict]:
    """Per variant: accuracy in each folder (seed), gap to that folder's FP32, mean and spread.

    Reads ``<folder>/<variant>/metrics.json`` of finished runs.
    """
    per_variant: dict[str, list[dict]] = {}
    for folder in folders:
        runs = {}
        for path in sorted(pathlib.Path(folder).glob("*/metrics.json")):
            metrics = json.loads(path.read_text())
            if metrics.get("final_eval", {}).get("step") != metrics["config"]["train"]["steps"]:
                continue  # unfinished
            runs[path.parent.name] = {
                "final": metrics["final_eval"]["accuracy"],
                **tail_means(metrics),
                "seed": metrics["config"]["train"]["seed"],
            }
        if "fp32" not in runs:
            raise ValueError(f"{folder} has no finished fp32 run to compare with")
        for variant, r in runs.items():
            r["gap"] = 100 * (r["final"] - runs["fp32"]["final"])
            r["gap_tail"] = 100 * (r["test_accuracy_tail"] - runs["fp32"]["test_accuracy_tail"])
            per_variant.setdefault(variant, []).append({"folder": folder, **r})
    order = [v for v in VARIANTS if v in per_variant]
    rows = []
    for variant in order:
        runs = per_variant[variant]
        gaps = np.array([r["gap"] for r in runs])
        rows.append(
            {
                "variant": variant,
                "runs": runs,
                "accuracy_mean": float(np.mean([r["final"] for r in runs])),
                "gap_mean": float(gaps.mean()),
                "gap_min": float(gaps.min()),
                "gap_max": float(gaps.max()),
                "gap_tail_mean": float(np.mean([r["gap_tail"] for r in runs])),
                "train_loss_tail_mean": float(np.mean([r["train_loss_tail"] for r in runs])),
            }
        )
    if results:
        pathlib.Path(results).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(results).write_text(json.dumps({"folders": folders, "rows": rows}, indent=1))
    if plot:
        plot_gaps(rows, plot)
    return rows


def format_summary(rows: list[dict]) -> str:
    """The seed table: final accuracy and gap per run, the mean gap, the train loss."""
    lines = [
        "| variant | test accuracy per seed | gap to FP32 per seed (points) | mean gap "
        "| mean gap, last 20% of evals | train loss, last 10% |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        accs = " / ".join(f"{100 * x['final']:.2f}" for x in r["runs"])
        gaps = " / ".join(f"{x['gap']:+.2f}" for x in r["runs"])
        mean = "-" if r["variant"] == "fp32" else f"{r['gap_mean']:+.2f}"
        tail = "-" if r["variant"] == "fp32" else f"{r['gap_tail_mean']:+.2f}"
        lines.append(
            f"| {r['variant']} | {accs} | {gaps if r['variant'] != 'fp32' else '-'} | {mean} "
            f"| {tail} | {r['train_loss_tail_mean']:.3f} |"
        )
    return "\n".join(lines)


def plot_gaps(rows: list[dict], path) -> pathlib.Path:
    """Gap to FP32 per variant: one dot per seed, a bar at the mean."""
    rows = [r for r in rows if r["variant"] != "fp32"]
    fig = Figure(figsize=(7, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, r in enumerate(rows):
        ax.bar(i, r["gap_mean"], color="#9ecae1")
        ax.plot([i] * len(r["runs"]), [x["gap"] for x in r["runs"]], "o", color="#08519c")
    ax.axhline(-1.0, color="#d62728", linestyle="--", label="1 point below FP32")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel("test accuracy gap to FP32 (points)")
    ax.set_title("DropBack on Fashion-MNIST, LeNet-300-100: one dot per seed")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def main(argv=None) -> list[dict]:
    """Runs the study and prints the table (or, with ``--summarize``, the seed table)."""
    args = parse_args(argv)
    if args.summarize:
        rows = summarize(args.summarize.split(","), args.results, args.plot)
        print(format_summary(rows))
        return rows
    require("fashion-mnist")
    rows = run(args)
    table = format_table(rows)
    (pathlib.Path(args.out) / "table.md").write_text(table + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
