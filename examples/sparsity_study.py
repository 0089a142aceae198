"""N:M activation sparsity on two pretrained models, alone and with MX weights and activations.

The setting of Amber Pruner (An et al. 2025, arXiv:2508.02128): no
training, the activation operand of a model's linear layers made N:M sparse
on every call (2:4, 4:8, 8:16: half of the activations become zero), each
activation ranked by its magnitude or by Amber's weight-aware score
(``jaxmx.NMSparsity(score="amber")``, docs/sparsity.md). A subset of the
linear layers is sparse (``--layers``); by default the projections that read
the normalized residual stream (q, k, v, and the MLP's gate and up), while
attention's output projection and the MLP's down projection stay dense, as
do attention's q.k and p.v products and the tied output head.

The same two evaluations as examples/ptq_study.py, reused from it:

* SmolLM2-135M-Instruct, perplexity on 8 windows of 512 tokens of the World
  English Bible's Acts. Its "FP32" baseline is the published 4-bit GGUF
  dequantized to float32, not the bf16 original.
* all-MiniLM-L6-v2, cosine similarity of each embedding to its FP32
  embedding (and KJV/WEB retrieval recall@1) over 998 verse pairs.

Every configuration (:class:`Config`) is a set of ``jaxmx.intercept`` rules
on ``model.apply``: each linear layer of a sparse role gets
``DotConfig(lhs=fmt, rhs=fmt, lhs_sparsity=NMSparsity(n, m, score))``, the
other linear layers ``DotConfig(lhs=fmt, rhs=fmt)`` (FP32 when there is no
format); ``weights="kernel|embedding"`` names the weights, so the activation
is the sparse operand. The fraction of the linear layers' FLOPs that is
sparse is computed from the model's parameter shapes (:func:`flop_fractions`).

Results go to ``runs/sparsity_study/sparsity_study.json`` one configuration
at a time (a rerun skips what is there), then to a Markdown table and a plot
next to it; ``--publish`` also writes the copies the documentation shows
(``docs/studies/sparsity_results.{json,md}``, ``docs/img/sparsity_study.png``)::

    python examples/sparsity_study.py                # the full grid (hours on 2 shared cores)
    python examples/sparsity_study.py --quick        # a smoke run: 2 x 128 tokens, 64 pairs
    python examples/sparsity_study.py --layers all   # every projection sparse
    python examples/sparsity_study.py --report-only  # redraw the table and plot
    python examples/sparsity_study.py --report-only --publish  # and the docs copies
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from examples.requires import PRETRAINED, missing, require

if __name__ == "__main__":  # every missing package named at once, before any import
    require("flax", later=[*PRETRAINED["smollm2"], *PRETRAINED["minilm"], "tqdm", "matplotlib"])

import jaxmx
from examples import pretrained, ptq_study

REPO = pathlib.Path(__file__).resolve().parent.parent
RUNS = REPO / "runs" / "sparsity_study"  # where a run writes, unless --publish
# The copies the documentation shows (--publish).
RESULTS = REPO / "docs" / "studies" / "sparsity_results.json"
REPORT = REPO / "docs" / "studies" / "sparsity_results.md"
PLOT = REPO / "docs" / "img" / "sparsity_study.png"

PATTERNS = ((2, 4), (4, 8), (8, 16))
SCORES = ("magnitude", "amber")
# Quantization of every linear layer's weights and activations: name -> jaxmx format.
QUANT: dict[str, str | None] = {
    "fp32": None,
    "mxint8": "mxint8",
    "mxfp8": "mxfp8_e4m3",
    "mx9": "mx9",
}
# The linear layers of each model by role: a regular expression found in the
# argument path of the layer's weight ("params/layers_0/self_attn/q_proj/kernel").
ROLES: dict[str, dict[str, str]] = {
    "smollm2": {
        "q": r"/self_attn/q_proj/kernel$",
        "k": r"/self_attn/k_proj/kernel$",
        "v": r"/self_attn/v_proj/kernel$",
        "o": r"/self_attn/o_proj/kernel$",
        "gate": r"/mlp/gate_proj/kernel$",
        "up": r"/mlp/up_proj/kernel$",
        "down": r"/mlp/down_proj/kernel$",
    },
    "minilm": {
        "q": r"/attention/query/kernel$",
        "k": r"/attention/key/kernel$",
        "v": r"/attention/value/kernel$",
        "o": r"/attention/output/kernel$",
        "up": r"layer_\d+/intermediate/kernel$",
        "down": r"layer_\d+/output/kernel$",
    },
}
# The output head, a linear layer that always stays dense (SmolLM2's is tied
# to the token embedding: logits = x @ embedding.T). MiniLM has none.
HEADS: dict[str, str | None] = {"smollm2": r"^params/embed_tokens/embedding$", "minilm": None}
ALL_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
# The projections that read the normalized residual stream; o and down stay dense.
DEFAULT_LAYERS = ("q", "k", "v", "gate", "up")
WEIGHTS = r"kernel|embedding"  # intercept(weights=...): which operand is the weight


# --- Configurations ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """One run: a quantization and, optionally, an N:M pattern on some layers' activations.

    >>> Config(quant="mxfp8", pattern=(8, 16), score="amber").key
    'mxfp8/8:16/amber/q,k,v,gate,up'
    >>> Config().key
    'fp32/dense'
    """

    # Key of QUANT: the format of every linear layer's weights and activations.
    quant: str = "fp32"
    # (n, m): keep n of every m activations; None: dense.
    pattern: tuple[int, int] | None = None
    # How activations are ranked within a group: "magnitude" or "amber".
    score: str = "magnitude"
    # Roles (ALL_ROLES) whose activations are sparse.
    layers: tuple[str, ...] = DEFAULT_LAYERS

    def __post_init__(self):
        if self.quant not in QUANT:
            raise ValueError(f"Config.quant must be one of {sorted(QUANT)}, got {self.quant!r}")
        if self.score not in SCORES:
            raise ValueError(f"Config.score must be one of {SCORES}, got {self.score!r}")
        unknown = sorted(set(self.layers) - set(ALL_ROLES))
        if unknown or not self.layers:
            raise ValueError(f"Config.layers must be roles among {ALL_ROLES}, got {self.layers!r}")
        if self.pattern is not None:
            jaxmx.NMSparsity(*self.pattern)  # validates n and m
            object.__setattr__(self, "pattern", tuple(self.pattern))
        object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def key(self) -> str:
        """A stable identifier (the results JSON is keyed by it)."""
        if self.pattern is None:
            return f"{self.quant}/dense"
        n, m = self.pattern
        return f"{self.quant}/{n}:{m}/{self.score}/{','.join(self.layers)}"

    def sparsity(self) -> jaxmx.NMSparsity | None:
        if self.pattern is None:
            return None
        return jaxmx.NMSparsity(*self.pattern, score=self.score)

    def rules(self, roles: Mapping[str, str]) -> list[tuple[str, jaxmx.DotConfig | None]]:
        """``jaxmx.intercept`` rules: one per role of ``roles`` (a model's :data:`ROLES`).

        A matmul no rule matches (attention's q.k and p.v, the output head)
        stays in high precision.
        """
        fmt = QUANT[self.quant]
        dense = None if fmt is None else jaxmx.DotConfig(lhs=fmt, rhs=fmt)
        sparse = (dense or jaxmx.DotConfig()).replace(lhs_sparsity=self.sparsity())
        return [
            (pattern, sparse if self.pattern is not None and role in self.layers else dense)
            for role, pattern in roles.items()
        ]


def grid(
    quants: Sequence[str],
    patterns: Sequence[tuple[int, int]],
    scores: Sequence[str],
    layer_sets: Sequence[Sequence[str]] = (DEFAULT_LAYERS,),
) -> list[Config]:
    """Each quantization dense, then with every pattern, score and layer set (the table's order)."""
    out = []
    for q in quants:
        out.append(Config(quant=q))
        out += [
            Config(quant=q, pattern=p, score=s, layers=tuple(ls))
            for ls in layer_sets
            for p in patterns
            for s in scores
        ]
    return out


def apply_config(model, params, config: Config, roles: Mapping[str, str]) -> ptq_study.Quantized:
    """``model.apply`` with ``config``'s matmuls (``jaxmx.intercept``); FP32 dense as it is."""
    if config.key == "fp32/dense":
        return ptq_study.Quantized(model.apply, params)
    rules = config.rules(roles)
    if config.pattern is not None and config.score == "amber":
        # Amber's weight factors once per weight, not on every call (a sort of
        # every weight); the same numbers, so the same masks and outputs.
        rules = jaxmx.precompute_amber(rules, params)
    fn = jaxmx.intercept(model.apply, rules, weights=WEIGHTS, warn=False)
    return ptq_study.Quantized(fn, params)


# --- FLOPs -------------------------------------------------------------------------


def _paths(params: Any) -> dict[str, tuple[int, ...]]:
    """``{"params/layers_0/mlp/up_proj/kernel": shape}`` of every leaf."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        out[name] = tuple(leaf.shape)
    return out


def flop_fractions(
    params: Any, roles: Mapping[str, str], layers: Sequence[str], head: str | None = None
) -> dict[str, float]:
    """Share of the linear layers' FLOPs per token that the sparse ``layers`` hold.

    A weight of shape ``(in, out)`` costs ``2 * in * out`` FLOPs per token
    (the head, a ``(vocab, width)`` embedding, ``2 * vocab * width``).
    Attention's q.k and p.v products are not linear layers and are not
    counted. Works on arrays or ``jax.ShapeDtypeStruct`` leaves.

    Returns:
      ``{"blocks": share of the decoder/encoder blocks' projections,
      "with_head": share when the output head is counted too,
      "flops_per_token": the linear layers' FLOPs per token, head included}``.
    """
    shapes = _paths(params)
    per_role = {role: 0 for role in roles}
    for name, shape in shapes.items():
        for role, pattern in roles.items():
            if re.search(pattern, name):
                per_role[role] += 2 * int(shape[0]) * int(shape[1])
                break
    head_flops = 0
    if head is not None:
        head_flops = sum(2 * s[0] * s[1] for n, s in shapes.items() if re.search(head, n))
    total = sum(per_role.values())
    sparse = sum(f for role, f in per_role.items() if role in layers)
    return {
        "blocks": sparse / total,
        "with_head": sparse / (total + head_flops),
        "flops_per_token": total + head_flops,
    }


ABOUT = (__doc__ or "").split("\n\n")[0]


def load_results(path: pathlib.Path) -> dict:
    """The results JSON at ``path`` (an empty one if there is none yet)."""
    return ptq_study.load_results(path) if path.exists() else {"about": ABOUT, "models": {}}


# --- Running ----------------------------------------------------------------------------


def _summary(model: str, run: dict) -> str:
    if model == "smollm2":
        return f"ppl {run['ppl']:.3f}"
    return f"cos {run['cos_mean']:.5f} (min {run['cos_min']:.4f})"


def _evaluate(name: str, evaluation: Any, q: ptq_study.Quantized, batch: int, progress) -> dict:
    if name != "smollm2":
        return evaluation.run(q, progress=progress)
    # Several windows per call (amber's weight factors are precomputed, see
    # apply_config; batching still amortizes each call's fixed costs).
    nll, n = pretrained.lm_nll(
        q.apply_fn, q.params, evaluation.windows, batch_size=batch, progress=progress
    )
    return {"nll": nll, "predictions": n, "ppl": float(np.exp(nll / n))}


def todo(entry: dict, configs: Sequence[Config]) -> list[Config]:
    """The configurations whose result is not in ``entry["runs"]`` yet (resume)."""
    return [c for c in configs if c.key not in entry["runs"]]


def run_study(
    *,
    models: Sequence[str],
    configs: Mapping[str, Sequence[Config]],
    windows: int,
    length: int,
    pairs: int | None,
    out: pathlib.Path,
    fresh: bool = False,
    batch: int = 8,
) -> dict:
    """Runs every missing (model, configuration) and saves after each one."""
    from tqdm.auto import tqdm

    results = {"about": ABOUT, "models": {}} if fresh or not out.exists() else load_results(out)
    machine = ptq_study._machine()
    for name in models:
        if name == "smollm2":
            evaluation: Any = ptq_study.LMEval.load(windows, length)
        else:
            evaluation = ptq_study.EmbedEval.load(pairs)
        entry = results["models"].setdefault(name, {"spec": evaluation.spec, "runs": {}})
        if entry["spec"] != evaluation.spec:
            raise SystemExit(
                f"{out} holds {name} results for another evaluation:\n  {entry['spec']}\n"
                f"now:\n  {evaluation.spec}\nuse --fresh or another --out"
            )
        params = evaluation.pre.params
        wanted = configs[name]
        left = todo(entry, wanted)
        print(
            f"{name}: {len(wanted) - len(left)} of {len(wanted)} configs done, {len(left)} to run"
        )
        for config in tqdm(left, desc=name, unit="config"):
            start = time.perf_counter()
            load_before = os.getloadavg()[0]
            q = apply_config(evaluation.pre.model, params, config, ROLES[name])
            with tqdm(total=evaluation.units, desc=config.key, leave=False) as bar:
                metrics = _evaluate(name, evaluation, q, batch, bar.update)
            fractions = flop_fractions(params, ROLES[name], config.layers, HEADS[name])
            entry["runs"][config.key] = {
                "config": dataclasses.asdict(config),
                **metrics,
                "sparse_flops": {k: v for k, v in fractions.items() if k != "flops_per_token"}
                if config.pattern is not None
                else {"blocks": 0.0, "with_head": 0.0},
                "seconds": round(time.perf_counter() - start, 1),
                "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "jaxmx_commit": machine["jaxmx_commit"],
            }
            entry["machine"] = machine
            ptq_study.save_results(results, out)
            tqdm.write(f"  {config.key}: {_summary(name, entry['runs'][config.key])}")
    return results


# --- Report ---------------------------------------------------------------------------------


def _order(key: str) -> tuple:
    quant, rest = key.split("/", 1)
    qi = list(QUANT).index(quant) if quant in QUANT else len(QUANT)
    if rest == "dense":
        return (qi, "", 0, "")
    pattern, score, layers = rest.split("/")
    m = int(pattern.split(":")[1])
    return (qi, layers, m, SCORES.index(score) if score in SCORES else len(SCORES))


def table_rows(results: dict) -> list[dict]:
    """One row per configuration run on either model, in the table's order."""
    models = results["models"]
    keys = sorted({k for e in models.values() for k in e["runs"]}, key=_order)
    lm = models.get("smollm2", {}).get("runs", {})
    emb = models.get("minilm", {}).get("runs", {})
    rows = []
    for key in keys:
        run = lm.get(key) or emb.get(key)
        c = run["config"]
        dense_same = lm.get(f"{c['quant']}/dense")
        row = {
            "key": key,
            "quant": c["quant"],
            "pattern": "dense" if c["pattern"] is None else "{}:{}".format(*c["pattern"]),
            "score": "-" if c["pattern"] is None else c["score"],
            "layers": "-" if c["pattern"] is None else ",".join(c["layers"]),
            "sparse_flops": lm.get(key, run)["sparse_flops"],
            "ppl": lm[key]["ppl"] if key in lm else None,
            "vs_fp32": None,
            "vs_dense": None,
            "cos": emb[key]["cos_mean"] if key in emb else None,
        }
        if row["ppl"] is not None and "fp32/dense" in lm:
            row["vs_fp32"] = 100 * (row["ppl"] / lm["fp32/dense"]["ppl"] - 1)
        if row["ppl"] is not None and dense_same is not None:
            row["vs_dense"] = 100 * (row["ppl"] / dense_same["ppl"] - 1)
        rows.append(row)
    return rows


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def report(results: dict, md_path: pathlib.Path, png_path: pathlib.Path | None) -> str:
    """Writes the Markdown table (and the plot) from the results; returns the Markdown."""
    models = results["models"]
    lines = [
        "# N:M activation sparsity: results",
        "",
        "Generated by `python examples/sparsity_study.py` (do not edit). Each row: the",
        "activations of the sparse layers made N:M sparse on every call (2:4, 4:8 and 8:16",
        "all zero half of them), ranked by magnitude or by Amber Pruner's weight-aware score,",
        "with every linear layer's weights and activations in FP32 or an MX format. Attention's",
        "q.k and p.v products and SmolLM2's tied output head stay FP32 in every row.",
        "",
    ]
    if png_path is not None:
        rel = os.path.relpath(png_path, md_path.parent)
        lines += [f"![N:M activation sparsity]({rel})", ""]
    lm = models.get("smollm2")
    if lm is not None:
        spec = lm["spec"]
        lines += [
            f"**SmolLM2-135M**: perplexity on {spec['windows']} windows of {spec['length']} "
            f"tokens of {spec['text']} ({spec['predictions']} predictions). "
            f"**The FP32 baseline is not the bf16 model:** {spec['baseline_note']}.",
            "",
        ]
    emb = models.get("minilm")
    if emb is not None:
        spec = emb["spec"]
        lines += [
            f"**all-MiniLM-L6-v2**: mean cosine similarity of each embedding to its FP32 "
            f"embedding over {2 * spec['pairs']} Bible verses (KJV and WEB).",
            "",
        ]
    lines += [
        "Columns: *sparse FLOPs*, the share of the linear layers' FLOPs per token in sparse",
        "layers (SmolLM2's decoder projections; in parentheses with the output head counted);",
        "*vs FP32*, perplexity change against the dense FP32 model; *vs dense*, against the",
        "dense model of the same format (the cost of the sparsity alone).",
        "",
        "| format | pattern | score | sparse layers | sparse FLOPs | perplexity | vs FP32 "
        "| vs dense | MiniLM cosine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table_rows(results):
        fl = r["sparse_flops"]
        flops = "0%" if r["pattern"] == "dense" else f"{100 * fl['blocks']:.1f}%"
        if r["pattern"] != "dense" and fl["with_head"] != fl["blocks"]:
            flops += f" ({100 * fl['with_head']:.1f}%)"
        lines.append(
            f"| {r['quant']} | {r['pattern']} | {r['score']} | {r['layers']} | {flops} "
            f"| {_fmt(r['ppl'], '.3f')} | {_fmt(r['vs_fp32'], '+.1f', '%')} "
            f"| {_fmt(r['vs_dense'], '+.1f', '%')} | {_fmt(r['cos'], '.5f')} |"
        )
    lines.append("")
    secs = [r["seconds"] for e in models.values() for r in e["runs"].values()]
    loads = [x for e in models.values() for r in e["runs"].values() for x in r["load_avg_1min"]]
    versions = sorted({r["jaxmx_commit"] for e in models.values() for r in e["runs"].values()})
    machine = next((e["machine"] for e in models.values() if "machine" in e), None)
    if machine and secs:
        lines += [
            f"Measured with jax {machine['jax']}, jaxmx {' and '.join(versions)} on "
            f"{machine['backend']} ({machine['cpus']} cores, shared: 1-minute load average "
            f"{min(loads):.1f} to {max(loads):.1f}); {sorted(secs)[len(secs) // 2]:.0f} s per "
            "configuration (median).",
            "",
        ]
    text = "\n".join(lines)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    if png_path is not None:
        plot(results, png_path)
    return text


def plot(results: dict, path: pathlib.Path) -> None:
    """Perplexity (SmolLM2) and 1 - cosine (MiniLM) against the pattern, per score and format."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    rows = table_rows(results)
    # A row of panels per set of sparse layers run with more than one pattern (sets
    # run with one pattern only, a sensitivity sweep, are in the table).
    layer_sets = sorted(
        ls
        for ls in {r["layers"] for r in rows if r["layers"] != "-"}
        if len({r["pattern"] for r in rows if r["layers"] == ls}) > 1
    )
    panels = [
        (
            "ppl",
            "SmolLM2-135M: perplexity",
            "perplexity (no unit; lower is better)",
            lambda v: v,
        ),
        (
            "cos",
            "all-MiniLM-L6-v2: embedding error",
            "1 - cosine similarity to FP32 (no unit)",
            lambda v: 1 - v,
        ),
    ]
    panels = [p for p in panels if any(r[p[0]] is not None for r in rows)]
    if not panels or not layer_sets:
        return
    patterns = ["dense"] + [f"{n}:{m}" for n, m in PATTERNS]
    colors = {"fp32": "#000000", "mxint8": "#1b9e77", "mxfp8": "#d95f02", "mx9": "#7570b3"}
    styles = {"magnitude": "--", "amber": "-"}
    markers = {"magnitude": "o", "amber": "s"}
    fig = Figure(figsize=(5.0 * len(panels), 3.6 * len(layer_sets) + 0.8), layout="constrained")
    axes = fig.subplots(len(layer_sets), len(panels), squeeze=False)
    for i, layers in enumerate(layer_sets):
        for j, (field, title, unit, value) in enumerate(panels):
            ax = axes[i][j]
            for quant in QUANT:
                dense = next(
                    (r for r in rows if r["quant"] == quant and r["pattern"] == "dense"), None
                )
                for score in SCORES:
                    pts = [(0, dense[field])] if dense and dense[field] is not None else []
                    for x, p in enumerate(patterns[1:], start=1):
                        r = next(
                            (
                                r
                                for r in rows
                                if r["quant"] == quant
                                and r["pattern"] == p
                                and r["score"] == score
                                and r["layers"] == layers
                            ),
                            None,
                        )
                        if r is not None and r[field] is not None:
                            pts.append((x, r[field]))
                    # FP32 dense is the cosine's reference (1 - cos = 0): off a log axis.
                    pts = [(x, v) for x, v in pts if value(v) > 0]
                    if len(pts) < 2:
                        continue
                    ax.plot(
                        [x for x, _ in pts],
                        [value(v) for _, v in pts],
                        styles[score],
                        marker=markers[score],
                        color=colors.get(quant, "#888888"),
                        label=f"{quant} W+A, {score}" if quant != "fp32" else f"FP32, {score}",
                    )
            ax.set_xticks(range(len(patterns)), patterns)
            ax.set_xlabel("activation pattern (n kept of every m; 50% zeros)")
            ax.set_ylabel(unit)
            ax.set_yscale("log")
            if field == "ppl":  # plain numbers on the log axis, not powers of ten
                plain = FuncFormatter(lambda v, _: f"{v:g}")
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(plain)
                ax.tick_params(axis="y", which="minor", labelsize=7)
            ax.set_title(f"{title}\nsparse layers: {layers}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
    handles, labels = {}, {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
            labels[lab] = lab
    # Below the panels, in the constrained layout: it covers no data.
    fig.legend(
        list(handles.values()),
        list(labels),
        loc="outside lower center",
        ncol=2 * len(panels),
        fontsize=8,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(path))


# --- CLI -----------------------------------------------------------------------------------


def parse_patterns(text: str) -> list[tuple[int, int]]:
    """``"2:4,8:16"`` -> ``[(2, 4), (8, 16)]``.

    >>> parse_patterns("2:4,8:16")
    [(2, 4), (8, 16)]
    """
    out = []
    for part in (p for p in text.split(",") if p):
        n, sep, m = part.partition(":")
        if not sep or not n.isdigit() or not m.isdigit():
            raise ValueError(f"a pattern is n:m, such as 2:4; got {part!r}")
        out.append((int(n), int(m)))
    return out


def parse_layers(text: str) -> tuple[str, ...]:
    """``"q,k,v"`` -> ``("q", "k", "v")``; ``"all"``: every role.

    >>> parse_layers("all")
    ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
    """
    if text == "all":
        return ALL_ROLES
    roles = tuple(r for r in text.split(",") if r)
    unknown = sorted(set(roles) - set(ALL_ROLES))
    if unknown or not roles:
        raise ValueError(f"unknown layer roles {unknown}; known: {', '.join(ALL_ROLES)} or 'all'")
    return roles


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="smollm2,minilm", help="comma list: smollm2, minilm")
    parser.add_argument(
        "--patterns", default="2:4,4:8,8:16", help="comma list of N:M activation patterns"
    )
    parser.add_argument(
        "--scores", default=",".join(SCORES), help="comma list of scores: magnitude, amber"
    )
    parser.add_argument(
        "--quant",
        default=",".join(QUANT),
        help=f"SmolLM2: comma list of weight+activation formats among {', '.join(QUANT)}",
    )
    parser.add_argument(
        "--minilm-quant",
        default="fp32,mxfp8",
        help="MiniLM: comma list of weight+activation formats (same names as --quant)",
    )
    parser.add_argument(
        "--layers",
        action="append",
        default=None,
        help=f"sparse roles, comma list of {', '.join(ALL_ROLES)} or 'all' (repeatable: "
        f"one set of rows each; default {','.join(DEFAULT_LAYERS)})",
    )
    parser.add_argument("--windows", type=int, default=8, help="SmolLM2 eval windows")
    parser.add_argument("--length", type=int, default=512, help="tokens per window")
    parser.add_argument("--pairs", type=int, default=None, help="MiniLM verse pairs (default all)")
    parser.add_argument(
        "--batch",
        type=int,
        default=8,
        help="SmolLM2 windows per call",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        help=f"results JSON; the table (.md) and plot (.png) go next to it "
        f"(default {RUNS.relative_to(REPO)}/sparsity_study.json)",
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help=f"also write the docs copies of the results: {RESULTS.relative_to(REPO)}, "
        f"{REPORT.relative_to(REPO)}, {PLOT.relative_to(REPO)}",
    )
    parser.add_argument("--fresh", action="store_true", help="ignore earlier results in --out")
    parser.add_argument(
        "--report-only", action="store_true", help="redraw the table and plot from --out"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 windows of 128 tokens and 64 pairs, into "
        f"{RUNS.relative_to(REPO)}/quick.json",
    )
    args = parser.parse_args(argv)
    if args.publish and args.quick:
        parser.error("--publish writes the docs copies of the full study: it does not take --quick")
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    models = split(args.models)
    unknown = sorted(set(models) - set(PRETRAINED))
    if unknown:
        parser.error(f"unknown --models {unknown}; known: {', '.join(sorted(PRETRAINED))}")
    try:
        patterns = parse_patterns(args.patterns)
        layer_sets = [parse_layers(t) for t in (args.layers or [",".join(DEFAULT_LAYERS)])]
        quants = {"smollm2": split(args.quant), "minilm": split(args.minilm_quant)}
        configs = {
            m: grid(quants[m], patterns, split(args.scores), layer_sets)
            for m in ("smollm2", "minilm")
        }
    except ValueError as err:
        parser.error(str(err))
    needs = ["matplotlib"]
    if not args.report_only:
        needs += ["tqdm", *(n for m in models for n in PRETRAINED[m])]
    minilm_only = set(missing(needs)) <= set(PRETRAINED["minilm"]) - set(PRETRAINED["smollm2"])
    require(*needs, alternative="--models smollm2" if minilm_only else None)
    if args.quick:
        args.windows, args.length, args.pairs = 2, 128, 64
    if args.out is None:
        args.out = RUNS / ("quick.json" if args.quick else "sparsity_study.json")
    md, png = args.out.with_suffix(".md"), args.out.with_suffix(".png")
    if args.report_only:
        results = load_results(args.out)
    else:
        results = run_study(
            models=models,
            configs=configs,
            windows=args.windows,
            length=args.length,
            pairs=args.pairs,
            out=args.out,
            fresh=args.fresh,
            batch=args.batch,
        )
    print(report(results, md, png))
    print(f"wrote {args.out}, {md}, {png}")
    if args.publish:
        ptq_study.save_results(results, RESULTS)
        report(results, REPORT, PLOT)
        print(f"published {RESULTS}, {REPORT}, {PLOT}")


if __name__ == "__main__":
    main()
