"""What quantize_model returns beside the serving function: tied weights and the report."""

from __future__ import annotations

import dataclasses

import jax

from jaxmx.tensor import MXTensor

# --------------------------------------------------------------------------
# What quantize_model returns besides the serving function.
# --------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TiedWeight:
    """A parameter read both by a matmul and by something else (a tied embedding).

    :func:`quantize_model` puts one in place of such a leaf: ``value`` is the
    float parameter as it was, for every non-matmul read (the embedding
    lookup of a tied output head); ``matmul`` is its quantized copy (shaped
    like the leaf, blocked along the axis the matmuls contract), which the
    serving function hands to those matmuls. Both are stored, so the table
    costs its float bytes plus the copy's.
    """

    value: jax.Array
    matmul: MXTensor

    def __repr__(self) -> str:
        return f"TiedWeight(value={jax.typeof(self.value)}, matmul={self.matmul!r})"


@dataclasses.dataclass(frozen=True)
class WeightResult:
    """What :func:`quantize_model` did with one parameter."""

    # Leaf path in the parameters ("params/layers_0/mlp/up_proj/kernel").
    path: str
    shape: tuple[int, ...]
    # "quantized", "tied" (float kept, quantized copy for its matmuls) or "float".
    action: str
    # Method that made the MXTensor ("gptq", "hadamard_gptq", ...); None if float.
    method: str | None = None
    format: str | None = None
    # The leaf axis its matmuls contract (the blocks run along it).
    axis: int | None = None
    # Hadamard order the weight (and its matmuls' activations) are rotated by.
    hadamard: int | None = None
    # Why it stayed float, or what changed from the method asked for.
    note: str = ""

    def describe(self, width: int = 0) -> str:
        shape = str(tuple(self.shape))
        if self.action == "float":
            return f"float      {self.path:<{width}}  {shape}  {self.note}"
        what = f"{self.format} axis {self.axis}, {self.method}"
        if self.hadamard:
            what += f" (Hadamard {self.hadamard})"
        if self.action == "tied":
            what += "; float kept for its other reads"
        note = f"  [{self.note}]" if self.note else ""
        return f"{self.action:<9}  {self.path:<{width}}  {shape}  {what}{note}"


@dataclasses.dataclass(frozen=True)
class PTQReport:
    """Which parameters :func:`quantize_model` quantized, how, and which it left float (why).

    Lists every parameter read by a matmul of the traced function and every
    other parameter of two or more dimensions (biases and norm scales that
    no matmul reads are left out).
    """

    method: str
    batches: int  # calibration batches run (0: only the first was traced)
    weights: tuple[WeightResult, ...]
    seconds: float

    @property
    def quantized(self) -> tuple[str, ...]:
        """Paths of the parameters with an MXTensor (tied ones included)."""
        return tuple(w.path for w in self.weights if w.action != "float")

    @property
    def kept_float(self) -> dict[str, str]:
        """``{path: why}`` of the parameters left float."""
        return {w.path: w.note for w in self.weights if w.action == "float"}

    def __getitem__(self, path: str) -> WeightResult:
        for w in self.weights:
            if w.path == path:
                return w
        raise KeyError(f"no parameter {path!r} in the report; it has {len(self.weights)}")

    def summary(self) -> str:
        """One line per parameter, quantized ones first."""
        n = len(self.quantized)
        head = (
            f"quantize_model(method={self.method!r}): {n} of {len(self.weights)} parameters "
            f"quantized, {self.batches} calibration batch{'' if self.batches == 1 else 'es'}, "
            f"{self.seconds:.1f} s"
        )
        width = max((len(w.path) for w in self.weights), default=0)
        rows = sorted(self.weights, key=lambda w: w.action == "float")
        return "\n".join([head, *(f"  {w.describe(width)}" for w in rows)])

    def __str__(self) -> str:
        return self.summary()
