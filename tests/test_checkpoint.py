"""jaxmx.save / jaxmx.load: bit-exact round trips of trees holding MXTensors.

Every registered format, packed and unpacked, partial last blocks, blocks
along a non-last axis, nested trees with plain arrays, both backends, with
and without a target (sharded over the 8 CPU devices of conftest), custom
formats, and the errors. Leaves are compared as raw bytes, so an E8M0 NaN
scale (0xFF) or a negative-zero code must survive too.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmx
from jaxmx import checkpoint
from tests import reference
from tests._checkpoint_files import rewrite, st_read, st_write
from tests._checkpoint_files import seal as reseal
from tests._params import covering

BACKENDS = ["orbax", "safetensors"]


def _suffix(backend):
    return "ckpt.safetensors" if backend == "safetensors" else "ckpt"


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return np.asarray(a, order="C").reshape(-1).view(np.uint8)


def _assert_same_leaf(a, b, where="leaf"):
    assert np.dtype(a.dtype) == np.dtype(b.dtype), where
    assert tuple(a.shape) == tuple(b.shape), where
    assert np.array_equal(_bits(a), _bits(b)), where


def _static(t: jaxmx.MXTensor) -> dict:
    return {f.name: getattr(t, f.name) for f in dataclasses.fields(t) if f.metadata.get("static")}


def _assert_same_tree(a, b):
    is_mx = lambda x: isinstance(x, jaxmx.MXTensor)  # noqa: E731
    la, ta = jax.tree.flatten(a, is_leaf=is_mx)
    lb, tb = jax.tree.flatten(b, is_leaf=is_mx)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert type(x) is type(y) or (not is_mx(x) and not is_mx(y))
        if is_mx(x):
            assert _static(x) == _static(y)
            assert x.shape == y.shape
            _assert_same_leaf(x.data, y.data, "data")
            for leaf in ("scale", "tensor_scale", "micro"):
                u, v = getattr(x, leaf), getattr(y, leaf)
                assert (u is None) == (v is None), leaf
                if u is not None:
                    _assert_same_leaf(u, v, leaf)
            dx, dy = jaxmx.dequantize(x), jaxmx.dequantize(y)
            _assert_same_leaf(dx, dy, "dequantized")
        else:
            assert isinstance(y, jax.Array)
            _assert_same_leaf(x, y)


def _weights(shape, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-6, 6, shape))
    return jnp.asarray(x.astype(np.float32)).astype(dtype)


# --------------------------------------------------------------------------
# Every format, packed and unpacked, odd lengths, axis not last.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,packed,backend",
    covering(
        [(f, p, b) for f in reference.OCP_FORMATS for p in (False, True) for b in BACKENDS],
        every=5,
    ),
)
def test_every_format_round_trips_bit_exactly(tmp_path, fmt, packed, backend):
    x = _weights((37, 5, 3), seed=hash(fmt) % 1000)
    x = x.at[0, 0, 0].set(jnp.nan)  # a NaN block: scale 0xFF
    tree = {
        "last": jaxmx.quantize(x, fmt, axis=-1, packed=packed),
        # 37 along the block axis: one whole block and a partial one of 5
        "first": jaxmx.quantize(x, fmt, axis=0, packed=packed),
        "middle_b16": jaxmx.quantize(
            x.astype(jnp.bfloat16), fmt, axis=1, block_size=2, packed=packed
        ),
    }
    assert jaxmx.get_format(fmt).element.bits % 8 == 0 or tree["first"].packed == packed
    info = jaxmx.save(tmp_path / _suffix(backend), tree)
    assert info.num_mx_tensors == 3 and info.num_arrays == 0
    assert info.array_bytes == sum(t.nbytes for t in tree.values())
    loaded = jaxmx.load(tmp_path / _suffix(backend))
    assert all(isinstance(v, jaxmx.MXTensor) for v in loaded.values())
    assert _bits(loaded["first"].scale)[0] == 0xFF
    _assert_same_tree(tree, loaded)


def _other_families():
    # Every other non-OCP format once in make test (packing and backend rotate); the
    # full product in make test-slow.
    out = []
    others = [f for f in jaxmx.list_formats() if f not in reference.OCP_FORMATS]
    for i, f in enumerate(others):
        for j, (packed, backend) in enumerate((p, b) for p in (False, True) for b in BACKENDS):
            fast = i % 2 == 0 and j == (i // 2) % 4  # every (packed, backend) once
            out.append(pytest.param(f, packed, backend, marks=() if fast else pytest.mark.slow))
    return out


@pytest.mark.parametrize("fmt,packed,backend", _other_families())
def test_other_families_round_trip_bit_exactly(tmp_path, fmt, packed, backend):
    # Tensor scales, E4M3 block scales, microexponent bits: every leaf back.
    x = _weights((32, 48), seed=hash(fmt) % 1000)
    tree = {
        "last": jaxmx.quantize(x, fmt, axis=-1, packed=packed),
        "first": jaxmx.quantize(x.astype(jnp.bfloat16), fmt, axis=0, packed=packed),
    }
    if fmt == "nvfp4":
        tree["tiles"] = jaxmx.quantize(x, fmt, block_size=(16, 16), packed=packed)
    info = jaxmx.save(tmp_path / _suffix(backend), tree)
    assert info.array_bytes == sum(t.nbytes for t in tree.values())
    loaded = jaxmx.load(tmp_path / _suffix(backend))
    _assert_same_tree(tree, loaded)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_tree_with_plain_arrays_keeps_containers_and_dtypes(tmp_path, backend):
    w = _weights((64, 48), 1)
    tree = {
        "params": {
            "Dense_0": {
                "kernel": jaxmx.quantize(w, "mxfp4", axis=0, packed=True),
                "bias": jnp.arange(48, dtype=jnp.float32),
            },
            "embed": jaxmx.quantize(w.astype(jnp.bfloat16), "mxfp8_e5m2"),
            "norm": jnp.ones(7, jnp.bfloat16) * 1.5,
        },
        "layers": [
            jaxmx.quantize(w[:33], "mxint8", axis=0),
            (np.arange(6, dtype=np.int32).reshape(2, 3), None, jnp.array(True)),
        ],
        "step": np.asarray(12, np.int64),
        "empty": {},
        "by_int": {3: jnp.full((2,), -0.0, jnp.float16)},
    }
    info = jaxmx.save(tmp_path / _suffix(backend), tree)
    assert (info.num_arrays, info.num_mx_tensors) == (6, 3)
    jax.config.update("jax_enable_x64", True)  # the int64 leaf
    try:
        loaded = jaxmx.load(tmp_path / _suffix(backend))
    finally:
        jax.config.update("jax_enable_x64", False)
    assert type(loaded["layers"]) is list and type(loaded["layers"][1]) is tuple
    assert loaded["layers"][1][1] is None and loaded["empty"] == {} and 3 in loaded["by_int"]
    _assert_same_tree(tree, loaded)


def test_int64_leaf_without_x64_is_refused_not_narrowed(tmp_path):
    jaxmx.save(tmp_path / "c", {"step": np.asarray(2**40, np.int64)})
    with pytest.raises(ValueError, match="int64.*jax_enable_x64"):
        jaxmx.load(tmp_path / "c")


# --------------------------------------------------------------------------
# Targets and sharding.
# --------------------------------------------------------------------------


def _mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (CPU) devices")
    return jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_tree_restores_with_the_targets_shardings(tmp_path, backend):
    mesh = _mesh()
    w = _weights((256, 64), 2)
    spec = NamedSharding(mesh, P("model", "data"))
    t = jaxmx.quantize(jax.device_put(w, spec), "mxfp4", axis=0, packed=True)
    t = dataclasses.replace(
        t, data=jax.device_put(t.data, spec), scale=jax.device_put(t.scale, spec)
    )
    b = jax.device_put(jnp.arange(64.0), NamedSharding(mesh, P("model")))
    tree = {"w": t, "b": b}
    jaxmx.save(tmp_path / _suffix(backend), tree)

    target = {"w": t, "b": b}
    loaded = jaxmx.load(tmp_path / _suffix(backend), target=target)
    _assert_same_tree(tree, loaded)
    assert loaded["w"].data.sharding == spec and loaded["w"].scale.sharding == spec
    assert loaded["b"].sharding == b.sharding

    # A target of shapes only (jax.eval_shape), with other shardings.
    other = NamedSharding(mesh, P(None, "model"))
    shapes = jax.eval_shape(lambda: tree)
    shapes["w"] = dataclasses.replace(
        shapes["w"],
        data=jax.ShapeDtypeStruct(t.data.shape, t.data.dtype, sharding=other),
        scale=jax.ShapeDtypeStruct(t.scale.shape, t.scale.dtype, sharding=other),
    )
    loaded = jaxmx.load(tmp_path / _suffix(backend), target=shapes)
    assert loaded["w"].data.sharding == other and loaded["w"].scale.sharding == other
    _assert_same_tree(tree, loaded)

    # Without a target: one device, same values.
    loaded = jaxmx.load(tmp_path / _suffix(backend))
    assert len(loaded["w"].data.sharding.device_set) == 1
    _assert_same_tree(tree, loaded)


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_that_does_not_match_is_an_error(tmp_path, backend):
    w = _weights((64, 32), 3)
    t = jaxmx.quantize(w, "mxfp6_e3m2", axis=0, packed=True)
    path = tmp_path / _suffix(backend)
    jaxmx.save(path, {"w": t, "b": jnp.zeros(3)})
    bad_targets = {
        "MXTensor packed is False": {"w": jaxmx.unpack(t), "b": jnp.zeros(3)},
        "MXTensor format": {
            "w": jaxmx.quantize(w, "mxfp6_e2m3", axis=0, packed=True),
            "b": jnp.zeros(3),
        },
        r"float32\[4\], the checkpoint holds float32\[3\]": {"w": t, "b": jnp.zeros(4)},
        r"bfloat16\[3\], the checkpoint holds float32\[3\]": {
            "w": t,
            "b": jnp.zeros(3, jnp.bfloat16),
        },
        "holds an MXTensor": {"w": w, "b": jnp.zeros(3)},
        "has keys": {"w": t},
        "is a list, the checkpoint holds a dict": [t, jnp.zeros(3)],
    }
    for message, target in bad_targets.items():
        with pytest.raises(ValueError, match=message):
            jaxmx.load(path, target=target)


# --------------------------------------------------------------------------
# Custom formats.
# --------------------------------------------------------------------------

E3M4 = jaxmx.ElementFormat(
    name="fp8_e3m4_test",
    kind="float",
    bits=8,
    exponent_bits=3,
    mantissa_bits=4,
    bias=3,
    max_normal=float.fromhex("0x1.Fp4"),  # 31 = 1.9375 * 2^4, code S.111.1111
    min_normal=float.fromhex("0x1p-2"),
    min_subnormal=float.fromhex("0x1p-6"),
    max_code=0x7F,
)


def _custom(name, block_size=16, element=E3M4):
    return jaxmx.MXFormat(
        name=name,
        element=element,
        scale=jaxmx.formats.E8M0,
        block_size=block_size,
        reference="test",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_unregistered_custom_format_is_rebuilt_from_its_card(tmp_path, backend):
    fmt = _custom("ckpt_unregistered_e3m4")
    five = _custom("ckpt_unregistered_e2m2", element=jaxmx.formats.float_format(2, 2, name="e2m2"))
    x = _weights((3, 40), 4)
    tree = {"a": jaxmx.quantize(x, fmt), "b": jaxmx.quantize(x, five, packed=True)}
    assert tree["b"].packed  # 5-bit codes: 8 per 5 bytes
    jaxmx.save(tmp_path / _suffix(backend), tree)
    loaded = jaxmx.load(tmp_path / _suffix(backend))
    assert loaded["a"].format == fmt and loaded["b"].format == five
    assert "ckpt_unregistered_e3m4" not in jaxmx.list_formats()  # load registers nothing
    _assert_same_tree(tree, loaded)


@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_custom_format_loads_as_the_registered_record(tmp_path, backend):
    name = f"ckpt_registered_{backend}"
    fmt = jaxmx.register_format(_custom(name))
    t = jaxmx.quantize(_weights((2, 48), 5), name)
    jaxmx.save(tmp_path / _suffix(backend), [t])
    loaded = jaxmx.load(tmp_path / _suffix(backend))
    assert loaded[0].format is fmt
    _assert_same_tree([t], loaded)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_format_whose_name_is_registered_differently_is_refused(tmp_path, backend):
    clash = _custom("mxfp8_e4m3", block_size=32)  # the registered name, other element
    t = jaxmx.quantize(_weights((2, 48), 6), clash)
    jaxmx.save(tmp_path / _suffix(backend), {"w": t})
    with pytest.raises(
        ValueError,
        match=r"'mxfp8_e4m3' differs from the format registered.*"
        r"element\.bias: registered 7, checkpoint 3",
    ):
        jaxmx.load(tmp_path / _suffix(backend))


def test_two_formats_of_one_name_in_a_tree_are_refused(tmp_path):
    x = _weights((2, 32), 7)
    tree = [jaxmx.quantize(x, _custom("twin")), jaxmx.quantize(x, _custom("twin", 32))]
    with pytest.raises(ValueError, match="'twin' that differs from another format"):
        jaxmx.save(tmp_path / "c", tree)


# --------------------------------------------------------------------------
# The safetensors file as other readers see it.
# --------------------------------------------------------------------------


def test_safetensors_header_names_dtypes_and_layout(tmp_path):
    from safetensors import safe_open

    w = _weights((64, 32), 8)
    tree = {
        "params": {
            "w": jaxmx.quantize(w, "mxfp4", axis=0, packed=True),
            "v": jaxmx.quantize(w, "mxfp8", axis=0),
            "a.b": jnp.ones(2, jnp.bfloat16),
        }
    }
    path = tmp_path / "m.safetensors"
    info = jaxmx.save(path, tree)
    assert info.disk_bytes == path.stat().st_size
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    assert header["params.w.data"]["dtype"] == "U8"  # packed codes
    assert header["params.w.scale"]["dtype"] == "U8"  # E8M0 bits
    assert header["params.v.data"]["dtype"] == "F8_E4M3"
    assert header["params.a~2b"]["dtype"] == "BF16"  # "." in a key is escaped
    manifest = json.loads(header["__metadata__"]["jaxmx"])
    node = manifest["tree"]["children"][0]["children"][0]
    assert (
        node["static"].items()
        >= {
            "format": {"format": "mxfp4_e2m1"},
            "axis": -2,
            "block_size": 32,
            "length": 64,
            "dtype": {"dtype": "float32"},
            "packed": True,
        }.items()
    )
    assert set(node["static"]) == set(_static(tree["params"]["w"]))  # every static field
    # Named, not positional; the leaves an MXFP4 tensor does not have are None.
    assert set(node["leaves"]) == {"data", "scale", "tensor_scale", "micro"}
    assert node["leaves"]["tensor_scale"] is None and node["leaves"]["micro"] is None
    scale_bits = _bits(tree["params"]["w"].scale)
    assert node["leaves"]["scale"] == {
        "name": "params.w.scale",
        "dtype": "float8_e8m0fnu",
        "shape": [2, 32],
        "stored_dtype": "uint8",
        "crc32": zlib.crc32(scale_bits),  # of the bytes as stored
    }
    assert manifest["jaxmx_checkpoint"] == 2
    body = json.dumps(
        {"formats": manifest["formats"], "tree": manifest["tree"]},
        sort_keys=True,
        separators=(",", ":"),
    )
    assert manifest["crc32"] == zlib.crc32(body.encode())
    assert manifest["formats"]["mxfp4_e2m1"]["fields"]["element"]["fields"]["bits"] == 4
    # safetensors' own reader sees the manifest and opens the E8M0 scales as their bytes.
    with safe_open(path, framework="np") as f:
        assert json.loads(f.metadata()["jaxmx"]) == manifest
        scale = f.get_tensor("params.w.scale")
    np.testing.assert_array_equal(scale, _bits(tree["params"]["w"].scale).reshape(2, 32))


def test_unpacked_fp4_from_a_float4_holder_loads_in_this_backends_dtype(tmp_path):
    t = jaxmx.quantize(_weights((4, 64), 9), "mxfp4")
    codes = np.asarray(t.data)
    as_f4 = dataclasses.replace(t, data=jnp.asarray(codes.view(ml_dtypes.float4_e2m1fn)))
    for backend in BACKENDS:
        path = tmp_path / _suffix(backend)
        jaxmx.save(path, {"w": as_f4}, overwrite=True)
        loaded = jaxmx.load(path)["w"]
        assert loaded.data.dtype == jaxmx.codes.storage_dtype(t.format.element)
        _assert_same_tree({"w": t}, {"w": loaded})


# --------------------------------------------------------------------------
# Bytes on disk.
# --------------------------------------------------------------------------


def test_packed_mxfp4_takes_about_4_25_bits_per_element_on_disk(tmp_path):
    w = _weights((512, 512), 10)
    sizes = {}
    for name, tree in {
        "f32": {"w": w},
        "bf16": {"w": w.astype(jnp.bfloat16)},
        "mxfp4": {"w": jaxmx.quantize(w, "mxfp4", axis=0, packed=True)},
    }.items():
        sizes[name] = jaxmx.save(tmp_path / f"{name}.safetensors", tree).disk_bytes
        orbax = jaxmx.save(tmp_path / name, tree)
        assert orbax.disk_bytes > 0
    n = w.size
    assert 4 * n < sizes["f32"] < 4 * n + 4096
    assert 2 * n < sizes["bf16"] < 2 * n + 4096
    assert n * 4.25 / 8 < sizes["mxfp4"] < n * 4.25 / 8 + 8192


# --------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nowhere"):
        jaxmx.load(tmp_path / "nowhere")


def test_not_a_jaxmx_checkpoint(tmp_path):
    import orbax.checkpoint as ocp
    from safetensors.numpy import save_file

    with ocp.StandardCheckpointer() as c:
        c.save(tmp_path / "plain", {"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="not a jaxmx checkpoint: it has no 'jaxmx' item"):
        jaxmx.load(tmp_path / "plain")
    save_file(
        {"w": np.ones(3, np.float32)}, tmp_path / "plain.safetensors", metadata={"format": "np"}
    )
    with pytest.raises(ValueError, match=r"no __metadata__\['jaxmx'\] \(keys: \['format'\]\)"):
        jaxmx.load(tmp_path / "plain.safetensors")
    (tmp_path / "text.safetensors").write_text("hello, not a checkpoint")
    with pytest.raises(ValueError, match="not a safetensors file"):
        jaxmx.load(tmp_path / "text.safetensors")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="has no 'jaxmx' item"):
        jaxmx.load(tmp_path / "emptydir")


def test_save_refuses_what_it_cannot_store(tmp_path):
    t = jaxmx.quantize(jnp.ones((2, 32)), "mxfp8")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        jaxmx.save(tmp_path, {"w": t})
    cases = {
        "tree\\['a'\\] is a builtins.float": {"a": 1.0},
        "key \\(1, 2\\) of type tuple": {(1, 2): t},
        "OrderedDict": __import__("collections").OrderedDict(w=t),
        "holds no arrays": {"a": None, "b": []},
    }
    for message, tree in cases.items():
        with pytest.raises((TypeError, ValueError), match=message):
            jaxmx.save(tmp_path / "x", tree)
    with pytest.raises(ValueError, match="stored name '1.data'"):
        jaxmx.save(tmp_path / "x", {1: t, "1": t})
    with pytest.raises(ValueError, match="unknown backend 'npz'; allowed: orbax, safetensors"):
        jaxmx.save(tmp_path / "x", {"w": t}, backend="npz")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        jaxmx.save(3, {"w": t})


@pytest.mark.parametrize("backend", BACKENDS)
def test_overwrite_replaces(tmp_path, backend):
    path = tmp_path / _suffix(backend)
    jaxmx.save(path, {"w": jnp.zeros(3)})
    jaxmx.save(path, {"w": jnp.ones(4)}, overwrite=True)
    np.testing.assert_array_equal(jaxmx.load(path)["w"], np.ones(4))


def test_missing_extra_names_the_install(monkeypatch, tmp_path):
    import builtins

    real = builtins.__import__

    def no_orbax(name, *args, **kwargs):
        if name.startswith("orbax"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_orbax)
    with pytest.raises(ImportError, match="pip install orbax-checkpoint"):
        jaxmx.save(tmp_path / "c", {"w": jnp.ones(2)})
    # safetensors needs no orbax
    jaxmx.save(tmp_path / "c.safetensors", {"w": jnp.ones(2)})
    assert checkpoint.load(tmp_path / "c.safetensors")["w"].shape == (2,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flax_linen_params_with_quantized_kernels(tmp_path, backend):
    import flax.linen as nn

    model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(10)])
    x = jnp.ones((2, 48))
    params = model.init(jax.random.key(0), x)
    quantized = jax.tree.map_with_path(
        lambda p, a: (
            jaxmx.quantize(a, "mxfp4", axis=0, packed=True) if p[-1].key == "kernel" else a
        ),
        params,
    )
    jaxmx.save(tmp_path / _suffix(backend), quantized)
    loaded = jaxmx.load(tmp_path / _suffix(backend))
    _assert_same_tree(quantized, loaded)

    def run(tree):
        deq = jax.tree.map(
            lambda a: jaxmx.dequantize(a) if isinstance(a, jaxmx.MXTensor) else a,
            tree,
            is_leaf=lambda a: isinstance(a, jaxmx.MXTensor),
        )
        return model.apply(deq, x)

    out = run(loaded)
    np.testing.assert_array_equal(out, run(quantized))
    assert not np.array_equal(out, model.apply(params, x))  # the kernels really are MXFP4


# --------------------------------------------------------------------------
# Damaged, truncated and inconsistent checkpoints: a ValueError naming the
# file, never a wrong tree. Each test below failed on the loader before it
# checked what it reads (said in its docstring); the random version of all of
# them is tests/test_fuzz_checkpoint.py.
# --------------------------------------------------------------------------


def _edit_manifest(path, backend, edit, seal=True):
    """Changes the manifest only, in place (orbax: its JSON file)."""
    if backend == "safetensors":
        manifest, arrays, _ = st_read(path)
        edit(manifest)
        st_write(path, reseal(manifest) if seal else manifest, arrays)
    else:
        file = path / "jaxmx" / "metadata"
        manifest = json.loads(file.read_text())
        edit(manifest)
        file.write_text(json.dumps(reseal(manifest) if seal else manifest))


def _refused(path, match=None):
    """load raises a ValueError that names the file (and matches ``match``)."""
    with pytest.raises(ValueError) as info:
        jaxmx.load(path)
    assert str(path) in str(info.value), info.value
    if match is not None:
        assert __import__("re").search(match, str(info.value)), info.value
    return str(info.value)


def _nvfp4(seed=20):
    return jaxmx.quantize(_weights((32, 48), seed), "nvfp4")


@pytest.mark.parametrize("backend", BACKENDS)
def test_manifest_naming_another_format_over_the_leaves_is_refused(tmp_path, backend):
    """An MXFP4 manifest over NVFP4 leaves (E4M3 scales, a tensor scale): refused.

    Failed before: the loader built the MXTensor from whatever the manifest
    named, and the values decoded up to 2.69 away.
    """
    other = tmp_path / ("other" + _suffix(backend))
    jaxmx.save(other, {"w": jaxmx.quantize(_weights((32, 48), 21), "mxfp4")})
    if backend == "safetensors":
        mxfp4_card = st_read(other)[0]["formats"]["mxfp4_e2m1"]
    else:
        mxfp4_card = json.loads((other / "jaxmx" / "metadata").read_text())["formats"]
        mxfp4_card = mxfp4_card["mxfp4_e2m1"]
    path = tmp_path / _suffix(backend)
    jaxmx.save(path, {"w": _nvfp4()})

    def as_mxfp4(m):
        m["formats"] = {"mxfp4_e2m1": mxfp4_card}
        m["tree"]["children"][0]["static"]["format"] = {"format": "mxfp4_e2m1"}

    _edit_manifest(path, backend, as_mxfp4)
    _refused(path, r"tree\['w'\].*mxfp4_e2m1 MXTensor's scale is float8_e4m3fn")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_scale_stored_as_int32_is_refused(tmp_path, backend):
    """A tensor scale held as int32 (header, orbax and manifest agreeing): refused.

    Failed before: it loaded, and its bits read as an int decoded to 2.6e12.
    """
    path = tmp_path / _suffix(backend)
    jaxmx.save(path, {"w": _nvfp4()})

    def to_int32(m, arrays):
        arrays["w.tensor_scale"] = arrays["w.tensor_scale"].view(np.int32)
        m["tree"]["children"][0]["leaves"]["tensor_scale"]["dtype"] = "int32"

    rewrite(path, backend, to_int32)
    _refused(path, "tensor_scale is int32; nvfp4 holds a per-tensor scale in float32")


def test_mxtensor_refuses_leaves_of_another_format_but_not_jax_placeholders():
    """The same check where MXTensors are built from given leaves (dtypes and
    presence; shapes are checked by check_leaves, on load). Failed before:
    MXTensor took any leaves."""
    t = _nvfp4()
    mxfp4 = jaxmx.get_format("mxfp4")
    with pytest.raises(ValueError, match="scale is float8_e4m3fn; mxfp4_e2m1 holds block scales"):
        dataclasses.replace(t, format=mxfp4, tensor_scale=None)
    with pytest.raises(ValueError, match="holds a tensor_scale, but mxfp4_e2m1 has no"):
        dataclasses.replace(
            t, format=mxfp4, scale=jax.lax.bitcast_convert_type(t.scale, jnp.float8_e8m0fnu)
        )
    with pytest.raises(ValueError, match="has no tensor_scale; nvfp4 has a per-tensor scale"):
        dataclasses.replace(t, tensor_scale=None)
    with pytest.raises(ValueError, match="data \\(its codes\\) is float32"):
        dataclasses.replace(t, data=t.data.astype(jnp.float32))
    # JAX rebuilds MXTensors with placeholders while transforming them.
    assert jax.tree.map(lambda a: None, t).data is None
    axes = jax.tree.map(lambda a: 0, t)
    assert axes.data == 0
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), t)
    np.testing.assert_array_equal(
        jax.vmap(jaxmx.dequantize, in_axes=(axes,))(stacked)[1], jaxmx.dequantize(t)
    )
    assert jax.eval_shape(lambda: t).scale.dtype == jnp.float8_e4m3fn
    g = jax.grad(lambda u: jaxmx.dequantize(u).sum(), allow_int=True)(t)  # float0 leaves
    assert g.data.dtype == jax.dtypes.float0
    checkpoint_check = jaxmx.tensor.check_leaves
    checkpoint_check(jax.vmap(lambda a: jaxmx.quantize(a, "nvfp4"))(jnp.ones((3, 4, 32))))
    with pytest.raises(ValueError, match="tensor_scale has shape \\(2,\\)"):
        checkpoint_check(dataclasses.replace(t, tensor_scale=jnp.ones(2, jnp.float32)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_record_and_manifest_must_agree(tmp_path, backend):
    """The safetensors header (or orbax's record) and the manifest disagree: refused,
    naming the file, the tensor and both descriptions.

    Failed before: safetensors returned an array of the header's shape ((2, 2)
    for a saved (4,)) or read F32 bytes as int32; orbax cast float32 values to
    the manifest's int32.
    """
    path = tmp_path / _suffix(backend)
    jaxmx.save(path, {"v": jnp.arange(4.0) + 0.5})
    if backend == "safetensors":
        manifest, arrays, _ = st_read(path)
        arrays["v"] = arrays["v"].reshape(2, 2)
        st_write(path, manifest, arrays)
        _refused(path, r"'v' is F32\[2, 2\] in the safetensors header but float32\[4\]")
        jaxmx.save(path, {"v": jnp.arange(4.0) + 0.5}, overwrite=True)
    _edit_manifest(path, backend, lambda m: m["tree"]["children"][0].update(dtype="int32"))
    _refused(path, r"'v' is (F32\[4\]|float32\[4\]) in .* but int32\[4\]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_overwrite_leaves_what_is_not_a_checkpoint_alone(tmp_path, backend):
    """overwrite=True replaces a checkpoint, nothing else. Failed before: a
    directory of other files was deleted (orbax) and a file of another kind
    replaced (safetensors)."""
    t = {"w": jnp.ones(3)}
    folder = tmp_path / ("notes" + (".safetensors" if backend == "safetensors" else ""))
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    file = tmp_path / ("notes.txt" if backend == "orbax" else "notes2.safetensors")
    file.write_text("mine too")
    for path in (folder, file):
        with pytest.raises(FileExistsError, match=f"not a jaxmx {backend} checkpoint"):
            jaxmx.save(path, t, overwrite=True, backend=backend)
    assert (folder / "keep.txt").read_text() == "mine" and file.read_text() == "mine too"
    if backend == "orbax":  # an orbax checkpoint jaxmx did not write
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as c:
            c.save(tmp_path / "plain", {"w": jnp.ones(3)})
        with pytest.raises(FileExistsError, match="not a jaxmx orbax checkpoint"):
            jaxmx.save(tmp_path / "plain", t, overwrite=True)
        assert (tmp_path / "plain").is_dir()


def test_truncated_or_misaddressed_safetensors_is_refused(tmp_path):
    """Truncation, offsets past the end, overlapping tensors, byte counts that
    do not fit dtype x shape: refused as damage, naming the file. Failed
    before: numpy's "cannot reshape array of size 1014", or (overlap) a tree
    whose two arrays silently held the same bytes."""
    path = tmp_path / "c.safetensors"
    tree = {"w": jaxmx.quantize(_weights((16, 64), 22), "mxfp8"), "a": jnp.arange(4.0)}
    tree["b"] = jnp.ones(4)
    jaxmx.save(path, tree)
    whole = path.read_bytes()
    path.write_bytes(whole[:-10])
    _refused(path, "truncated")
    path.write_bytes(whole)
    manifest, arrays, _ = st_read(path)

    def past_end(h):
        last = max(h.values(), key=lambda e: e["data_offsets"][1])
        last["data_offsets"] = [o + 8 for o in last["data_offsets"]]

    def overlap(h):
        h["b"]["data_offsets"] = list(h["a"]["data_offsets"])

    def wrong_count(h):
        h["a"]["shape"] = [3]

    for edit, match in (
        (past_end, "truncated or damaged"),
        (overlap, "damaged: the bytes of tensor .b. .* overlap"),
        (wrong_count, r"damaged: tensor 'a' \(F32\[3\]\) needs 12 bytes"),
    ):
        st_write(path, manifest, arrays, edit)
        _refused(path, match)


_MALFORMED = {
    "not JSON": (None, "not valid JSON"),
    "no tree": (lambda m: m.pop("tree"), r"at tree: missing"),
    "node without children": (lambda m: m["tree"].pop("children"), r"at tree\.children: missing"),
    "more keys than children": (
        lambda m: m["tree"]["keys"].append("x"),
        r"at tree\.keys: has 3 keys for 2 children",
    ),
    "leaf without a name": (
        lambda m: m["tree"]["children"][0]["leaves"]["scale"].pop("name"),
        r"at tree\.children\[0\]\.leaves\.scale\.name: missing",
    ),
    "dtype not a string": (
        lambda m: m["tree"]["children"][0]["leaves"]["scale"].update(dtype=7),
        r"at tree\.children\[0\]\.leaves\.scale\.dtype: a dtype name is a string",
    ),
    "unknown node type": (
        lambda m: m["tree"]["children"][1].update(type="set"),
        r"at tree\.children\[1\]\.type: is 'set'",
    ),
    "missing static field": (
        lambda m: m["tree"]["children"][0]["static"].pop("length"),
        r"at tree\.children\[0\]\.static\.length: missing",
    ),
    "format card of another class": (
        lambda m: m["formats"]["mxfp8_e4m3"].update({"class": "os.system"}),
        r"at formats\['mxfp8_e4m3'\]\.class: is 'os.system'",
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_MALFORMED))
def test_malformed_manifest_names_the_file_and_the_field(tmp_path, backend, case):
    """Failed before: bare JSONDecodeError without the path, KeyError: 'tree' or
    'children', "zip() argument 2 is longer", "None is not a valid value"."""
    edit, match = _MALFORMED[case]
    path = tmp_path / _suffix(backend)
    jaxmx.save(path, {"w": jaxmx.quantize(_weights((4, 32), 23), "mxfp8"), "b": jnp.ones(2)})
    if edit is not None:
        _edit_manifest(path, backend, edit)
    elif backend == "safetensors":
        _, arrays, _ = st_read(path)
        st_write(path, '{"jaxmx_checkpoint": 2, "tree": [', arrays)
    else:
        (path / "jaxmx" / "metadata").write_text('{"jaxmx_checkpoint": 2, "tree": [')
        match = "manifest cannot be read"
    _refused(path, match)


@pytest.mark.parametrize("backend", BACKENDS)
def test_changed_bytes_are_caught_by_the_checksums(tmp_path, backend):
    """Flipped bytes in a tensor (safetensors), other values written by orbax
    under the old manifest, and a changed manifest field: refused, naming the
    tensor or the manifest. Failed before: all three loaded silently."""
    path = tmp_path / _suffix(backend)
    tree = {"w": jaxmx.quantize(_weights((16, 64), 24), "mxfp8"), "b": jnp.arange(3.0)}
    jaxmx.save(path, tree)
    if backend == "safetensors":
        whole = path.read_bytes()
        _, _, header = st_read(path)
        n = struct.unpack("<Q", whole[:8])[0]
        start, end = header["w.data"]["data_offsets"]
        raw = bytearray(whole)
        raw[8 + n + (start + end) // 2] ^= 0x10
        path.write_bytes(bytes(raw))
        _refused(path, r"damaged: the bytes of tensor 'w.data' do not match their checksum")
        path.write_bytes(whole)
    else:

        def other_values(m, arrays):
            arrays["b"] = arrays["b"] + 1

        rewrite(path, backend, other_values)
        _refused(path, r"damaged: the bytes of array 'b' do not match their checksum")
        jaxmx.save(path, tree, overwrite=True)
    # made_ndim 2 -> 3 on a 2-D tensor decodes alike but is not what was saved.
    _edit_manifest(
        path, backend, lambda m: m["tree"]["children"][0]["static"].update(made_ndim=3), seal=False
    )
    _refused(path, "crc32: the manifest does not match its checksum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_format_cards_written_before_the_family_rename_still_load(tmp_path, backend):
    path = tmp_path / _suffix(backend)
    tree = {"w": _nvfp4(), "m": jaxmx.quantize(jnp.linspace(-2.0, 2.0, 64), "mx6")}
    jaxmx.save(path, tree)

    def to_codec(m):
        for card in m["formats"].values():
            card["fields"]["codec"] = card["fields"].pop("family")

    _edit_manifest(path, backend, to_codec)
    _assert_same_tree(tree, jaxmx.load(path))


@pytest.mark.parametrize("backend", BACKENDS)
def test_version_1_checkpoints_without_checksums_still_load(tmp_path, backend):
    path = tmp_path / _suffix(backend)
    tree = {"w": _nvfp4(), "b": jnp.arange(3.0)}
    jaxmx.save(path, tree)

    def to_version_1(m):
        m["jaxmx_checkpoint"] = 1
        del m["crc32"]
        for node in (m["tree"]["children"][0]["leaves"]["data"], m["tree"]["children"][1]):
            del node["crc32"]
        for leaf in m["tree"]["children"][0]["leaves"].values():
            if leaf is not None:
                leaf.pop("crc32", None)

    _edit_manifest(path, backend, to_version_1)
    _assert_same_tree(tree, jaxmx.load(path))
