"""Amber Pruner's weight factors computed on every call, and once (jaxmx.precompute_amber).

Two measurements, each timing both variants interleaved in the same run
(median of ``--repeats`` calls of the jitted function, after compiling):

* ``projection``: one SmolLM2-135M-sized matmul, ``x (tokens, 576) @ W
  (576, 1536)`` (its MLP up projection), MXFP8 with 8:16 amber activations;
* ``smollm2``: a forward pass of SmolLM2-135M-Instruct (``--tokens`` tokens)
  under the sparsity study's rules (examples/sparsity_study.py: MXFP8,
  8:16 amber on q, k, v, gate and up), if its weights are at hand
  (``JAXMX_DATA``).

Both check that the outputs are bit-identical.

    python benchmarks/amber_cache.py
    python benchmarks/amber_cache.py --which projection --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common

import jaxmx


def _time(fns: dict, args: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each jitted function, calls interleaved."""
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args[name]))  # compile
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args[name]))
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _report(what: str, t: dict[str, float], same: bool) -> None:
    print(
        f"{what}: every call {t['every call'] * 1e3:.1f} ms, precomputed "
        f"{t['precomputed'] * 1e3:.1f} ms, speedup {t['every call'] / t['precomputed']:.1f}x, "
        f"outputs bit-identical: {same}"
    )


def projection(tokens: int, repeats: int) -> None:
    w = jax.random.normal(jax.random.key(0), (576, 1536)) / 24
    x = jax.random.normal(jax.random.key(1), (tokens, 576))
    params = {"up": {"kernel": w}}
    cfg = jaxmx.DotConfig(lhs="mxfp8", rhs="mxfp8", lhs_sparsity=jaxmx.NMSparsity(8, 16, "amber"))
    rules = [("up", cfg)]

    def f(p, x):
        return x @ p["up"]["kernel"]

    fns = {
        "every call": jax.jit(jaxmx.intercept(f, rules, warn=False)),
        "precomputed": jax.jit(
            jaxmx.intercept(f, jaxmx.precompute_amber(rules, params), warn=False)
        ),
    }
    args = {name: (params, x) for name in fns}
    outs = [np.asarray(fn(params, x)) for fn in fns.values()]
    _report(f"projection ({tokens}, 576) @ (576, 1536)", _time(fns, args, repeats), _same(outs))


def smollm2(tokens: int, repeats: int) -> None:
    from examples import pretrained, sparsity_study

    try:
        pre = pretrained.load_smollm2(fetch=False)
    except (FileNotFoundError, OSError, RuntimeError) as err:
        print(f"smollm2: skipped ({err})")
        return
    config = sparsity_study.Config(quant="mxfp8", pattern=(8, 16), score="amber")
    rules = config.rules(sparsity_study.ROLES["smollm2"])
    weights = sparsity_study.WEIGHTS
    fns = {
        "every call": jax.jit(jaxmx.intercept(pre.model.apply, rules, weights=weights, warn=False)),
        "precomputed": jax.jit(
            jaxmx.intercept(
                pre.model.apply,
                jaxmx.precompute_amber(rules, pre.params),
                weights=weights,
                warn=False,
            )
        ),
    }
    ids = jax.random.randint(jax.random.key(0), (1, tokens), 0, pre.config.vocab_size)
    args = {name: (pre.params, ids) for name in fns}
    outs = [np.asarray(fn(pre.params, ids)) for fn in fns.values()]
    _report(f"SmolLM2-135M forward, {tokens} tokens", _time(fns, args, repeats), _same(outs))


def _same(outs: list[np.ndarray]) -> bool:
    return bool(np.array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--which", default="projection,smollm2", help="projection, smollm2 or both")
    p.add_argument("--tokens", type=int, default=128, help="tokens per call")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per variant (median)")
    args = p.parse_args()
    print(common.machine())
    print(common.load())
    which = args.which.split(",")
    if "projection" in which:
        projection(args.tokens, args.repeats)
    if "smollm2" in which:
        smollm2(args.tokens, args.repeats)


if __name__ == "__main__":
    main()
