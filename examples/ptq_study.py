"""Post-training MX: direct-cast accuracy of two pretrained models, every format.

Two models, loaded offline by :mod:`examples.pretrained`:

* SmolLM2-135M-Instruct, perplexity on held-out text: 8 windows of 512
  tokens at evenly spaced offsets over the World English Bible's Acts of
  the Apostles (4,088 scored predictions). Its "FP32" baseline is the
  published 4-bit GGUF (llama.cpp Q4_1, embedding Q8_0) dequantized to
  float32, not the bf16 original: every figure here is relative to those
  weights.
* all-MiniLM-L6-v2, on 998 parallel verses (every 31st verse of the Bible,
  both translations at least 6 words) of the King James Version and the
  World English Bible: cosine similarity of each quantized embedding to its
  FP32 embedding (all 1,996 sentences), and retrieval recall@1 (each KJV
  verse retrieves its WEB rendering among the 998, and back).

A recipe (:class:`Recipe`) names the element format, weights only or
weights and activations, the scale rule (floor = OCP, rceil), the scope
(``"dense"``: the Flax Dense layers by module substitution, so attention's
q.k / p.v einsums and the tied output head stay FP32; ``"all"``: every
matmul of the function, through jaxmx's jaxpr-level interception) and the
method (``"direct"`` cast; PTQ methods register in :data:`METHODS`). Every
recipe goes through one function, :func:`apply_recipe`.

Results go to ``runs/ptq_study/ptq_study.json`` one run at a time (a rerun
resumes), then to a Markdown table and a plot next to it; ``--publish``
writes the copies the documentation shows instead (``docs/results/ptq_study.json``
and ``.md``, ``docs/img/ptq_study.png``)::

    python examples/ptq_study.py                  # dense scope (~45 min on 2 shared cores)
    python examples/ptq_study.py --scope all      # every matmul (jaxmx.intercept)
    python examples/ptq_study.py --quick          # a smoke run (~2 min)
    python examples/ptq_study.py --report-only    # redraw the table and plot
    python examples/ptq_study.py --publish        # add to the docs copies (make ptq-study)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from examples.requires import PRETRAINED, missing, require

if __name__ == "__main__":  # every missing package named at once, before any import
    require("flax", later=[*PRETRAINED["smollm2"], *PRETRAINED["minilm"], "tqdm", "matplotlib"])

import jaxmx
import jaxmx.flax
from examples import pretrained

REPO = pathlib.Path(__file__).resolve().parent.parent
RUNS = REPO / "runs" / "ptq_study"  # where a run writes, unless --publish
# The copies the documentation shows (--publish).
RESULTS = REPO / "docs" / "results" / "ptq_study.json"
REPORT = REPO / "docs" / "results" / "ptq_study.md"
PLOT = REPO / "docs" / "img" / "ptq_study.png"

# The OCP MX v1.0 formats of the study, in the table's order.
FORMATS = ("mxfp8_e4m3", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8")
# Formats other work adds to jaxmx (NVIDIA's NVFP4; the MX9/MX6 shared-
# microexponent formats of Rouhani et al. 2023a). Each is run as soon as
# jaxmx.list_formats() has it, and skipped (and said so) until then.
PENDING_FORMATS = ("nvfp4", "mx9", "mx6")
MODES = {"w": "weights only", "wa": "weights + activations"}
SCALE_MODES = ("floor", "rceil")


# --- Recipes ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """One way of running a pretrained model in MX.

    >>> Recipe(fmt="mxfp4_e2m1", mode="w").key
    'dense/direct/mxfp4_e2m1/w/floor'
    >>> Recipe(fmt=None).key
    'fp32'
    """

    # Element format (a jaxmx format name); None: the FP32 baseline.
    fmt: str | None
    # "w": weights only (x @ W quantizes W); "wa": weights and activations.
    mode: str = "wa"
    # Shared-exponent rule: "floor" (OCP) or "rceil" (NVIDIA, never clips).
    scale_mode: str = "floor"
    # "dense": Flax matmul layers by module substitution (quantize_model);
    # "all": every dot_general the model runs (jaxpr-level interception).
    scope: str = "dense"
    # "direct" cast; post-training methods (GPTQ, Hadamard rotations, scale
    # search) register in METHODS under their own names.
    method: str = "direct"
    # Module-path patterns kept in high precision.
    keep: tuple[str, ...] = ()

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Recipe.mode must be one of {sorted(MODES)}, got {self.mode!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"Recipe.scope must be one of {sorted(SCOPES)}, got {self.scope!r}")
        if self.method not in METHODS:
            raise ValueError(f"Recipe.method must be one of {sorted(METHODS)}, got {self.method!r}")

    @property
    def key(self) -> str:
        """A stable identifier (the results JSON is keyed by it)."""
        if self.fmt is None:
            return "fp32"
        keep = f"/keep={','.join(self.keep)}" if self.keep else ""
        return f"{self.scope}/{self.method}/{self.fmt}/{self.mode}/{self.scale_mode}{keep}"

    def weight_config(self) -> jaxmx.DotConfig | None:
        """The config of a matmul of an activation and a weight (``x @ W``)."""
        if self.fmt is None:
            return None
        lhs = self.fmt if self.mode == "wa" else None
        return jaxmx.DotConfig(lhs=lhs, rhs=self.fmt, scale_mode=self.scale_mode)

    def activation_config(self) -> jaxmx.DotConfig | None:
        """The config of a matmul of two activations (attention's q.k and p.v)."""
        if self.fmt is None or self.mode == "w":
            return None
        return jaxmx.DotConfig(lhs=self.fmt, rhs=self.fmt, scale_mode=self.scale_mode)


class Quantized(NamedTuple):
    """What :func:`apply_recipe` returns."""

    apply_fn: Callable  # apply_fn(params, *inputs, **kwargs), like model.apply
    params: Any  # the variables to call it with (a PTQ method may change them)


def _scope_dense(model, recipe: Recipe) -> Callable:
    # Flax Dense layers only: nn.Embed.attend (the tied head) and jnp.einsum
    # have no injection point, so they stay FP32 whatever the rules say.
    rules = [*((k, None) for k in recipe.keep), (".*", recipe.weight_config())]
    return jaxmx.flax.quantize_model(model, rules, scope="modules").apply


def _intercept_fn() -> Callable | None:
    fn = getattr(jaxmx, "intercept", None)
    if fn is None:
        try:
            import jaxmx.intercept as fn
        except ImportError:
            return None
    return fn if callable(fn) else getattr(fn, "intercept", None)


def _all_rules(recipe: Recipe) -> list:
    # Every dot_general: matmuls with an operand read from the params get the
    # weight config, the others (q.k, p.v) the activation config.
    return [
        *((k, None) for k in recipe.keep),
        ("params/", recipe.weight_config()),
        (".*", recipe.activation_config()),
    ]


def _scope_all(model, recipe: Recipe) -> Callable:
    intercept = _intercept_fn()
    if intercept is None:
        raise NotImplementedError(
            "scope 'all' needs jaxmx's jaxpr-level interception (jaxmx.intercept), "
            "which this jaxmx does not have"
        )
    return intercept(model.apply, _all_rules(recipe), warn=False)


# scope name -> (model, recipe) -> apply_fn: a direct cast at run time.
SCOPES: dict[str, Callable[..., Callable]] = {
    "dense": _scope_dense,
    "all": _scope_all,
}


# --- PTQ methods (jaxmx.ptq.quantize_model) ------------------------------------------
#
# Every method but the direct cast is one call of jaxmx.ptq.quantize_model on
# model.apply with scope "all"'s rules: it finds the weights of the MX matmuls
# in the traced function, collects their Hessians X^T X over the calibration
# windows (the model in FP32), rotates the weights and, inside jaxmx.intercept,
# the activations of their matmuls (hadamard*: block-diagonal Hadamard of the
# format's block size, at most 32), quantizes the weights into MXTensors, and
# returns the function to serve. SmolLM2's output head is tied to the token
# embedding: the table stays FP32 for the lookup and a quantized copy of it
# feeds the head's matmul (jaxmx.ptq.TiedWeight), as the direct recipes of
# scope "all" cast the table at the head's matmul only.

CALIBRATION = {"windows": 4, "length": 512}  # SmolLM2 tokens: Hessians, and the trace

# method name -> keyword arguments of jaxmx.ptq.quantize_model; None: the direct
# cast, which the scope applies at run time.
METHODS: dict[str, dict | None] = {
    "direct": None,
    "search": {"method": "search"},
    "search_h": {"method": "search", "weighted_search": True},
    "hadamard": {"method": "hadamard"},
    "gptq": {"method": "gptq"},
    "gptq_search": {"method": "gptq", "scale_search": True},
    "hadamard_gptq": {"method": "hadamard_gptq"},
    "hadamard_gptq_search": {"method": "hadamard_gptq", "scale_search": True},
    "gptq_act": {"method": "gptq", "act_order": True},
    "hadamard_gptq_act": {"method": "hadamard_gptq", "act_order": True},
}
# Methods whose weights depend on the calibration data (recorded with their runs):
# GPTQ's (on its Hessians) and the Hessian-weighted search's.
CALIBRATED = frozenset(
    name
    for name, options in METHODS.items()
    if options is not None
    and (options["method"].endswith("gptq") or options.get("weighted_search", False))
)


def apply_recipe(model, params, recipe: Recipe, *, calibration: Any = None) -> Quantized:
    """The direct cast of ``recipe``'s scope, or its PTQ method: how every recipe is applied.

    Args:
      model: a ``flax.linen`` module (FP32).
      params: its variables, ``{"params": ...}``.
      recipe: what to do.
      calibration: token windows ``(n, L)`` for the PTQ methods (each window
        one batch; :data:`examples.pretrained.LM_TEXTS` ``["calibration"]``
        for SmolLM2); unused by the direct cast.

    Returns:
      A :class:`Quantized` ``(apply_fn, params)``.

    >>> import jax, jax.numpy as jnp
    >>> from models.llama import Llama, LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=64, width=64, depth=1, heads=2, kv_heads=1, mlp_width=64)
    >>> model, tokens = Llama(cfg), jnp.arange(8)[None]
    >>> params = model.init(jax.random.key(0), tokens)
    >>> q = apply_recipe(model, params, Recipe(fmt="mxfp4_e2m1", mode="w"))
    >>> bool(jnp.allclose(q.apply_fn(q.params, tokens), model.apply(params, tokens)))
    False
    """
    if recipe.fmt is None:
        return Quantized(model.apply, params)
    options = METHODS[recipe.method]
    if options is None:
        return Quantized(SCOPES[recipe.scope](model, recipe), params)
    if recipe.scope != "all":
        # Flax's Dense takes float kernels, not the MXTensors a PTQ method
        # stores; scope "all" (jaxmx.intercept) runs from them as they are.
        raise NotImplementedError(
            "PTQ methods that store MXTensor weights run in scope 'all' (--scope all)"
        )
    if calibration is None:
        raise NotImplementedError(f"method {recipe.method!r} needs calibration token windows")
    windows = np.asarray(calibration)
    serve_fn, qparams = jaxmx.ptq.quantize_model(
        model.apply,
        params,
        [windows[i : i + 1] for i in range(len(windows))],
        _all_rules(recipe),
        packed=False,
        **options,
    )
    return Quantized(serve_fn, qparams)


def available_formats(formats: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(known, unknown)``: which formats this jaxmx has."""
    have = set(jaxmx.list_formats())
    formats = list(formats)
    return [f for f in formats if f in have], [f for f in formats if f not in have]


def recipes_for(
    formats: Sequence[str],
    modes: Sequence[str],
    scales: Sequence[str],
    scope: str,
    method: str,
    keep: Sequence[str] = (),
) -> list[Recipe]:
    """The grid of recipes, format-major (the table's order)."""
    return [
        Recipe(fmt=f, mode=m, scale_mode=s, scope=scope, method=method, keep=tuple(keep))
        for f in formats
        for m in modes
        for s in scales
    ]


# --- Evaluations ----------------------------------------------------------------


@dataclasses.dataclass
class LMEval:
    """SmolLM2 perplexity on fixed token windows of the eval text."""

    pre: pretrained.Pretrained
    windows: np.ndarray  # int32 (n, L)
    spec: dict  # what the windows are, for the results JSON

    @classmethod
    def load(cls, windows: int, length: int) -> LMEval:
        pre = pretrained.load_smollm2()
        translation, book = pretrained.LM_TEXTS["eval"]
        tokens = pretrained.token_windows(
            pre.tokenizer, pretrained.lm_text("eval"), windows=windows, length=length
        )
        spec = {
            "model": "SmolLM2-135M-Instruct",
            "weights": pre.source,
            "baseline_note": "FP32 = the Q4_1 GGUF (Q8_0 embedding) dequantized to float32",
            "text": f"{translation.upper()} {book} "
            f"(SWORD module {pretrained.SWORD_MODULES[translation]})",
            "windows": windows,
            "length": length,
            "selection": "windows at evenly spaced token offsets over the whole book",
            "predictions": int(windows * (length - 1)),
            "first_tokens": tokens[:, :4].tolist(),
        }
        return cls(pre, tokens, spec)

    def calibration(self) -> np.ndarray:
        """Token windows of the calibration text (another book than the eval text)."""
        if not hasattr(self, "_calibration"):
            self._calibration = pretrained.token_windows(
                self.pre.tokenizer, pretrained.lm_text("calibration"), **CALIBRATION
            )
        return self._calibration

    def calibration_spec(self) -> dict:
        translation, book = pretrained.LM_TEXTS["calibration"]
        return {"text": f"{translation.upper()} {book}", **CALIBRATION}

    def run(self, q: Quantized, progress=None) -> dict:
        nll, n = pretrained.lm_nll(q.apply_fn, q.params, self.windows, progress=progress)
        return {"nll": nll, "predictions": n, "ppl": float(np.exp(nll / n))}

    @property
    def units(self) -> int:
        return len(self.windows)


@dataclasses.dataclass
class EmbedEval:
    """MiniLM embeddings of parallel KJV/WEB verses: fidelity to FP32 and retrieval."""

    pre: pretrained.Pretrained
    sentences: list[str]  # KJV verses, then their WEB renderings in the same order
    reference: np.ndarray  # FP32 embeddings of `sentences`
    spec: dict

    @classmethod
    def load(cls, pairs: int | None) -> EmbedEval:
        pre = pretrained.load_minilm()
        chosen = pretrained.bible_pairs()[:pairs]
        sentences = [p[1] for p in chosen] + [p[2] for p in chosen]
        spec = {
            "model": "all-MiniLM-L6-v2",
            "weights": pre.source,
            "pairs": len(chosen),
            "selection": (
                f"one verse in {pretrained.BIBLE_STRIDE} (KJV versification, indices 0, "
                f"{pretrained.BIBLE_STRIDE}, ..., from Gen 1:1), "
                f"kept if both KJV and WEB have >= {pretrained.BIBLE_MIN_WORDS} words"
            ),
            "first_refs": [p[0] for p in chosen[:3]],
        }
        reference = cls._embed(pre, Quantized(pre.model.apply, pre.params), sentences)
        return cls(pre, sentences, reference, spec)

    @staticmethod
    def _embed(pre, q: Quantized, sentences, progress=None) -> np.ndarray:
        return pretrained.embed_sentences(
            q.apply_fn,
            q.params,
            pre.tokenizer,
            sentences,
            max_len=pre.config.max_len,
            progress=progress,
        )

    def run(self, q: Quantized, progress=None) -> dict:
        emb = self._embed(self.pre, q, self.sentences, progress)
        cos = np.sum(emb * self.reference, axis=-1) / (
            np.linalg.norm(emb, axis=-1) * np.linalg.norm(self.reference, axis=-1)
        )
        n = len(self.sentences) // 2
        return {
            "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min()),
            "recall1_kjv_to_web": pretrained.retrieval_recall_at_1(emb[:n], emb[n:]),
            "recall1_web_to_kjv": pretrained.retrieval_recall_at_1(emb[n:], emb[:n]),
        }

    @property
    def units(self) -> int:
        return len(self.sentences)


# --- Results file -----------------------------------------------------------------


def load_results(path: pathlib.Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"about": __doc__.split("\n\n")[0], "models": {}}


def save_results(results: dict, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)  # never a half-written file, whenever the run stops


def _machine() -> dict:
    try:  # the jaxmx commit, "+" if the working tree had changes
        git = ["git", "-C", str(REPO)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "jaxmx"], capture_output=True, text=True
        )
        commit = head.stdout.strip() + ("+" if dirty.stdout.strip() else "")
    except OSError:
        commit = "unknown"
    return {
        "jax": jax.__version__,
        "jaxmx_commit": commit,
        "backend": jax.default_backend(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def run_study(
    *,
    models: Sequence[str],
    formats: Sequence[str],
    modes: Sequence[str],
    scales: Sequence[str],
    scope: str,
    method: str,
    windows: int,
    length: int,
    pairs: int | None,
    out: pathlib.Path,
    fresh: bool = False,
    keep: Sequence[str] = (),
) -> dict:
    """Runs every missing (model, recipe) and saves after each one."""
    from tqdm.auto import tqdm

    results = {"about": __doc__.split("\n\n")[0], "models": {}} if fresh else load_results(out)
    known, unknown = available_formats(formats)
    for f in unknown:
        print(f"skipping {f}: not a jaxmx format yet (jaxmx.list_formats())")
    grid = [Recipe(fmt=None)] + recipes_for(known, modes, scales, scope, method, keep)
    machine = _machine()
    for name in models:
        evaluation = LMEval.load(windows, length) if name == "smollm2" else EmbedEval.load(pairs)
        entry = results["models"].setdefault(name, {"spec": evaluation.spec, "runs": {}})
        if entry["spec"] != evaluation.spec:
            raise SystemExit(
                f"{out} holds {name} results for another evaluation:\n  {entry['spec']}\n"
                f"now:\n  {evaluation.spec}\nuse --fresh or another --out"
            )
        todo = [r for r in grid if r.key not in entry["runs"]]
        print(f"{name}: {len(grid) - len(todo)} of {len(grid)} recipes done, {len(todo)} to run")
        for recipe in tqdm(todo, desc=name, unit="recipe"):
            start = time.perf_counter()
            load_before = os.getloadavg()[0]
            calibrated = recipe.method in CALIBRATED and hasattr(evaluation, "calibration")
            traced = METHODS[recipe.method] is not None and hasattr(evaluation, "calibration")
            try:
                q = apply_recipe(
                    evaluation.pre.model,
                    evaluation.pre.params,
                    recipe,
                    calibration=evaluation.calibration() if traced else None,
                )
            except (NotImplementedError, ValueError) as err:
                tqdm.write(f"  {recipe.key}: skipped ({err})")
                continue
            try:
                with tqdm(total=evaluation.units, desc=recipe.key, leave=False) as bar:
                    metrics = evaluation.run(q, progress=bar.update)
            except ValueError as err:  # e.g. NVFP4 refusing a partial block of activations
                tqdm.write(f"  {recipe.key}: skipped ({str(err).splitlines()[0]})")
                continue
            entry["runs"][recipe.key] = {
                "recipe": dataclasses.asdict(recipe),
                **metrics,
                "seconds": round(time.perf_counter() - start, 1),
                "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "jaxmx_commit": machine["jaxmx_commit"],
                **({"calibration": evaluation.calibration_spec()} if calibrated else {}),
            }
            entry["machine"] = machine
            save_results(results, out)
            tqdm.write(f"  {recipe.key}: {_summary(name, entry['runs'][recipe.key])}")
    return results


def _summary(model: str, run: dict) -> str:
    if model == "smollm2":
        return f"ppl {run['ppl']:.3f}"
    return (
        f"cos {run['cos_mean']:.5f} (min {run['cos_min']:.4f}), "
        f"R@1 {run['recall1_kjv_to_web']:.3f}/{run['recall1_web_to_kjv']:.3f}"
    )


# --- Report -------------------------------------------------------------------------

_COLUMNS = [(m, s) for m in MODES for s in SCALE_MODES]
_SHORT = {"w": "W", "wa": "W+A"}


def _cell(model: str, run: dict | None, base: dict) -> str:
    if run is None:
        return "-"
    if model == "smollm2":
        return f"{run['ppl']:.2f} ({100 * (run['ppl'] / base['ppl'] - 1):+.1f}%)"
    r1 = (run["recall1_kjv_to_web"] + run["recall1_web_to_kjv"]) / 2
    return f"{run['cos_mean']:.4f} / {100 * r1:.1f}%"


def report(
    results: dict, md_path: pathlib.Path, png_path: pathlib.Path | None, json_name: str = ""
) -> str:
    """Writes the Markdown tables (and the plot) from the results JSON; returns the Markdown."""
    lines = [
        "# Post-training MX on pretrained models: direct cast and PTQ methods",
        "",
        f"Generated by `python examples/ptq_study.py` from `{json_name}` (do not edit).",
        "Direct cast: weights (and activations) rounded to the format at run time, no",
        "calibration. Columns: weights only (W) or weights and activations (W+A), with OCP",
        "floor or rceil shared-exponent scales. Scope `dense`: the Flax Dense layers, by module",
        "substitution; attention's q.k / p.v einsums and the tied output head stay FP32.",
        "Scope `all`: every matmul, including those (jaxmx.intercept: a matmul with an operand",
        "from the params gets the weight format, q.k and p.v the activation format).",
        "",
    ]
    if png_path is not None:
        rel = os.path.relpath(png_path, md_path.parent)
        lines += [f"![PTQ study]({rel})", ""]
    for model, entry in results["models"].items():
        runs, spec = entry["runs"], entry["spec"]
        base = runs.get("fp32")
        if base is None:
            continue
        if model == "smollm2":
            lines += [
                f"## {spec['model']}: perplexity on {spec['text']}",
                "",
                f"{spec['windows']} windows of {spec['length']} tokens ({spec['selection']}; "
                f"{spec['predictions']} predictions). **The FP32 baseline is not the bf16 model:** "
                f"{spec['baseline_note']}. Cells: perplexity (change vs that baseline).",
                "",
                f"FP32 (dequantized Q4_1): **{base['ppl']:.3f}**",
                "",
            ]
        else:
            r1 = (base["recall1_kjv_to_web"] + base["recall1_web_to_kjv"]) / 2
            lines += [
                f"## {spec['model']}: embedding fidelity and KJV/WEB verse retrieval",
                "",
                f"{spec['pairs']} verse pairs ({spec['selection']}). Cells: mean cosine "
                "similarity of the quantized to the FP32 embedding over all "
                f"{2 * spec['pairs']} verses / recall@1 (mean of KJV->WEB and WEB->KJV).",
                "",
                f"FP32: recall@1 **{100 * r1:.1f}%** (KJV->WEB "
                f"{100 * base['recall1_kjv_to_web']:.1f}%, WEB->KJV "
                f"{100 * base['recall1_web_to_kjv']:.1f}%)",
                "",
            ]
        scope_of = lambda r: f"{r['recipe']['scope']}/{r['recipe']['method']}"  # noqa: E731
        for sm in _scopes(runs):
            header = " | ".join(f"{_SHORT[m]} {s}" for m, s in _COLUMNS)
            rule = "|---" * (1 + len(_COLUMNS)) + "|"
            lines += [f"Scope / method `{sm}`:", "", f"| format | {header} |", rule]
            done = {
                r["recipe"]["fmt"] for k, r in runs.items() if k != "fp32" and scope_of(r) == sm
            }
            for f in [f for f in FORMATS + PENDING_FORMATS if f in done]:
                cells = [_cell(model, runs.get(f"{sm}/{f}/{m}/{s}"), base) for m, s in _COLUMNS]
                lines.append(f"| {f} | " + " | ".join(cells) + " |")
            lines.append("")
            if model == "minilm" and sm.startswith("all/"):
                lines += [
                    "MiniLM multiplies by weights only in its Dense layers, so its weights-only",
                    "recipes are the same under both scopes (not rerun where `-`).",
                    "",
                ]
        if model == "smollm2":
            lines += _methods_table(runs, base)
        machine = entry.get("machine", {})
        loads = [x for r in runs.values() for x in r.get("load_avg_1min", [])]
        secs = [r["seconds"] for k, r in runs.items() if k != "fp32" and "seconds" in r]
        versions = sorted({r["jaxmx_commit"] for r in runs.values() if "jaxmx_commit" in r})
        untagged = [r["when"] for r in runs.values() if "when" in r and "jaxmx_commit" not in r]
        if untagged:  # runs made before the commit was recorded
            versions.append(f"the working tree of {min(untagged)}")
        if machine:
            lines += [
                f"Measured with jax {machine.get('jax')}, jaxmx "
                + " and ".join(versions)
                + f" on {machine.get('backend')} "
                f"({machine.get('cpus')} cores, shared: 1-minute load average "
                f"{min(loads):.1f} to {max(loads):.1f}); "
                f"{np.median(secs):.0f} s per recipe (median).",
                "",
            ]
    text = "\n".join(lines)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    if png_path is not None:
        plot(results, png_path)
    return text


def _methods_table(runs: dict, base: dict) -> list[str]:
    """PTQ methods against the direct cast of the same scope, format, mode and scale rule."""
    rows = []
    for key, run in runs.items():
        r = run.get("recipe", {})
        if key == "fp32" or r.get("method", "direct") == "direct":
            continue
        direct = runs.get(key.replace(f"/{r['method']}/", "/direct/", 1))
        if direct is None:
            continue
        gap, dgap = run["ppl"] / base["ppl"] - 1, direct["ppl"] / base["ppl"] - 1
        keep = f" (FP32: {', '.join(r['keep'])})" if r.get("keep") else ""
        rows.append(
            (
                (r["scope"], r["fmt"], r["mode"], r["scale_mode"], keep, gap),
                f"| {r['scope']} | {r['fmt']} {_SHORT[r['mode']]} {r['scale_mode']}{keep} "
                f"| {r['method']} | {run['ppl']:.2f} | {100 * gap:+.1f}% | {100 * dgap:+.1f}% "
                f"| {100 * (1 - gap / dgap):.0f}% |",
            )
        )
    if not rows:
        return []
    return [
        "PTQ methods (`jaxmx.ptq`; `examples/ptq_study.py` METHODS) against the direct cast",
        "of the same scope, format, mode and scale rule. Gap: perplexity change vs FP32;",
        "closed: the share of the direct cast's gap the method removes. A",
        "pattern in parentheses names matmuls kept in FP32 in both (`bskd->`: attention's",
        "q.k and p.v einsums), a diagnostic of where the remaining gap comes from.",
        "",
        "| scope | recipe | method | perplexity | gap | direct gap | closed |",
        "|---|---|---|---|---|---|---|",
        *(line for _, line in sorted(rows)),
        "",
    ]


def _method_groups(runs: dict) -> dict:
    """``{(scope, fmt, mode, scale, keep): {method: ppl change %}}`` of recipes with methods."""
    base = runs.get("fp32")
    groups: dict = {}
    for key, run in runs.items():
        r = run.get("recipe", {})
        if base is None or key == "fp32" or r.get("method", "direct") == "direct":
            continue
        group = (r["scope"], r["fmt"], r["mode"], r["scale_mode"], tuple(r["keep"]))
        direct = runs.get(key.replace(f"/{r['method']}/", "/direct/", 1))
        if direct is None:
            continue
        change = lambda x: 100 * (x["ppl"] / base["ppl"] - 1)  # noqa: E731
        groups.setdefault(group, {"direct": change(direct)})[r["method"]] = change(run)
    return dict(sorted(groups.items()))


def _plot_methods(ax, groups: dict) -> None:
    """Grouped bars: each recipe's perplexity change by PTQ method, direct cast first."""
    names = ["direct", *sorted({m for g in groups.values() for m in g} - {"direct"})]
    width = 0.8 / len(names)
    cmap = {"direct": "#888888"}
    # Dark2 and two more, so that up to nine methods get distinct colours.
    palette = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d",
               "#1f78b4", "#b15928"]  # fmt: skip
    for i, name in enumerate(names):
        color = cmap.get(name, palette[(i - 1) % len(palette)])
        xs = [x + (i - (len(names) - 1) / 2) * width for x, g in enumerate(groups.values())
              if name in g]  # fmt: skip
        ys = [g[name] for g in groups.values() if name in g]
        ax.bar(xs, ys, width, label=name, color=color)
    labels = [
        f"{sc}: {f.split('_')[0]} {_SHORT[m]} {s}" + (" (some FP32)" if keep else "")
        for sc, f, m, s, keep in groups
    ]
    ax.set_xticks(range(len(groups)), labels, fontsize=8, rotation=15, ha="right")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylabel("perplexity change (%)")
    ax.set_title("SmolLM2-135M: PTQ methods vs direct cast (perplexity vs FP32*)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _scopes(runs: dict) -> list[str]:
    """The ``scope/method`` pairs of the runs, ``dense/direct`` (the baseline mechanism) first."""
    found = {
        f"{r['recipe']['scope']}/{r['recipe']['method']}" for k, r in runs.items() if k != "fp32"
    }
    return sorted(found, key=lambda s: (s != "dense/direct", s))


def plot(results: dict, path: pathlib.Path) -> None:
    """Bar charts, one group per format: perplexity change, 1 - cosine, recall@1.

    One row of panels per scope/method in the results (``dense/direct``, ...).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = results["models"]
    panels = []  # (model, title, unit, yscale, value(run), baseline or None)
    if "fp32" in models.get("smollm2", {}).get("runs", {}):
        base = models["smollm2"]["runs"]["fp32"]["ppl"]
        panels.append(
            ("smollm2", "SmolLM2-135M: perplexity vs FP32*", "perplexity change (%)", "symlog",
             lambda r: 100 * (r["ppl"] / base - 1), None)
        )  # fmt: skip
    if "fp32" in models.get("minilm", {}).get("runs", {}):
        recall = lambda r: 50 * (r["recall1_kjv_to_web"] + r["recall1_web_to_kjv"])  # noqa: E731
        panels += [
            ("minilm", "MiniLM-L6: 1 - cosine(quantized, FP32)", "1 - cosine similarity", "log",
             lambda r: 1 - r["cos_mean"], None),
            ("minilm", "MiniLM-L6: KJV<->WEB recall@1 (line: FP32)", "recall@1 (%)", "linear",
             recall, recall(models["minilm"]["runs"]["fp32"])),
        ]  # fmt: skip
    scopes = _scopes({k: r for m in {p[0] for p in panels} for k, r in models[m]["runs"].items()})
    # Direct casts one row per scope; PTQ methods in one last row of their own.
    scopes = [sc for sc in scopes if sc.endswith("/direct")]
    methods = _method_groups(models.get("smollm2", {}).get("runs", {}))
    if not panels or not scopes:
        return
    rows = len(scopes) + bool(methods)
    fig = Figure(figsize=(5.2 * len(panels), 3.6 * rows + 0.4), layout="constrained")
    grid = fig.add_gridspec(rows, len(panels))
    colors = {("w", "floor"): "#9ecae1", ("w", "rceil"): "#3182bd",
              ("wa", "floor"): "#fdae6b", ("wa", "rceil"): "#e6550d"}  # fmt: skip
    width = 0.8 / len(_COLUMNS)
    top: dict[int, Any] = {}
    handles: tuple[list, list] = ([], [])
    for row, scope in enumerate(scopes):
        for col, (model, title, unit, yscale, value, baseline) in enumerate(panels):
            # Rows share each column's y axis, so scopes compare at a glance.
            ax = fig.add_subplot(grid[row, col], sharey=top.get(col))
            top.setdefault(col, ax)
            runs = models[model]["runs"]
            fmts = [
                f
                for f in FORMATS + PENDING_FORMATS
                if any(k.startswith(f"{scope}/{f}/") for k in runs)
            ]
            shown = [] if baseline is None else [baseline]
            for j, (m, sm) in enumerate(_COLUMNS):
                xs, ys = [], []
                for x, f in enumerate(fmts):
                    r = runs.get(f"{scope}/{f}/{m}/{sm}")
                    if r is not None:
                        xs.append(x + (j - (len(_COLUMNS) - 1) / 2) * width)
                        ys.append(value(r))
                ax.bar(xs, ys, width, label=f"{_SHORT[m]} {sm}", color=colors[(m, sm)])
                shown += ys
            if baseline is not None:
                ax.axhline(baseline, color="k", lw=1)
            ax.set_xticks(range(len(fmts)), [f.replace("_", "\n", 1) for f in fmts], fontsize=8)
            ax.set_title(f"{title}\nscope {scope}", fontsize=9)
            ax.set_ylabel(unit)
            if yscale == "symlog":
                ax.set_yscale("symlog", linthresh=1.0)  # linear within +-1%, log beyond
            elif yscale == "log":
                ax.set_yscale("log")
            elif shown:  # recall sits near 100%: zoom in on the differences
                ax.set_ylim(max(0.0, min(shown) - 2.0), min(100.0, max(shown) + 0.5))
            ax.grid(axis="y", alpha=0.3)
            if row == 0 and col == 0:
                handles = ax.get_legend_handles_labels()
    # One legend above the panels, and the footnote below them: both take part
    # in the constrained layout, so neither covers bars or tick labels.
    fig.legend(*handles, loc="outside upper center", ncol=len(_COLUMNS), fontsize=8)
    if methods:
        _plot_methods(fig.add_subplot(grid[rows - 1, :]), methods)
    fig.supxlabel(
        "*FP32 = dequantized 4-bit GGUF weights. dense: Flax Dense layers (attention einsums "
        "and tied head FP32); all: every matmul.",
        fontsize=7, x=0.01, ha="left", wrap=True,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(path))


# --- CLI ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="smollm2,minilm", help="comma list: smollm2, minilm")
    parser.add_argument(
        "--formats", default=None, help=f"default: {','.join(FORMATS + PENDING_FORMATS)}"
    )
    parser.add_argument("--modes", default="w,wa", help="w (weights only), wa (and activations)")
    parser.add_argument(
        "--scales", default="floor,rceil", help="comma list of scale rules: floor (OCP), rceil"
    )
    parser.add_argument(
        "--scope",
        default="dense",
        choices=sorted(SCOPES),
        help="dense: the Flax Dense layers; all: every matmul (jaxmx.intercept)",
    )
    parser.add_argument(
        "--method", default="direct", choices=sorted(METHODS), help="PTQ method; direct = cast"
    )
    parser.add_argument(
        "--keep",
        action="append",
        default=[],
        help="rule pattern kept in FP32 (repeatable), e.g. 'bkgts,bskd->' for attention's p.v",
    )
    parser.add_argument("--windows", type=int, default=8, help="SmolLM2 eval windows")
    parser.add_argument("--length", type=int, default=512, help="tokens per window")
    parser.add_argument("--pairs", type=int, default=None, help="MiniLM verse pairs (default all)")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        help=f"results JSON; the table (.md) and plot (.png) go next to it "
        f"(default {RUNS.relative_to(REPO)}/ptq_study.json)",
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help=f"add to the docs copies: {RESULTS.relative_to(REPO)}, "
        f"{REPORT.relative_to(REPO)}, {PLOT.relative_to(REPO)}",
    )
    parser.add_argument("--fresh", action="store_true", help="ignore earlier results in --out")
    parser.add_argument(
        "--report-only", action="store_true", help="redraw the table and plot from --out"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 windows of 128 tokens, 64 pairs, MXFP8 and MXFP4 (unless "
        f"--formats), into {RUNS.relative_to(REPO)}/quick.json",
    )
    args = parser.parse_args(argv)
    if args.publish and (args.quick or args.out is not None):
        parser.error("--publish writes the docs copies: it takes neither --quick nor --out")
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    unknown = sorted(set(split(args.models)) - set(PRETRAINED))
    if unknown:
        parser.error(f"unknown --models {unknown}; known: {', '.join(sorted(PRETRAINED))}")
    needs = ["matplotlib"]
    if not args.report_only:
        needs += ["tqdm", *(n for m in split(args.models) for n in PRETRAINED[m])]
    # Only MiniLM's weights missing: SmolLM2 alone can still run.
    minilm_only = set(missing(needs)) <= set(PRETRAINED["minilm"]) - set(PRETRAINED["smollm2"])
    require(*needs, alternative="--models smollm2" if minilm_only else None)
    if args.quick:
        args.windows, args.length, args.pairs = 2, 128, 64
        args.formats = args.formats or "mxfp8_e4m3,mxfp4_e2m1"
    if args.out is None:
        name = "quick.json" if args.quick else "ptq_study.json"
        args.out = RESULTS if args.publish else RUNS / name
    if args.out == RESULTS:
        md, png = REPORT, PLOT
    else:
        md, png = args.out.with_suffix(".md"), args.out.with_suffix(".png")
    args.formats = args.formats or ",".join(FORMATS + PENDING_FORMATS)
    if not args.report_only:
        results = run_study(
            models=split(args.models),
            formats=split(args.formats),
            modes=split(args.modes),
            scales=split(args.scales),
            scope=args.scope,
            method=args.method,
            windows=args.windows,
            length=args.length,
            pairs=args.pairs,
            out=args.out,
            fresh=args.fresh,
            keep=args.keep,
        )
    else:
        results = load_results(args.out)
    print(report(results, md, png, args.out.name))
    print(f"wrote {args.out}, {md}, {png}")


if __name__ == "__main__":
    main()
