"""Save and load trees of MXTensors and arrays: orbax directories, safetensors files.

A checkpoint holds every array leaf of a tree (the ``data`` and ``scale`` of
each MXTensor are two of them) and one JSON *manifest* that says how to put
the tree back together:

* the containers (dicts, lists, tuples, ``None``), so :func:`load` without a
  target rebuilds the tree and returns MXTensors, not ``{data, scale}`` dicts;
* for each MXTensor its static metadata (format, axis, block size, length,
  dtype, packing) and its shape, and its array leaves **by field name**
  (``{"data": ..., "scale": ...}``), so a further leaf such as a per-tensor
  scale is one more named entry, not a new position;
* for each :class:`~jaxmx.NMSparseTensor` (N:M-sparse weights) its ``n``,
  ``m`` and dense ``length``, its sparse axis and dense shape, its kept
  values (an MXTensor, as above) and its packed ``indices`` (an array);
* for each format used, its full card (element and scale format records),
  so a custom format that is not registered in the loading process is
  rebuilt, and one whose name is registered with different fields is refused;
* for each array its dtype, kept exactly (E8M0 scales stay ``float8_e8m0fnu``).

Two backends:

* ``"orbax"`` (the default): a directory written by orbax's
  ``CompositeCheckpointHandler``, item ``arrays`` (the leaves as a nested
  dict, sharded arrays written shard by shard) and item ``jaxmx`` (the
  manifest). :func:`load` restores with the shardings of a target.
* ``"safetensors"``: one file (chosen when the path ends in ``.safetensors``).
  Tensors are named by their tree path joined with dots
  (``params.Dense_0.kernel.data``); dtypes safetensors readers have long known
  (float32/16, bfloat16, FP8 E4M3/E5M2, integers) are written as such;
  others, E8M0 scales and unpacked FP4 codes among them, are written as their
  raw bits in an unsigned integer of the same width (``U8``), the true dtype
  recorded in the manifest. The manifest is the JSON string
  ``__metadata__["jaxmx"]`` of the header.

Layout of the manifest (version 2)::

    {"jaxmx_checkpoint": 2,
     "crc32": 1234567890,
     "formats": {"mxfp4_e2m1": {"class": "MXFormat", "fields": {...}}},
     "tree": {"type": "dict", "keys": ["params"], "children": [
         {"type": "mx", "shape": [4096, 4096],
          "static": {"format": {"format": "mxfp4_e2m1"}, "axis": -2, "block_size": 32,
                     "length": 4096, "dtype": {"dtype": "float32"}, "packed": true},
          "leaves": {"data": {"name": "params.w.data", "dtype": "uint8",
                              "shape": [2048, 4096], "crc32": 305419896},
                     "scale": {"name": "params.w.scale", "dtype": "float8_e8m0fnu",
                               "shape": [128, 4096], "crc32": 2596069104}}}]}}

An NMSparseTensor is a node of its own, its arrays named under its path
(``params.w.values.data``, ``params.w.values.scale``, ``params.w.indices``)::

    {"type": "nm_sparse", "shape": [4096, 4096], "axis": -2,
     "static": {"n": 2, "m": 4, "length": 4096},
     "values": {"type": "mx", "shape": [2048, 4096], ...},
     "indices": {"name": "params.w.indices", "dtype": "uint8",
                 "shape": [512, 4096], "crc32": 1234}}

(see :mod:`jaxmx.checkpoint._sparse`). Array nodes are
``{"type": "array", "name", "dtype", "shape", "crc32"}``;
safetensors adds ``"stored_dtype"`` where the bits are held in another dtype.
Each ``crc32`` of an array is the CRC-32 of its bytes as stored; the top-level
``crc32`` covers ``formats`` and ``tree`` (see :mod:`jaxmx.checkpoint._manifest`).
Version 1, written before checksums, is the same without any ``crc32``; it
still loads, unverified. The ``nm_sparse`` node came later within version 2
(as new static fields do: what older files hold is unchanged, so they load as
before); a jaxmx from before it refuses a checkpoint holding one, naming the
node's type.

:func:`load` trusts nothing it reads: the manifest is checked against its
schema field by field, each format card is rebuilt (and compared with the
registered format of its name), every MXTensor's leaves are checked against
its format (:func:`jaxmx.tensor.check_leaves`), every NMSparseTensor's values
and indices against its ``n``, ``m``, length and axis (and its positions:
``n`` distinct, ascending, below ``m`` per group), the backend's own record of
each array (safetensors header, orbax metadata) must agree with the manifest,
safetensors byte offsets must fit the file, and the checksums must match.
Whatever fails is a ``ValueError`` that names the checkpoint.

``layout=`` reads and writes the layouts other libraries ship instead:
``"gpt-oss"`` (OpenAI's MXFP4 weights), ``"compressed-tensors"`` and
``"modelopt"`` (NVFP4); see :mod:`jaxmx.checkpoint._layouts` and
docs/serving.md. ``"jaxmx"`` is the checkpoint described above.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any, Literal

import numpy as np

from jaxmx.checkpoint import _layouts, _manifest, _orbax, _safetensors, _sparse, _tree

__all__ = ["SaveInfo", "save", "load"]

_BACKENDS = ("orbax", "safetensors")


@dataclasses.dataclass(frozen=True)
class SaveInfo:
    """What :func:`save` wrote.

    ``disk_bytes`` is what the checkpoint takes on disk (every file, headers
    and metadata included); ``array_bytes`` is what its arrays hold in memory
    (an MXTensor counts its codes and scales, as :attr:`MXTensor.nbytes`; an
    NMSparseTensor its values and indices, as :attr:`NMSparseTensor.nbytes`).
    """

    # The file or directory written.
    path: str
    # "orbax" or "safetensors".
    backend: str
    # Bytes of every file written.
    disk_bytes: int
    # Bytes of the array leaves (codes, scales, plain arrays).
    array_bytes: int
    # Plain array leaves (not counting the leaves of MXTensors).
    num_arrays: int
    # MXTensor leaves (not counting the kept values of NMSparseTensors).
    num_mx_tensors: int
    # NMSparseTensor leaves.
    num_sparse_tensors: int = 0


def save(
    path: str | os.PathLike,
    tree: Any,
    *,
    backend: Literal["orbax", "safetensors"] | None = None,
    overwrite: bool = False,
    layout: str = "jaxmx",
) -> SaveInfo:
    """Saves a tree of MXTensors and arrays, bit for bit, with all metadata.

    Every MXTensor is checked against its format first
    (:func:`jaxmx.tensor.check_leaves`), and every NMSparseTensor's indices
    against its values, ``n``, ``m`` and length: what :func:`load` would
    refuse is not written. The manifest records a CRC-32 of each array's bytes and of
    itself, which :func:`load` verifies.

    Args:
      path: a directory (orbax) or a file ending in ``.safetensors``.
      tree: nested dicts (string or int keys), lists, tuples and ``None``,
        holding :class:`~jaxmx.MXTensor`, :class:`~jaxmx.NMSparseTensor` and
        array (``jax.Array``, ``np.ndarray``) leaves: a Flax linen params
        tree, a dict of quantized weights (``jaxmx.quantize_params``, with
        or without ``sparsity=``), ...
      backend: ``"orbax"`` or ``"safetensors"``; ``None`` picks safetensors
        for a path ending in ``.safetensors`` and orbax otherwise.
      overwrite: replace an existing checkpoint at ``path``; without it an
        existing path is an error. Only a jaxmx checkpoint of the same
        backend is replaced: any other file or directory is left alone.
      layout: ``"jaxmx"`` (this checkpoint), or a layout other libraries
        read: ``"gpt-oss"`` (MXFP4 weights), ``"compressed-tensors"`` or
        ``"modelopt"`` (NVFP4 weights), written to ``path`` if it ends in
        ``.safetensors``, else to a model directory (``model.safetensors``
        and its ``config.json``). A leaf the layout cannot hold is an error
        naming it (an NMSparseTensor is only ever ``"jaxmx"``); see
        docs/serving.md. ``backend`` is for ``"jaxmx"`` only.

    Returns:
      A :class:`SaveInfo`: the path, the backend, ``disk_bytes`` (bytes on
      disk) and ``array_bytes`` (bytes the arrays hold in memory).

    Raises:
      TypeError: a container or leaf of a type that cannot be saved.
      ValueError: an unknown backend or layout, two leaves whose names
        collide, an MXTensor whose leaves do not fit its format, an
        NMSparseTensor whose indices do not fit its values, ``n``, ``m`` and
        length, or a leaf the layout cannot hold.
      FileExistsError: ``path`` exists and ``overwrite`` is False, or it is
        not a jaxmx checkpoint of this backend.
      ImportError: the backend's package is not installed.

    Example:

    >>> import tempfile, jax.numpy as jnp, jaxmx
    >>> w = jaxmx.quantize(jnp.ones((64, 32)), "mxfp4", axis=0, packed=True)
    >>> path = tempfile.mkdtemp() + "/w.safetensors"
    >>> info = jaxmx.save(path, {"w": w, "b": jnp.zeros(32)})
    >>> info.backend, info.array_bytes
    ('safetensors', 1216)
    >>> jaxmx.load(path)["w"]
    MXTensor(mxfp4_e2m1, shape=(64, 32), dtype=float32, axis=-2, block_size=32, packed, nbytes=1088)
    """
    path = _path(path)
    _layouts.check(layout, for_load=False)
    if not isinstance(overwrite, (bool, np.bool_)):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    if layout != _layouts.JAXMX:
        _no_backend(backend, layout)
        counts = _layouts.save(path, tree, layout, bool(overwrite))
        return SaveInfo(path=path, backend="safetensors", disk_bytes=_disk_bytes(path), **counts)
    backend = _backend(path, backend)
    if os.path.lexists(path):
        _check_replaceable(path, backend, overwrite)
    formats: dict[str, dict] = {}
    leaves: dict[str, Any] = {}
    structure = _tree.encode(tree, (), formats, leaves)
    if not leaves:
        raise ValueError("the tree holds no arrays or MXTensors; there is nothing to save")
    manifest = {"jaxmx_checkpoint": _manifest.VERSION, "formats": formats, "tree": structure}
    if backend == "orbax":
        _orbax.save(path, manifest, leaves, overwrite)
    else:
        _safetensors.save(path, manifest, leaves)
    nodes = list(_manifest.nodes(structure))
    return SaveInfo(
        path=path,
        backend=backend,
        disk_bytes=_disk_bytes(path),
        array_bytes=sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in leaves.values()),
        num_arrays=sum(n["type"] == "array" for n in nodes),
        num_mx_tensors=sum(n["type"] == "mx" for n in nodes),
        num_sparse_tensors=sum(n["type"] == _sparse.TYPE for n in nodes),
    )


def load(
    path: str | os.PathLike,
    *,
    target: Any = None,
    backend: Literal["orbax", "safetensors"] | None = None,
    layout: str | None = None,
) -> Any:
    """Loads a tree written by :func:`save`, checking everything it reads.

    Without a target the tree is rebuilt from the checkpoint: the same
    containers, MXTensors with their format, axis, block size, length, dtype
    and packing, NMSparseTensors with their ``n``, ``m`` and length, and
    arrays as ``jax.Array`` on the default device. A custom
    format that is not registered here is rebuilt from its stored card (and
    is not registered); one whose name is registered with other fields is an
    error, never silently replaced.

    Before any value is returned, the manifest is checked against its schema
    and its checksum, each MXTensor's leaves against its format, each
    NMSparseTensor's values and indices against its ``n``, ``m``, length and
    axis (and its positions: ``n`` distinct, ascending, below ``m``), the
    backend's record of every array (safetensors header, orbax metadata)
    against the manifest, safetensors byte offsets against the file, and
    each array's bytes against its checksum. A damaged checkpoint is an
    error, never a wrong tree.

    Args:
      path: the directory or ``.safetensors`` file :func:`save` wrote.
      target: optional tree of the same structure whose leaves are arrays or
        ``jax.ShapeDtypeStruct`` (MXTensors and NMSparseTensors of them, e.g.
        from ``jax.eval_shape``); each leaf is restored with the target
        leaf's sharding. Every shape, dtype and MXTensor or NMSparseTensor
        metadata must match the checkpoint; a mismatch is an error, not a
        conversion.
      backend: ``"orbax"`` or ``"safetensors"``; ``None``: safetensors for a
        file, orbax for a directory. For ``layout="jaxmx"`` only.
      layout: ``"jaxmx"``, ``"gpt-oss"``, ``"compressed-tensors"`` or
        ``"modelopt"``; ``None`` (the default) detects it: a jaxmx checkpoint
        by its manifest, a model directory by the ``quantization_config`` of
        its ``config.json`` (``hf_quant_config.json`` for ModelOpt), a file by
        the names of its tensors. A layout file loads as nested dicts of
        MXTensors (never decoded) and plain arrays; see docs/serving.md.

    Returns:
      The tree, with ``jax.Array`` leaves.

    Raises:
      FileNotFoundError: nothing at ``path``.
      ValueError: ``path`` is not a jaxmx checkpoint, or it is damaged,
        truncated or inconsistent (the message names the file and the field
        or tensor); a stored format conflicts with a registered one;
        ``target`` does not match.

    Example:

    >>> import tempfile, jax.numpy as jnp, jaxmx
    >>> w = jaxmx.quantize(jnp.linspace(-1, 1, 96).reshape(3, 32), "mxfp8")
    >>> path = tempfile.mkdtemp() + "/ckpt"
    >>> _ = jaxmx.save(path, {"w": w})
    >>> bool((jaxmx.dequantize(jaxmx.load(path)["w"]) == jaxmx.dequantize(w)).all())
    True
    """
    path = _path(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    _layouts.check(layout, for_load=True)
    tensors = raw = None  # what detecting the layout read, not to be read twice
    if layout is None and backend is None and target is None:
        layout, tensors, raw = _layouts.detect(path)
    if layout not in (None, _layouts.JAXMX):
        _no_backend(backend, layout)
        if target is not None:
            raise ValueError(f"target= is for layout='jaxmx'; layout {layout!r} takes none")
        return _layouts.load(path, layout, tensors)
    if backend is None:
        backend = "orbax" if os.path.isdir(path) else "safetensors"
    elif backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: orbax, safetensors")
    if backend == "orbax":
        if not os.path.isdir(path):
            raise ValueError(f"{path} is a file, not an orbax checkpoint directory")
        manifest = _orbax.read_manifest(path)
    else:
        if not os.path.isfile(path):
            raise ValueError(f"{path} is not a file, so not a safetensors checkpoint")
        manifest, header = _safetensors.read(path, raw)
    try:
        _manifest.check(manifest, backend)
        fmts = {n: _manifest.rebuild_format(n, c) for n, c in manifest["formats"].items()}
    except _manifest.ManifestError as e:
        if e.field == "jaxmx_checkpoint":
            raise ValueError(f"{path} is not a jaxmx checkpoint it can read: {e}") from None
        raise ValueError(f"{path}: its jaxmx manifest is wrong at {e}") from None
    tree = manifest["tree"]
    specs = _tree.target_specs(tree, target, fmts)
    if backend == "orbax":
        arrays = _orbax.restore(path, tree, specs)
    else:
        arrays = _safetensors.restore(path, header, tree, specs)
    try:
        return _tree.decode(tree, arrays, fmts)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _check_replaceable(path: str, backend: str, overwrite: bool) -> None:
    if not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if backend == "orbax":
        ok = os.path.isdir(path) and _orbax.is_checkpoint(path)
    else:
        ok = os.path.isfile(path) and _safetensors.is_checkpoint(path)
    if not ok:
        kind = "directory" if os.path.isdir(path) else "file"
        raise FileExistsError(
            f"{path} exists and is a {kind} that is not a jaxmx {backend} checkpoint; "
            "overwrite=True replaces only a checkpoint jaxmx.save wrote, so it is left as it "
            "is (remove it yourself, or save elsewhere)"
        )


def _path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return os.path.abspath(os.fspath(path))


def _backend(path: str, backend) -> str:
    if backend is None:
        return "safetensors" if path.endswith(".safetensors") else "orbax"
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: orbax, safetensors")
    return backend


def _no_backend(backend, layout: str) -> None:
    if backend is not None:
        raise ValueError(
            f"backend={backend!r} is for layout='jaxmx'; layout {layout!r} is always one "
            "safetensors file (or a directory of them): leave backend out"
        )


def _disk_bytes(path: str) -> int:
    p = pathlib.Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
