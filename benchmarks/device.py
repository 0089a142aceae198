"""One unattended pass on an accelerator: are the kernels right here, and how fast?

    python benchmarks/device.py                   # writes runs/device/<platform>.json
    python benchmarks/device.py --quick           # smaller timings (a smoke run)

Four parts, each recorded even when another fails, in well under 8 minutes
on one GPU or TPU:

1. Correctness. Every OCP format's reference vectors (tests/data/vectors:
   the MX paper's emulator, nearest-even, blocks of 32 along both axes) and
   NVFP4's (tests/data/vectors_turn2/nvfp4: TransformerEngine's codes and
   scales) are quantized here by ``implementation="xla"`` and, where the
   platform has a kernel, ``implementation="pallas"``: the values and scales
   against the stored ones, and the kernel's codes and scales against the
   XLA path's, bit for bit.
2. Speed. quantize and fake_quantize of one large bfloat16 array per format,
   XLA against Pallas, and fake_quantize against a plain copy of the same
   array (the memory-bound floor), as medians of interleaved runs.
3. Matmuls. The quantized ``dot_general`` (forward, dgrad, wgrad) with
   ``DotConfig(implementation="native")`` (``lax.scaled_dot``) against the
   emulation, within float32 accumulation bounds, for MXFP8, MXFP4 and
   NVFP4, and with ``"pallas"`` bit for bit; then the MLP training step of
   benchmarks/train_step.py in MXFP8, emulated and native, with ratios to
   the faster of its float32 and bfloat16-matmul steps.
4. Weight-only matmul. ``jaxmx.pallas.weight_only_matmul`` of decode-sized
   bfloat16 rows (M = 8) and an MXFP4 (packed), NVFP4 (packed) and MXFP8
   weight: the kernel against ``x @ W.dequantize()`` in float64 within the
   float32 accumulation bound, and its time against the XLA path's.
5. Decode. ``benchmarks/serve.py --quick`` (tokens per second of MX weights)
   where its pretrained weights are on disk; skipped, and said so, otherwise.

On a CPU it is a dry run: the XLA path is checked, the kernels are run
through Pallas's interpreter on one small case only, and every path it could
not take is listed under "not run" in the JSON and the table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jaxmx
from benchmarks import _device_matmul
from benchmarks.common import compare, machine, table

ROOT = pathlib.Path(__file__).resolve().parent.parent
OCP = ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8")
VECTORS = ROOT / "tests" / "data" / "vectors"
NVFP4_VECTORS = ROOT / "tests" / "data" / "vectors_turn2" / "nvfp4"


def _raw(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.dtype(f"uint{8 * a.dtype.itemsize}"))


def _same_values(a, b) -> bool:
    """Equal as the vectors define it: NaN equals NaN, -0.0 equals +0.0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return bool(np.array_equal(a, b, equal_nan=True))


def _platform() -> str:
    """jaxmx's name for the default backend's platform ("gpu" devices: cuda or rocm)."""
    for name in ("tpu", "cuda", "rocm"):
        try:
            if jax.devices(name):
                return name
        except RuntimeError:  # no such backend here
            continue
    return jax.devices()[0].platform


def _has_kernel() -> bool:
    rec = jaxmx.platforms.PLATFORMS.get(_platform())
    return bool(rec and rec.pallas)


def _quantize(impl, x, fmt, **kw):
    return jaxmx.quantize(x, fmt, implementation=impl, **kw)


def check_ocp(kernel: bool, interpret_one: bool) -> list[dict]:
    rows = []
    for fmt in OCP:
        for axis in (-1, 0):
            path = VECTORS / f"{fmt}_bs32_ax{axis}_nearest_even.npz"
            z = np.load(path)
            cases = json.loads(str(z["meta"]))["cases"]
            for case in cases:
                x = jnp.asarray(z[f"x__{case}"])
                ref = _quantize("xla", x, fmt, axis=axis)
                row = {"format": fmt, "axis": axis, "case": case}
                row["xla_vs_vectors"] = _same_values(jaxmx.dequantize(ref), z[f"y__{case}"])
                if kernel or (interpret_one and case == "nan_inf" and axis == -1):
                    ctx = jaxmx.pallas.interpret("mosaic_tpu") if not kernel else _null()
                    with ctx:
                        t = _quantize("pallas", x, fmt, axis=axis)
                        f = jaxmx.fake_quantize(x, fmt, axis=axis, implementation="pallas")
                    row["pallas_vs_xla"] = bool(
                        np.array_equal(_raw(t.data), _raw(ref.data))
                        and np.array_equal(_raw(t.scale), _raw(ref.scale))
                        and np.array_equal(_raw(f), _raw(jaxmx.fake_quantize(x, fmt, axis=axis)))
                    )
                    row["pallas_interpreted"] = not kernel
                rows.append(row)
    return rows


def check_nvfp4(kernel: bool) -> list[dict]:
    rows = []
    for path in sorted(NVFP4_VECTORS.glob("te_1x16__*.npz")):
        z = np.load(path)
        x = jnp.asarray(z["x"])
        ref = _quantize("xla", x, "nvfp4")
        codes = jaxmx.codes.storage_to_raw(ref.data, ref.format.element)
        row = {"format": "nvfp4", "case": path.stem}
        row["xla_vs_vectors"] = bool(
            np.array_equal(np.asarray(codes), z["codes"])
            and np.array_equal(_raw(ref.scale), z["scales_e4m3"])
        )
        if kernel:
            t = _quantize("pallas", x, "nvfp4")
            row["pallas_vs_xla"] = bool(
                np.array_equal(_raw(t.data), _raw(ref.data))
                and np.array_equal(_raw(t.scale), _raw(ref.scale))
                and np.array_equal(_raw(t.tensor_scale), _raw(ref.tensor_scale))
            )
        rows.append(row)
    return rows


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def speed(kernel: bool, shape, repeats: int) -> list[dict]:
    x = jax.random.normal(jax.random.key(0), shape, jnp.bfloat16)
    nbytes = x.size * x.dtype.itemsize
    copy = jax.jit(lambda x: x + jnp.bfloat16(0))  # reads and writes x once
    rows = []
    for fmt in ("mxfp8_e4m3", "mxfp4_e2m1", "nvfp4"):
        q_xla = jax.jit(lambda x, fmt=fmt: _quantize("xla", x, fmt).data)
        f_xla = jax.jit(lambda x, fmt=fmt: jaxmx.fake_quantize(x, fmt, implementation="xla"))
        t_f, t_copy = compare(f_xla, copy, (x,), repeats=repeats)
        row = {"format": fmt, "shape": list(shape), "bytes": nbytes}
        row["fake_xla_over_copy"] = t_f / t_copy
        row["copy_GBps"] = 2 * nbytes / t_copy / 1e9
        if kernel:
            q_pl = jax.jit(lambda x, fmt=fmt: _quantize("pallas", x, fmt).data)
            f_pl = jax.jit(lambda x, fmt=fmt: jaxmx.fake_quantize(x, fmt, implementation="pallas"))
            t_qp, t_qx = compare(q_pl, q_xla, (x,), repeats=repeats)
            t_fp, t_fx = compare(f_pl, f_xla, (x,), repeats=repeats)
            row.update(
                quantize_xla_ms=1e3 * t_qx,
                quantize_pallas_ms=1e3 * t_qp,
                fake_xla_ms=1e3 * t_fx,
                fake_pallas_ms=1e3 * t_fp,
                fake_pallas_over_copy=t_fp / t_copy,
            )
        else:
            row["quantize_xla_ms"] = 1e3 * compare(q_xla, copy, (x,), repeats=repeats)[0]
        rows.append(row)
    return rows


WEIGHT_ONLY = (("mxfp4_e2m1", True), ("nvfp4", True), ("mxfp8_e4m3", False))


def weight_only(kernel: bool, accelerator: bool, repeats: int) -> list[dict]:
    """The weight-only matmul kernel against float64 (interpreted, one small shape,
    where the platform has no kernel), and timed against the XLA path where it has."""
    k, n = (8192, 8192) if accelerator else (256, 96)
    x = jax.random.normal(jax.random.key(2), (8, k), jnp.bfloat16)
    x64 = np.asarray(x, np.float64)
    rows = []
    for fmt, packed in WEIGHT_ONLY:
        w = jax.random.normal(jax.random.key(1), (k, n))
        w = jaxmx.quantize(w, fmt, axis=0, packed=packed)
        w64 = np.asarray(w.dequantize(), np.float64)
        bound = (k + 3) * 2.0**-24 * (np.abs(x64) @ np.abs(w64))
        xla = jax.jit(lambda x, w: jaxmx.pallas.weight_only_matmul(x, w, out_dtype=jnp.float32))
        pallas = jax.jit(
            lambda x, w: jaxmx.pallas.weight_only_matmul(
                x, w, out_dtype=jnp.float32, implementation="pallas"
            )
        )
        with jaxmx.pallas.interpret("mosaic_tpu") if not kernel else _null():
            y = np.asarray(pallas(x, w), np.float64)  # traced (and interpreted) here
        row = {"format": fmt, "packed": packed, "shape": [8, k, n], "interpreted": not kernel}
        row["within_bound"] = bool((np.abs(y - x64 @ w64) <= bound).all())
        if kernel:
            t_p, t_x = compare(pallas, xla, (x, w), repeats=repeats)
            row.update(pallas_ms=1e3 * t_p, xla_ms=1e3 * t_x, weight_bytes=w.nbytes)
        rows.append(row)
    return rows


def decode(quick: bool, timeout: int) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--quick", "--rounds", "2"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"ran": False, "why": f"serve.py took over {timeout} s"}
    if out.returncode != 0:
        last = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
        return {"ran": False, "why": f"serve.py failed: {last[0][:300]}"}
    return {"ran": True, "output": out.stdout[-4000:]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller timings")
    parser.add_argument(
        "--out", default=str(ROOT / "runs" / "device"), help="folder for <platform>.json"
    )
    parser.add_argument("--no-decode", action="store_true", help="skip serve.py")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    platform = _platform()
    kernel = _has_kernel()
    report = {"machine": machine(), "platform": platform, "pallas_kernel": kernel, "not_run": []}
    if not kernel:
        report["not_run"].append(
            f"Pallas kernels on {platform}: jaxmx has none for it (interpreted on one case per "
            "OCP format instead)"
        )
    ocp = check_ocp(kernel, interpret_one=not kernel)
    nv = check_nvfp4(kernel)
    if not kernel:
        report["not_run"].append("NVFP4's Pallas kernel against its vectors")
    report["correctness"] = ocp + nv
    accelerator = platform in ("cuda", "rocm", "tpu")
    shape = (1024, 1024) if args.quick or not accelerator else (8192, 8192)
    report["speed"] = speed(kernel, shape, repeats=5 if args.quick else 20)
    if not accelerator:
        report["not_run"].append("speed on an accelerator (this is a CPU: a small shape only)")
    report["matmuls"] = _device_matmul.check_matmuls(kernel)
    if not kernel:
        report["not_run"].append("pallas matmul operands on this platform (interpreted, MXFP8)")
    report["train_step"] = _device_matmul.train_steps(repeats=5 if args.quick else 20)
    if not accelerator:
        report["not_run"].append("native matmuls in hardware (here: XLA's reference decomposition)")
    report["weight_only"] = weight_only(kernel, accelerator, repeats=5 if args.quick else 20)
    if not kernel:
        report["not_run"].append(
            f"the weight-only matmul kernel on {platform}: interpreted on a small shape, not timed"
        )
    if args.no_decode:
        report["decode"] = {"ran": False, "why": "--no-decode"}
    else:
        report["decode"] = decode(args.quick, timeout=240)
    if not report["decode"]["ran"]:
        report["not_run"].append(f"decode tokens/s: {report['decode']['why']}")
    report["seconds"] = time.perf_counter() - t0

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{platform}.json"
    path.write_text(json.dumps(report, indent=1))

    checks = report["correctness"]
    bad = [r for r in checks if not r["xla_vs_vectors"] or r.get("pallas_vs_xla") is False]
    mm = report["matmuls"]
    bad += [r for r in mm if not r["native_vs_xla"] or r.get("pallas_vs_xla") is False]
    bad += [r for r in report["weight_only"] if not r["within_bound"]]
    kernel_checked = sum("pallas_vs_xla" in r for r in checks)
    print(report["machine"])
    print(
        f"correctness: {len(checks)} cases, {kernel_checked} with the kernel"
        f"{' (interpreted)' if not kernel else ''}, {len(bad)} failing"
    )
    for r in bad:
        print("  FAIL", r)
    cols = ["format", "quantize_xla_ms", "quantize_pallas_ms", "fake_xla_ms", "fake_pallas_ms",
            "fake_xla_over_copy", "copy_GBps"]  # fmt: skip
    rows = [
        [r["format"]] + [f"{r[c]:.3g}" if c in r else "-" for c in cols[1:]]
        for r in report["speed"]
    ]
    print(table(cols, rows))
    _device_matmul.print_rows(report["matmuls"], report["train_step"], table)
    cols = ["format", "shape", "within_bound", "pallas_ms", "xla_ms"]
    rows = [
        [r["format"] + (" packed" if r["packed"] else ""), "x".join(map(str, r["shape"]))]
        + [str(r["within_bound"])]
        + [f"{r[c]:.3g}" if c in r else "-" for c in cols[3:]]
        for r in report["weight_only"]
    ]
    print(table(cols, rows))
    if report["decode"]["ran"]:
        print(report["decode"]["output"])
    for line in report["not_run"]:
        print("not run:", line)
    print(f"wrote {path} in {report['seconds']:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
