"""Whole-model low-precision emulation: the char-GPT with every vector op in bfloat16.

The MX paper's emulator runs a model's elementwise ops and reductions (norms,
softmax, activations, residual adds) on a bfloat16 vector unit as well as its
matmuls in MX. This study trains the char-GPT of ``examples/train_lm.py``
with the recipes of ``examples/study.py`` that emulate it
(``jaxmx.intercept(..., vector_ops=...)``):

* ``fp32``: the reference;
* ``fp32_bfloat16_ops`` / ``fp32_bfloat16_ops_sr``: FP32 matmuls, vector ops
  rounded to bfloat16 to nearest-even / stochastically;
* ``mxfp8`` and ``mxfp6``: MX matmuls, FP32 vector ops;
* ``mxfp8_bfloat16_ops`` / ``mxfp6_bfloat16_ops``: both (the paper's setting).

Every recipe runs with several seeds (initial weights and batches), since
a claim about rounding needs a spread to be measured against. Each run
checkpoints into ``<out>/seed<N>/<recipe>/`` and resumes where it stopped;
``--report`` prints the table (mean and spread of the final validation loss
over the seeds, gap to FP32) from whatever has finished and draws the plot.

Usage::

    python examples/vector_ops_study.py --seeds 0,1,2          # train (resumes)
    python examples/vector_ops_study.py --report --publish     # table + docs copy
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from examples.requires import require

RECIPES = (
    "fp32",
    "fp32_bfloat16_ops",
    "fp32_bfloat16_ops_sr",
    "mxfp8",
    "mxfp8_bfloat16_ops",
    "mxfp6",
    "mxfp6_bfloat16_ops",
)
OUT = pathlib.Path("runs/vector_ops")
DOCS = pathlib.Path("docs/studies")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run each")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names")
    p.add_argument("--out", default=str(OUT), help="where the runs and the report go")
    p.add_argument("--quick", action="store_true", help="a tiny model and 40 steps (smoke test)")
    p.add_argument("--report", action="store_true", help="only report what has finished")
    p.add_argument(
        "--publish",
        action="store_true",
        help=f"also write the table and plot to {DOCS}/vector_ops_results.md and docs/img/",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _seeds(spec: str) -> list[int]:
    try:
        seeds = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds takes comma-separated integers, got {spec!r}") from None
    if not seeds:
        raise SystemExit(f"--seeds names no seed: {spec!r}")
    return seeds


def train(args: argparse.Namespace) -> None:
    from examples import train_lm

    for seed in _seeds(args.seeds):
        argv = ["--recipes", args.recipes, "--seed", str(seed)]
        argv += ["--out", str(pathlib.Path(args.out) / f"seed{seed}")]
        argv += ["--quick"] * args.quick + ["--no-progress"] * args.no_progress
        train_lm.main(argv)


def collect(out: pathlib.Path, recipes: list[str]) -> dict[str, dict[int, dict]]:
    """``{recipe: {seed: metrics}}`` of the runs that finished."""
    runs: dict[str, dict[int, dict]] = {r: {} for r in recipes}
    for path in sorted(out.glob("seed*/*/metrics.json")):
        recipe, seed = path.parent.name, int(path.parent.parent.name.removeprefix("seed"))
        metrics = json.loads(path.read_text())
        done = (
            metrics.get("final_eval")
            and metrics["eval"][-1]["step"] == (metrics["config"]["train"]["steps"])
        )
        if recipe in runs and done:
            runs[recipe][seed] = metrics
    return runs


def table(runs: dict[str, dict[int, dict]]) -> str:
    """Markdown: per recipe, the seeds finished, mean and spread of the final
    validation loss, and the mean gap to FP32 over the seeds both finished."""
    ref = runs.get("fp32", {})
    rows = [
        "| recipe | seeds | final val loss (mean ± sd) | gap to FP32 (mean, %) "
        "| gap range over seeds (%) | median step ms |",
        "|---|---|---|---|---|---|",
    ]
    for recipe, by_seed in runs.items():
        if not by_seed:
            rows.append(f"| {recipe} | 0 | not run yet | | | |")
            continue
        losses = [m["final_eval"]["loss"] for m in by_seed.values()]
        sd = statistics.stdev(losses) if len(losses) > 1 else float("nan")
        gaps = [
            100 * (m["final_eval"]["loss"] / ref[s]["final_eval"]["loss"] - 1)
            for s, m in by_seed.items()
            if s in ref
        ]
        gap = f"{statistics.mean(gaps):+.2f}" if gaps else "n/a"
        spread = f"{min(gaps):+.2f} to {max(gaps):+.2f}" if len(gaps) > 1 else "n/a"
        ms = statistics.median(m["step_time_ms_median"] for m in by_seed.values())
        rows.append(
            f"| {recipe} | {len(losses)} | {statistics.mean(losses):.4f} ± {sd:.4f} "
            f"| {gap} | {spread} | {ms:.1f} |"
        )
    return "\n".join(rows)


def plot(runs: dict[str, dict[int, dict]], path: pathlib.Path) -> pathlib.Path:
    """The validation loss curve of each recipe, averaged over its seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    tails = []
    for recipe, by_seed in runs.items():
        if not by_seed:
            continue
        curves = [[(p["step"], p["loss"]) for p in m["eval"]] for m in by_seed.values()]
        steps = [s for s, _ in curves[0]]
        mean = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
        seeds = f"{len(curves)} seed" + ("s" if len(curves) > 1 else "")
        ax.plot(steps, mean, label=f"{recipe} ({seeds})")
        tails += [v for s, v in zip(steps, mean, strict=True) if s >= 0.25 * steps[-1]]
    if tails:
        low, high = min(tails), max(tails)
        ax.set_ylim(low - 0.05 * (high - low) - 1e-3, high + 0.05 * (high - low) + 1e-3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation cross-entropy (nats per character)")
    ax.set_title("char-GPT with bfloat16 vector ops (mean over seeds)")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def report(args: argparse.Namespace) -> str:
    out = pathlib.Path(args.out)
    runs = collect(out, [r for r in args.recipes.split(",") if r])
    text = table(runs)
    png = plot(runs, out / "vector_ops.png")
    (out / "vector_ops.md").write_text(text + "\n")
    if args.publish:
        plot(runs, pathlib.Path("docs/img/vector_ops_study.png"))
        (DOCS / "vector_ops_results.md").write_text(
            "# Vector ops in bfloat16: results\n\n"
            "Generated by `python examples/vector_ops_study.py --report --publish` "
            "(do not edit).\n\n" + text + "\n"
        )
    return f"{text}\nplot: {png}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require("flax", "optax", "orbax-checkpoint", "tqdm", "matplotlib")
    if not args.report:
        train(args)
    print(report(args))


if __name__ == "__main__":
    main()
