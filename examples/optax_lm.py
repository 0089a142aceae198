"""Low-precision optimizer state and master weights on the char-GPT of train_lm.py.

The model, data and schedule are ``examples/train_lm.py``'s (AdamW, 1600
steps, same initial params and batches for every run). What changes is the
optimizer, through ``jaxmx.optax``:

* the AdamW moments stored compressed (``compress_state``): bitsandbytes'
  8-bit blockwise state, Li et al.'s 4-bit state, MXFP8 or MXINT8 first
  moments, both moments in bfloat16;
* bfloat16 master weights (``low_precision_params``) rounded to nearest
  even, stochastically, or with a Kahan/Collage compensation buffer;
* combinations of the two;

each under two matmul recipes: FP32, and ``jaxmx.preset("mxfp8")`` in every
matmul (the ``mxfp8`` recipe of ``examples/study.py``). Runs write to
``<out>/<recipe>-<variant>/`` and resume; the table (final validation loss,
gap to FP32, optimizer bytes per parameter) and the plot are written at the end.

Usage::

    python examples/optax_lm.py                       # the full grid (about an hour on 2 cores)
    python examples/optax_lm.py --variants fp32,8bit --recipes fp32
    python examples/optax_lm.py --quick               # smoke test
    python examples/optax_lm.py --summarize runs/optax_lm,runs/optax_lm_seed1   # seeds side by side
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
    require(*TRAINING)

import jax
import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import jaxmx
import jaxmx.optax
from examples import data, study, train_lm, training


def _adamw(config, key):
    return training.make_optimizer(config)


def _compressed(preset):
    def build(config, key):
        return jaxmx.optax.compress_state(training.make_optimizer(config), preset)

    return build


def _bf16(rounding="nearest_even", compensation=None, state=None, fmt="bfloat16"):
    def build(config, key):
        inner = training.make_optimizer(config)
        if state is not None:
            inner = jaxmx.optax.compress_state(inner, state)
        return jaxmx.optax.low_precision_params(
            inner, fmt, rounding=rounding, compensation=compensation, key=key
        )

    return build


# A 12-bit float (8 exponent bits, 3 mantissa bits): bfloat16 with 4 fewer
# mantissa bits, where nearest rounding loses far more updates.
E8M3 = jaxmx.formats.float_format(8, 3)


# name -> (optimizer builder (config, key) -> transformation, params format or None)
VARIANTS = {
    "fp32": (_adamw, None),
    "8bit": (_compressed("8bit"), None),
    "4bit": (_compressed("4bit"), None),
    "mxfp8_mu": (_compressed("mxfp8"), None),
    "mxint8_mu": (_compressed("mxint8"), None),
    "bf16_state": (_compressed("bf16"), None),
    "bf16_params_nearest": (_bf16(), "bfloat16"),
    "bf16_params_stochastic": (_bf16("stochastic"), "bfloat16"),
    "bf16_params_kahan": (_bf16(compensation="bfloat16"), "bfloat16"),
    "8bit+bf16_stochastic": (_bf16("stochastic", state="8bit"), "bfloat16"),
    "4bit+bf16_stochastic": (_bf16("stochastic", state="4bit"), "bfloat16"),
    "e8m3_params_nearest": (_bf16(fmt=E8M3), E8M3),
    "e8m3_params_stochastic": (_bf16("stochastic", fmt=E8M3), E8M3),
}
# The default grid; the E8M3 rows are an extra check of the rounding claim.
DEFAULT_VARIANTS = [v for v in VARIANTS if not v.startswith("e8m3")]
RECIPES = ("fp32", "mxfp8")


def parse_args(argv=None) -> argparse.Namespace:
    """Own flags (--variants, --recipes, --results, --plot); the rest go to train_lm's parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help=f"from: {', '.join(VARIANTS)}"
    )
    p.add_argument("--recipes", default=",".join(RECIPES), help="matmul recipes: fp32, mxfp8")
    p.add_argument("--results", help="also write the JSON results here")
    p.add_argument("--plot", help="also write the plot here")
    p.add_argument(
        "--summarize",
        help="comma-separated output folders of finished grids (e.g. one per seed): "
        "print each run's gap to the FP32 run of its folder instead of training",
    )
    own, rest = p.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        p.print_help()
    args = train_lm.parse_args(rest)  # model, data and loop flags, with train_lm's defaults
    if args.out == "runs/shakespeare" or args.out == "runs/shakespeare_quick":
        args.out = f"runs/optax_lm{'_quick' if args.quick else ''}"
    args.variant_list = [v.strip() for v in own.variants.split(",") if v.strip()]
    args.recipe_list = [r.strip() for r in own.recipes.split(",") if r.strip()]
    bad = [v for v in args.variant_list if v not in VARIANTS]
    bad += [r for r in args.recipe_list if r not in study.RECIPES]
    if bad or not args.variant_list or not args.recipe_list:
        raise ValueError(
            f"unknown variants/recipes {bad}; variants: {', '.join(VARIANTS)}; "
            f"recipes: {', '.join(study.RECIPES)}"
        )
    args.results, args.plot, args.summarize = own.results, own.plot, own.summarize
    return args


def _size(tree) -> int:
    return sum(p.size for p in jax.tree.leaves(tree))


def large_tensors(params) -> dict:
    """The params with more than 4096 elements and at least two dimensions.

    Every state preset compresses these; the rest stay float32 under at least
    one preset (Li et al.'s 4-bit rule keeps ``numel <= 4096`` and 1-D
    tensors, bitsandbytes' ``numel < 4096``). A flat dict keyed by path.
    """
    return {
        jax.tree_util.keystr(path): p
        for path, p in jax.tree_util.tree_leaves_with_path(params)
        if p.size > 4096 and p.ndim >= 2
    }


def run(args: argparse.Namespace) -> list[dict]:
    """Trains the grid; returns one row per (recipe, variant)."""
    model, params, train_batch, eval_batches, run_info = train_lm.build(
        args, data.load_shakespeare()
    )
    config = study.train_config_from_args(args)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    print(f"GPT with {n_params:,} params; recipes {args.recipe_list}; variants {args.variant_list}")
    rows, metrics = [], []
    key = jax.random.key(args.seed + 1)  # stochastic rounding
    for recipe in args.recipe_list:
        apply_fn = study.get_recipe(recipe)(model)
        for variant in args.variant_list:
            build, fmt = VARIANTS[variant]
            optimizer = build(config, key)
            start = jaxmx.optax.round_params(params, fmt) if fmt else params
            name = f"{recipe}-{variant}"
            result = training.train(
                apply_fn,
                start,
                train_batch,
                eval_batches,
                config,
                optimizer=optimizer,
                out_dir=pathlib.Path(args.out) / name,
                name=name,
                run_info={**run_info, "recipe": recipe, "optimizer": variant},
                progress=not args.no_progress,
            )
            result.metrics["name"] = name
            metrics.append(result.metrics)
            state_bpp = jaxmx.optax.bytes_per_param(optimizer.init(start), start)
            large = large_tensors(start)
            rows.append(
                {
                    "recipe": recipe,
                    "variant": variant,
                    "val_loss": result.metrics["final_eval"]["loss"],
                    "step_ms": result.metrics["step_time_ms_median"],
                    "state_bytes_per_param": state_bpp,
                    # On the tensors every preset compresses (> 4096 elements, >= 2-D).
                    "state_bytes_per_param_large": jaxmx.optax.bytes_per_param(
                        optimizer.init(large), large
                    )
                    if large
                    else None,
                    "large_fraction": _size(large) / n_params,
                    # bf16 values need 2 bytes; a 12-bit float 1.5 (packed).
                    "param_bytes_per_param": 4.0
                    if not fmt
                    else (2.0 if fmt == "bfloat16" else 1.5),
                }
            )
    ref = {r["recipe"]: r["val_loss"] for r in rows if r["variant"] == "fp32"}
    base = ref.get("fp32")
    for r in rows:
        r["gap_pct"] = 100 * (r["val_loss"] / base - 1) if base else None
        same = ref.get(r["recipe"])
        r["gap_same_recipe_pct"] = 100 * (r["val_loss"] / same - 1) if same else None
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"n_params": n_params, "steps": args.steps, "rows": rows}, indent=1)
    (out / "results.json").write_text(text)
    if args.results:
        pathlib.Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.results).write_text(text)
    for path in [out / "loss.png", *([args.plot] if args.plot else [])]:
        plot(metrics, args.recipe_list, path)
    return rows


def plot(metrics: list[dict], recipes: list[str], path) -> pathlib.Path:
    """Validation loss against step, one panel per matmul recipe."""
    fig = Figure(figsize=(7 * len(recipes), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(recipes), squeeze=False)[0]
    for ax, recipe in zip(axes, recipes, strict=True):
        runs = [m for m in metrics if m["name"].startswith(f"{recipe}-")]
        colors = matplotlib.colormaps["tab20"].colors
        for i, m in enumerate(runs):
            # The last 75% of training, where the variants differ.
            points = [e for e in m["eval"] if e["step"] >= 0.25 * m["eval"][-1]["step"]]
            ax.plot(
                [e["step"] for e in points],
                [e["loss"] for e in points],
                label=m["name"].split("-", 1)[1],
                marker=".",
                color=colors[i % len(colors)],
                linestyle="-" if i < len(colors) else "--",
            )
        ax.set_title(f"validation loss, {recipe} matmuls")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation loss (nats per character)")
        ax.grid(alpha=0.3)
        # Up to 13 variants: the legend goes beside the panel, not over the curves.
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def format_table(rows: list[dict]) -> str:
    """The README table."""
    lines = [
        "| matmuls | optimizer | final val loss | gap to FP32 | gap to same matmuls "
        "| optimizer state B/param | on large tensors | params B/param | step ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = "-" if r["recipe"] == "fp32" and r["variant"] == "fp32" else f"{r['gap_pct']:+.2f}%"
        same = "-" if r["variant"] == "fp32" else f"{r['gap_same_recipe_pct']:+.2f}%"
        ms = f"{r['step_ms']:.1f}" if r["step_ms"] else "n/a"
        large = r.get("state_bytes_per_param_large")
        large = "n/a" if large is None else f"{large:.2f}"
        lines.append(
            f"| {r['recipe']} | {r['variant']} | {r['val_loss']:.4f} | {gap} | {same} "
            f"| {r['state_bytes_per_param']:.2f} | {large} "
            f"| {r['param_bytes_per_param']:g} | {ms} |"
        )
    return "\n".join(lines)


def summarize(folders: list[str], results=None) -> list[dict]:
    """Final validation loss of every finished run in each folder, as a gap to that folder's FP32.

    The folders hold grids trained with different ``--seed``s (which change
    the initial params, the batches and the validation batches), so losses
    are only compared within a folder: the gap of ``<recipe>-<variant>`` to
    ``<recipe>-fp32`` and to ``fp32-fp32`` of the same seed.
    """
    per_run: dict[str, list[dict]] = {}
    for folder in folders:
        losses = {}
        for path in sorted(pathlib.Path(folder).glob("*/metrics.json")):
            m = json.loads(path.read_text())
            if m.get("final_eval", {}).get("step") == m["config"]["train"]["steps"]:
                losses[path.parent.name] = (m["final_eval"]["loss"], m["config"]["train"]["seed"])
        for name, (loss, seed) in losses.items():
            recipe = name.split("-", 1)[0]
            same = losses.get(f"{recipe}-fp32")
            fp32 = losses.get("fp32-fp32")
            per_run.setdefault(name, []).append(
                {
                    "folder": folder,
                    "seed": seed,
                    "val_loss": loss,
                    "gap_same_recipe_pct": 100 * (loss / same[0] - 1) if same else None,
                    "gap_pct": 100 * (loss / fp32[0] - 1) if fp32 else None,
                }
            )
    rows = []
    for name in sorted(per_run, key=lambda n: (n.split("-", 1)[0] != "fp32", n)):
        runs = per_run[name]
        gaps = [r["gap_same_recipe_pct"] for r in runs if r["gap_same_recipe_pct"] is not None]
        rows.append(
            {
                "run": name,
                "runs": runs,
                "gap_same_recipe_mean_pct": sum(gaps) / len(gaps) if gaps else None,
                "gap_same_recipe_min_pct": min(gaps) if gaps else None,
                "gap_same_recipe_max_pct": max(gaps) if gaps else None,
            }
        )
    if results:
        pathlib.Path(results).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(results).write_text(json.dumps({"folders": folders, "rows": rows}, indent=1))
    return rows


def format_summary(rows: list[dict]) -> str:
    """The seed table: validation loss and gap to the same matmul recipe's FP32, per seed."""
    lines = [
        "| run (matmuls-optimizer) | seeds | val loss per seed | gap to FP32 state, same matmuls "
        "| mean gap |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        seeds = ", ".join(str(x["seed"]) for x in r["runs"])
        losses = " / ".join(f"{x['val_loss']:.4f}" for x in r["runs"])
        gaps = " / ".join(
            "n/a" if x["gap_same_recipe_pct"] is None else f"{x['gap_same_recipe_pct']:+.2f}%"
            for x in r["runs"]
        )
        mean = r["gap_same_recipe_mean_pct"]
        mean = "n/a" if mean is None else f"{mean:+.2f}%"
        lines.append(f"| {r['run']} | {seeds} | {losses} | {gaps} | {mean} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    """Runs the grid and prints the table (or, with ``--summarize``, the seed table)."""
    args = parse_args(argv)
    if args.summarize:
        rows = summarize(args.summarize.split(","), args.results)
        print(format_summary(rows))
        return rows
    rows = run(args)
    table = format_table(rows)
    (pathlib.Path(args.out) / "table.md").write_text(table + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
