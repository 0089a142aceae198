"""Where a training run's arrays live: one mesh over every device of every process.

A run is data parallel over one mesh axis (``"data"``): each batch is cut
along its first axis, one slice per device. Parameters and optimizer state
are either replicated on every device, or, with ``fsdp=True``, cut along
one axis each (:func:`jaxmx.fsdp_shardings`: the longest axis that is a
multiple of 32 x the number of devices; arrays with none stay whole).

Under FSDP the matmul weights (Flax's ``kernel`` leaves) go into the model
cut as they are stored: under an MX recipe the quantized dot all-gathers
each as MX codes and scales (``DotConfig(fsdp="data")``), under FP32 XLA
gathers it. The other parameters (embeddings, LayerNorm scales, biases) are
gathered whole at the start of each step (:meth:`Parallel.for_model`);
left cut, they would make XLA cut activations along their width and gather
activations instead. There is no communication code here: the collectives
are JAX's, inserted for the shardings and by ``jax.shard_map``.

Several processes (one per host, or several on one machine, see
``examples/launch.py``) join with :func:`initialize_from_env` before JAX is
used; every process then runs the same program on the global mesh. Host
data (initial parameters, batches) is computed identically by every
process, and each process hands JAX only the slices its devices hold
(``jax.make_array_from_callback``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxmx

# The environment examples/launch.py gives each process it starts.
from examples.launch import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID


def initialize_from_env() -> bool:
    """Joins a multi-process run if examples/launch.py started this process.

    Reads ``JAXMX_COORDINATOR`` (``host:port``), ``JAXMX_NUM_PROCESSES`` and
    ``JAXMX_PROCESS_ID``; without them it does nothing (one process). CPU
    devices talk over gloo. Must run before JAX touches a device.

    Returns:
      Whether ``jax.distributed.initialize`` was called.
    """
    address = os.environ.get(ENV_COORDINATOR)
    if not address:
        return False
    try:
        num, rank = int(os.environ[ENV_NUM_PROCESSES]), int(os.environ[ENV_PROCESS_ID])
    except (KeyError, ValueError) as e:
        raise RuntimeError(
            f"{ENV_COORDINATOR}={address!r} is set, so {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} "
            f"must be set to integers too: {e!r}"
        ) from None
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=rank)
    return True


def is_matmul_weight(path: str) -> bool:
    """Whether a parameter path (``jax.tree_util.keystr``) names a matmul weight:
    Flax's ``kernel`` of Dense, DenseGeneral, Conv (linen and nnx)."""
    return path.endswith("['kernel']") or path.endswith(".kernel")


def is_main_process() -> bool:
    """Process 0 writes files and prints; every process computes."""
    return jax.process_index() == 0


@dataclasses.dataclass(frozen=True)
class Parallel:
    """A mesh with one data axis, and whether parameters are fully sharded over it.

    >>> p = Parallel.over_devices(jax.devices()[:1])
    >>> p.size, p.fsdp
    (1, False)
    """

    mesh: Mesh
    fsdp: bool = False  # cut parameters and optimizer state over the axis too
    axis: str = "data"
    # Under FSDP, the parameters that go into the model cut (the matmuls gather
    # them); the others are gathered whole at the start of each step.
    gathered_by_matmul: Callable[[str], bool] = is_matmul_weight

    @classmethod
    def over_devices(cls, devices=None, *, fsdp: bool = False, axis: str = "data") -> Parallel:
        """A one-axis mesh over ``devices`` (default: every device of every process)."""
        devices = jax.devices() if devices is None else list(devices)
        return cls(Mesh(np.array(devices), (axis,)), fsdp, axis)

    @property
    def size(self) -> int:
        """Devices along the data axis."""
        return int(self.mesh.shape[self.axis])

    def describe(self) -> dict[str, Any]:
        """JSON data about the layout, for logs (not compared on resume)."""
        return {
            "processes": jax.process_count(),
            "devices": self.size,
            "fsdp": self.fsdp,
        }

    def shardings(self, tree: Any) -> Any:
        """A ``NamedSharding`` per leaf: FSDP's cut, or replicated."""
        if self.fsdp:
            return jaxmx.fsdp_shardings(tree, self.mesh, self.axis)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.tree.map(lambda _: replicated, tree)

    def for_model(self, params: Any) -> Any:
        """``params`` (inside ``jit``) as the model takes them: under FSDP every
        leaf that is not a matmul weight gathered whole (replicated)."""
        if not self.fsdp:
            return params
        whole = NamedSharding(self.mesh, PartitionSpec())

        def one(path, leaf):
            if self.gathered_by_matmul(jax.tree_util.keystr(path)):
                return leaf
            return jax.lax.with_sharding_constraint(leaf, whole)

        return jax.tree_util.tree_map_with_path(one, params)

    def constrain(self, tree: Any) -> Any:
        """``tree`` (inside ``jit``) pinned to :meth:`shardings`."""
        return jax.lax.with_sharding_constraint(tree, self.shardings(tree))

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(self.axis))

    def put(self, tree: Any, shardings: Any = None) -> Any:
        """Host values, the same in every process, as global arrays on the mesh."""
        shardings = self.shardings(tree) if shardings is None else shardings

        def one(x, sharding):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return jax.tree.map(one, tree, shardings)

    def put_batch(self, x: Any) -> jax.Array:
        """A global batch (the same in every process), cut along its first axis."""
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % self.size:
            raise ValueError(
                f"a batch of shape {x.shape} cannot be cut along its first axis over "
                f"{self.size} devices; use a batch size that is a multiple of {self.size}"
            )
        return self.put(x, self.batch_sharding)

    def init_state(self, optimizer, params: Any) -> Any:
        """``optimizer.init(params)`` on the mesh, laid out like :meth:`shardings`."""
        abstract = jax.eval_shape(optimizer.init, params)
        return jax.jit(optimizer.init, out_shardings=self.shardings(abstract))(params)

    def gather(self, tree: Any) -> Any:
        """Every leaf as a host ``np.ndarray`` holding the whole array (see :func:`to_host`)."""
        return to_host(tree)


def to_host(tree: Any) -> Any:
    """Every leaf as a host ``np.ndarray`` holding the whole array.

    A collective when an array is spread over processes: every process must
    call it, in the same order.
    """
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)
