"""Where does the MX gap of the Shakespeare char-GPT come from? Short ablations.

Each variant trains the ``train_lm`` model from the same initial params on
the same batches for ``--steps`` (default 600) and prints its final
validation loss and the gap to FP32. Variants switch one thing at a time:
which matmuls are quantized (the output head, the attention matmuls), which
of the six quantizations (forward only, no gradient), the scale rule
(floor vs rceil) and the element format.

    python examples/ablate_lm.py                          # all variants
    python examples/ablate_lm.py --variants fp32,mxfp8,mxfp8_head_fp32
    python examples/ablate_lm.py --width 128 --heads 4    # a wider model
"""

from __future__ import annotations

import argparse
import pathlib
import sys

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from examples.requires import TRAINING, require

if __name__ == "__main__":  # every missing package named at once, before any import
    require(*TRAINING)

import jaxmx
import jaxmx.flax
from examples import data, study, train_lm, training

P = jaxmx.preset
E2M3 = jaxmx.DotConfig(lhs="mxfp6_e2m3", rhs="mxfp6_e2m3", grad="mxfp6_e2m3")

# name -> substitution rules (first match wins; None keeps high precision).
VARIANTS = {
    "fp32": [],
    "mxfp8": [(".*", P("mxfp8"))],
    "mxfp8_head_fp32": [("head", None), (".*", P("mxfp8"))],
    "mxfp8_attention_fp32": [(r"attn$", None), (".*", P("mxfp8"))],
    "mxfp8_grad_fp32": [(".*", P("mxfp8", grad=None))],
    "mxfp8_forward_only": [(".*", P("mxfp8", grad=None, lhs_bwd=None, rhs_bwd=None))],
    "mxfp8_rceil": [(".*", P("mxfp8_rceil"))],
    "mxfp8_rceil_head_fp32": [("head", None), (".*", P("mxfp8_rceil"))],
    "mxfp6": [(".*", P("mxfp6"))],
    "mxfp6_rceil": [(".*", P("mxfp6", scale_mode="rceil"))],
    "mxfp6_rceil_head_fp32": [("head", None), (".*", P("mxfp6", scale_mode="rceil"))],
    "mxfp6_forward_only": [(".*", P("mxfp6", grad=None, lhs_bwd=None, rhs_bwd=None))],
    "mxfp6_stochastic_grads": [(".*", P("mxfp6", scale_mode="rceil", grad_rounding="stochastic"))],
    "mxfp6_e2m3": [(".*", E2M3)],
}


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, from: {', '.join(VARIANTS)}",
    )
    p.add_argument("--steps", type=int, default=600, help="optimizer updates of each variant")
    p.add_argument("--width", type=int, help="embedding width (default: train_lm.py's)")
    p.add_argument("--heads", type=int, help="attention heads (default: train_lm.py's)")
    args, rest = p.parse_known_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    lm_argv = ["--steps", str(args.steps), "--eval-every", str(args.steps), *rest]
    for flag in ("width", "heads"):
        if getattr(args, flag):
            lm_argv += [f"--{flag}", str(getattr(args, flag))]
    lm = train_lm.parse_args(lm_argv)
    model, params, train_batch, eval_batches, _ = train_lm.build(lm, data.load_shakespeare())
    config = study.train_config_from_args(lm)
    losses: dict[str, float] = {}
    print(f"{'variant':<26} {'val loss':>9} {'gap to fp32':>12}")
    for name in names:
        rules = VARIANTS[name]
        target = jaxmx.flax.quantize_model(model, rules, warn=False) if rules else model
        result = training.train(
            training.apply_fn_for(target), params, train_batch, eval_batches, config, progress=False
        )
        losses[name] = result.metrics["final_eval"]["loss"]
        ref = losses.get("fp32")
        gap = f"{100 * (losses[name] - ref) / ref:+.2f}%" if ref else "n/a"
        print(f"{name:<26} {losses[name]:>9.4f} {gap:>12}", flush=True)
    return losses


if __name__ == "__main__":
    main()
