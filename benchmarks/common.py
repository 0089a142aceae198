"""Timing helpers shared by the benchmarks.

These machines are shared and noisy, so every figure is a ratio to a
baseline measured side by side: the two functions run alternately, many
times, and the ratio of their medians is reported.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import jax


def _once(fn: Callable, args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def compare(fn: Callable, base: Callable, args, base_args=None, *, repeats=20, warmup=3):
    """Median seconds of ``fn(*args)`` and ``base(*base_args)``, interleaved.

    ``base_args`` defaults to ``args``.

    Returns:
      ``(fn_median, base_median)`` in seconds.
    """
    base_args = args if base_args is None else base_args
    for _ in range(warmup):
        _once(fn, args)
        _once(base, base_args)
    t_fn, t_base = [], []
    for _ in range(repeats):
        t_fn.append(_once(fn, args))
        t_base.append(_once(base, base_args))
    return statistics.median(t_fn), statistics.median(t_base)


def machine() -> str:
    dev = jax.devices()[0]
    return (
        f"{dev.platform} ({getattr(dev, 'device_kind', '?')}), {jax.device_count()} device(s), "
        f"jax {jax.__version__}, {platform.processor() or platform.machine()}"
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def load() -> str:
    """The machine's load average (1, 5 and 15 minutes) and its CPU count."""
    import os

    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) on {os.cpu_count()} CPUs"
