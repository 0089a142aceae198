"""jaxmx.save / jaxmx.load of NMSparseTensor leaves (N:M-sparse quantized weights).

What is checked, and against what:

* round trips, both backends, of 2:4 MXFP4 (packed and not), 4:8 MXFP8,
  8:16 NVFP4 (tensor scale), a per-tensor format and stacked layers: the
  loaded tensor is an NMSparseTensor with the same static fields (n, m,
  length; the values' format, axis, block size, ...), every array (codes,
  scales, tensor scale, indices) equal byte for byte, and ``densify()``
  equal byte for byte;
* a params tree from ``quantize_params(sparsity=...)``, sparse, dense MX
  and float leaves mixed, with and without a target (sharded over the 8 CPU
  devices of conftest), and a model served by ``jaxmx.intercept`` giving the
  same output bit for bit before and after;
* what is on disk: the tensor names, the manifest node, ``SaveInfo``;
* the errors, on save and on load, naming what was found and what was
  expected: a manifest whose n, m, length, axis, values or indices disagree,
  positions that are not n distinct ascending ones per group, a target that
  differs.
"""

from __future__ import annotations

import dataclasses
import json
import re
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmx
from tests._arrays import normal
from tests._checkpoint_files import rewrite, st_read

BACKENDS = ["orbax", "safetensors"]


def _path(tmp_path, backend, stem="ckpt"):
    return tmp_path / (f"{stem}.safetensors" if backend == "safetensors" else stem)


def _bits(a) -> bytes:
    a = np.asarray(a)
    return a.dtype.name.encode() + str(a.shape).encode() + np.ascontiguousarray(a).tobytes()


def _static(t) -> dict:
    return {f.name: getattr(t, f.name) for f in dataclasses.fields(t) if f.metadata.get("static")}


def _assert_same_mx(a: jaxmx.MXTensor, b: jaxmx.MXTensor, where: str) -> None:
    assert type(b) is jaxmx.MXTensor, where
    assert _static(a) == _static(b), where
    for f in ("data", "scale", "tensor_scale", "micro"):
        u, v = getattr(a, f), getattr(b, f)
        assert (u is None) == (v is None), f"{where}.{f}"
        if u is not None:
            assert isinstance(v, jax.Array), f"{where}.{f}"
            assert _bits(u) == _bits(v), f"{where}.{f}"


def _assert_same_sparse(a: jaxmx.NMSparseTensor, b, where: str = "w") -> None:
    assert type(b) is jaxmx.NMSparseTensor, where
    assert _static(a) == _static(b) == {"n": a.n, "m": a.m, "length": a.length}, where
    assert b.shape == a.shape and b.sparse_axis() == a.sparse_axis(), where
    _assert_same_mx(a.values, b.values, f"{where}.values")
    assert isinstance(b.indices, jax.Array) and _bits(a.indices) == _bits(b.indices), where
    _assert_same_mx(a.densify(), b.densify(), f"{where}.densify()")
    assert _bits(a.dequantize()) == _bits(b.dequantize()), where


def _assert_same_tree(a, b) -> None:
    def leaf(x):
        return isinstance(x, (jaxmx.MXTensor, jaxmx.NMSparseTensor))

    la, ta = jax.tree.flatten_with_path(a, is_leaf=leaf)
    lb, tb = jax.tree.flatten(b, is_leaf=leaf)
    assert ta == tb
    for (path, x), y in zip(la, lb, strict=True):
        where = jax.tree_util.keystr(path)
        if isinstance(x, jaxmx.NMSparseTensor):
            _assert_same_sparse(x, y, where)
        elif isinstance(x, jaxmx.MXTensor):
            _assert_same_mx(x, y, where)
        else:
            assert isinstance(y, jax.Array) and _bits(x) == _bits(y), where


# --------------------------------------------------------------------------
# Round trips.
# --------------------------------------------------------------------------

# (format, n, m, packed, shape, sparse axis)
CASES = {
    "2:4 mxfp4 packed": ("mxfp4", 2, 4, True, (128, 48), 0),
    "2:4 mxfp4 unpacked": ("mxfp4", 2, 4, False, (128, 48), 0),
    "4:8 mxfp8": ("mxfp8", 4, 8, True, (256, 40), 0),
    "8:16 nvfp4": ("nvfp4", 8, 16, True, (256, 32), 0),
    "2:4 tensor_fp8_e4m3": ("tensor_fp8_e4m3", 2, 4, True, (64, 24), 0),
    "4:8 mxfp4 stacked layers, last axis": ("mxfp4", 4, 8, True, (3, 24, 192), -1),
}


def _sparse(case: str, seed: int = 0) -> jaxmx.NMSparseTensor:
    fmt, n, m, packed, shape, axis = CASES[case]
    w = normal(seed, shape, 2.0).at[(0,) * len(shape)].set(37.0)  # an outlier in a block
    return jaxmx.quantize_sparse(w, fmt, jaxmx.NMSparsity(n, m), axis=axis, packed=packed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bit_exact(tmp_path, backend, case):
    t = _sparse(case)
    path = _path(tmp_path, backend)
    info = jaxmx.save(path, {"w": t, "b": jnp.arange(3.0)})
    assert (info.num_sparse_tensors, info.num_mx_tensors, info.num_arrays) == (1, 0, 1)
    assert info.array_bytes == t.nbytes + 12
    back = jaxmx.load(path)
    assert set(back) == {"w", "b"}
    _assert_same_sparse(t, back["w"])
    assert back["w"].values.packed == t.values.packed
    assert back["w"].nbytes == t.nbytes


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_names_and_manifest_node(tmp_path, backend):
    t = _sparse("2:4 mxfp4 packed")  # 128 x 48, 64 kept along axis 0
    path = _path(tmp_path, backend)
    jaxmx.save(path, {"layer": {"kernel": t}})
    if backend == "safetensors":
        manifest, arrays, _ = st_read(path)
        assert sorted(arrays) == [
            "layer.kernel.indices",
            "layer.kernel.values.data",
            "layer.kernel.values.scale",
        ]
    else:
        manifest = json.loads((path / "jaxmx" / "metadata").read_text())
    assert manifest["jaxmx_checkpoint"] == 2  # a new node, not a new version
    node = manifest["tree"]["children"][0]["children"][0]
    assert node["type"] == "nm_sparse"
    assert (node["shape"], node["axis"], node["static"]) == (
        [128, 48],
        -2,
        {"n": 2, "m": 4, "length": 128},
    )
    assert node["values"]["type"] == "mx" and node["values"]["shape"] == [64, 48]
    assert node["values"]["leaves"]["data"]["name"] == "layer.kernel.values.data"
    idx = node["indices"]
    assert (idx["name"], idx["dtype"], idx["shape"]) == ("layer.kernel.indices", "uint8", [16, 48])
    assert isinstance(idx["crc32"], int)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(128, name="up")(x))
        h = nn.relu(nn.Dense(64, name="mid")(h))
        return nn.Dense(32, name="down")(h)


def _model():
    x = normal(1, (8, 64))
    params = MLP().init(jax.random.key(2), x)
    sparsity = {"up": jaxmx.NMSparsity(2, 4), "mid": jaxmx.NMSparsity(4, 8), "down": None}
    return x, params, jaxmx.quantize_params(params, "mxfp4", sparsity=sparsity)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_params_tree_round_trips_and_serves_the_same(tmp_path, backend):
    x, _, q = _model()
    p = q["params"]
    assert isinstance(p["up"]["kernel"], jaxmx.NMSparseTensor)
    assert isinstance(p["mid"]["kernel"], jaxmx.NMSparseTensor) and p["mid"]["kernel"].m == 8
    assert type(p["down"]["kernel"]) is jaxmx.MXTensor
    path = _path(tmp_path, backend)
    info = jaxmx.save(path, q)
    assert (info.num_sparse_tensors, info.num_mx_tensors, info.num_arrays) == (2, 1, 3)
    assert info.array_bytes == jaxmx.param_bytes(q)
    back = jaxmx.load(path)
    _assert_same_tree(q, back)

    served = jaxmx.intercept(MLP().apply, jaxmx.DotConfig(lhs="mxfp8", rhs="mxfp4"))
    before = jax.jit(served)(q, x)
    assert served.coverage.counts == "3 of 3 matmuls in MX"
    after = jax.jit(served)(back, x)
    assert _bits(before) == _bits(after)
    assert _bits(served(back, x)) == _bits(served(q, x))  # eager too
    # Not a vacuous comparison: the dense-quantized model serves another output.
    dense = jax.jit(served)(jaxmx.quantize_params(_model()[1], "mxfp4"), x)
    assert _bits(dense) != _bits(before)


def _mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (CPU) devices")
    return jax.sharding.Mesh(np.array(jax.devices()[:8]), ("model",))


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_restores_with_its_shardings(tmp_path, backend):
    _, _, q = _model()
    path = _path(tmp_path, backend)
    jaxmx.save(path, q)
    cols = NamedSharding(_mesh(), P(None, "model"))  # the output axis: blocks stay whole

    def sharded(s):
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cols)

    target = jax.eval_shape(lambda: q)
    up = target["params"]["up"]["kernel"]
    target["params"]["up"]["kernel"] = dataclasses.replace(
        up,
        values=dataclasses.replace(
            up.values, data=sharded(up.values.data), scale=sharded(up.values.scale)
        ),
        indices=sharded(up.indices),
    )
    back = jaxmx.load(path, target=target)
    _assert_same_tree(q, back)
    k = back["params"]["up"]["kernel"]
    assert k.values.data.sharding == k.values.scale.sharding == k.indices.sharding == cols


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_that_differs_is_an_error(tmp_path, backend):
    t = _sparse("2:4 mxfp4 packed")
    path = _path(tmp_path, backend)
    jaxmx.save(path, {"w": t})
    w = normal(0, (128, 48))
    other = jaxmx.quantize_sparse(w, "mxfp4", jaxmx.NMSparsity(1, 4), axis=0, block_size=16)
    with pytest.raises(
        ValueError, match=r"target tree\['w'\]: NMSparseTensor n is 1, the checkpoint's 2"
    ):
        jaxmx.load(path, target={"w": other})
    dense = jaxmx.quantize(w, "mxfp4", axis=0)
    with pytest.raises(
        ValueError,
        match=r"target tree\['w'\]: checkpoint holds an NMSparseTensor, target a MXTensor",
    ):
        jaxmx.load(path, target={"w": dense})
    wrong = dataclasses.replace(t, indices=jax.ShapeDtypeStruct((16, 48), jnp.int8))
    with pytest.raises(ValueError, match=r"target tree\['w'\]\['indices'\] is int8\[16, 48\]"):
        jaxmx.load(path, target={"w": wrong})


def test_layout_files_do_not_take_them(tmp_path):
    t = _sparse("2:4 mxfp4 packed")
    with pytest.raises(TypeError, match=r"tree\['w'\] is a NMSparseTensor"):
        jaxmx.save(tmp_path / "w.safetensors", {"w": t}, layout="gpt-oss")


# --------------------------------------------------------------------------
# Errors on save.
# --------------------------------------------------------------------------


def test_save_refuses_what_load_would(tmp_path):
    t = _sparse("2:4 mxfp4 packed")
    path = tmp_path / "w.safetensors"
    cut = dataclasses.replace(t, indices=t.indices[:-1])
    with pytest.raises(
        ValueError, match=r"tree\['w'\]: NMSparseTensor.indices must be uint8 of shape \(16, 48\)"
    ):
        jaxmx.save(path, {"w": cut})
    # Two kept values of a group at position 0: not 2 distinct positions.
    same = dataclasses.replace(t, indices=jnp.zeros_like(t.indices))
    with pytest.raises(
        ValueError,
        match=r"tree\['w'\]: its indices hold the positions \[0, 0\] in group 0 of 32 .*"
        r"needs 2 distinct ascending positions in 0 \.\. 3",
    ):
        jaxmx.save(path, {"w": same})
    with pytest.raises(
        TypeError, match=r"tree\['w'\] is an NMSparseTensor whose indices are a list"
    ):
        jaxmx.save(path, {"w": dataclasses.replace(t, indices=[1, 2])})
    assert not path.exists()


# --------------------------------------------------------------------------
# Errors on load: a manifest or arrays edited consistently (the backend's
# record and the checksums agree), so only the checks of the node catch it.
# --------------------------------------------------------------------------


def _refused(path, match):
    with pytest.raises(ValueError) as info:
        jaxmx.load(path)
    message = str(info.value)
    assert str(path) in message, message
    assert re.search(match, message), message
    return message


def _node(m):
    return m["tree"]["children"][0]


def _set_indices(m, arrays, a):
    arrays["w.indices"] = a
    entry = _node(m)["indices"]
    entry["shape"] = list(a.shape)
    entry["dtype"] = a.dtype.name
    entry["crc32"] = zlib.crc32(np.ascontiguousarray(a).tobytes())


AT = r"its jaxmx manifest is wrong at tree\.children\[0\]\."
# What a manifest edit does -> what load says (t: 2:4 of 128 x 48 along axis 0).
_MANIFEST_EDITS = {
    "indices one byte short": (
        lambda m, a: _set_indices(m, a, a["w.indices"][:-1]),
        AT + r"indices\.shape: is \[15, 48\]; 2:4 of 128 along axis -2 keeps 64 positions of "
        r"2 bits, 16 bytes packed: expected \[16, 48\]",
    ),
    "indices as int8": (
        lambda m, a: _set_indices(m, a, a["w.indices"].view(np.int8)),
        AT + r"indices\.dtype: is 'int8'; packed positions are uint8",
    ),
    "n changed": (
        lambda m, a: _node(m)["static"].update(n=3),
        AT
        + r"values\.shape: is \[64, 48\]; 3:4 of 128 along axis -2 keeps 96: expected \[96, 48\]",
    ),
    "m changed": (
        lambda m, a: _node(m)["static"].update(m=8),
        AT + r"values\.shape: is \[64, 48\]; 2:8 of 128 along axis -2 keeps 32",
    ),
    "n not below m": (
        lambda m, a: _node(m)["static"].update(n=4),
        AT + r"static: needs 0 < n < m, got n=4, m=4",
    ),
    "length not the dense shape's": (
        lambda m, a: _node(m)["static"].update(length=124),
        AT + r"static\.length: is 124; the dense shape \[128, 48\] is 128 long along axis -2",
    ),
    "axis out of range": (
        lambda m, a: _node(m).update(axis=-3),
        AT + r"axis: must be an axis of the shape \[128, 48\], -2 \.\. -1, got -3",
    ),
    "static field missing": (
        lambda m, a: _node(m)["static"].pop("length"),
        AT + r"static: must hold exactly \['n', 'm', 'length'\], got \['m', 'n'\]",
    ),
    "static field not an int": (
        lambda m, a: _node(m)["static"].update(m="4"),
        AT + r"static\.m: must be an int >= 0, got '4'",
    ),
    "values not an mx node": (
        lambda m, a: _node(m)["values"].update(type="array"),
        AT + r"values: must be an mx node \(the kept values\), got 'array'",
    ),
    "indices entry misnamed": (
        lambda m, a: _node(m)["indices"].update(name="w.idx"),
        AT + r"indices\.name: is 'w\.idx'; the array at this place is named 'w\.indices'",
    ),
    "unknown field": (
        lambda m, a: _node(m).update(pattern="2:4"),
        AT + r"pattern: is not a field of this node",
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_MANIFEST_EDITS))
def test_inconsistent_node_names_the_field_found_and_expected(tmp_path, backend, case):
    edit, match = _MANIFEST_EDITS[case]
    path = _path(tmp_path, backend)
    jaxmx.save(path, {"w": _sparse("2:4 mxfp4 packed"), "b": jnp.ones(2)})
    rewrite(path, backend, edit)
    _refused(path, match)


@pytest.mark.parametrize("backend", BACKENDS)
def test_positions_that_are_not_n_distinct_ascending_are_refused(tmp_path, backend):
    t = _sparse("2:4 mxfp4 packed")
    path = _path(tmp_path, backend)
    jaxmx.save(path, {"w": t})

    def swap_first_two(m, arrays):  # positions (p0, p1) of group 0 of column 5 -> (p1, p0)
        a = arrays["w.indices"].copy()
        byte = int(a[0, 5])
        p0, p1 = byte & 3, (byte >> 2) & 3
        a[0, 5] = (byte & ~15) | p0 << 2 | p1
        _set_indices(m, arrays, a)

    rewrite(path, backend, swap_first_two)
    _refused(
        path,
        r"the NMSparseTensor at tree\['w'\]: its indices hold the positions \[\d, \d\] in group "
        r"0 of 32 \(other axes at \(5,\), sparse axis -2 moved last\); each group of 4 needs 2 "
        r"distinct ascending positions",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_changed_index_bytes_are_caught_by_the_checksum(tmp_path, backend):
    path = _path(tmp_path, backend)
    jaxmx.save(path, {"w": _sparse("4:8 mxfp8")})

    def flip(m, arrays):
        arrays["w.indices"] = arrays["w.indices"] ^ np.uint8(0x40)

    rewrite(path, backend, flip)
    _refused(path, r"the bytes of (tensor|array) 'w\.indices' do not match their checksum")
