"""jaxmx.load / jaxmx.save in the layouts gpt-oss, compressed-tensors and ModelOpt ship.

The files loaded here are written by NumPy encoders of each layout written
out below from its published conventions (not by jaxmx), with a hand-written
safetensors writer; each is decoded the way the layout's own reference code
decodes it, in NumPy float32, and the loaded MXTensor must hold the same
codes and scales and decode to the same bits. Files jaxmx writes are read
back by the same hand-written reader and checked against the same
conventions, and every save-then-load must give back the same tree.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxmx
from tests._checkpoint_files import st_parts, st_write

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)


# --------------------------------------------------------------------------
# NumPy encoders/decoders of the layouts (safetensors by hand: tests/_checkpoint_files.py).
# --------------------------------------------------------------------------


def e2m1_encode(v) -> np.ndarray:
    """Nearest E2M1 code (ties to the even code), saturating at 6, sign in bit 3."""
    v = np.asarray(v, np.float32)
    mag = np.abs(v)
    dist = np.abs(mag[..., None] - E2M1)
    best = dist.min(axis=-1, keepdims=True)
    ties = dist == best
    # of the nearest codes (one, or two at a midpoint) take the even one
    code = np.where(ties[..., ::2].any(-1), 2 * np.argmax(ties[..., ::2], -1), np.argmax(ties, -1))
    code = np.where(mag > 6, 7, code)
    return (code | (np.signbit(v) << 3)).astype(np.uint8)


def e2m1_value(codes) -> np.ndarray:
    v = E2M1[codes & 7]
    return np.where(codes & 8, -v, v).astype(np.float32)


def pack_low_first(codes) -> np.ndarray:
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def gptoss_encode(x):
    """OCP MXFP4: per 32 along the last axis, 2^(floor(log2 amax) - 2), E8M0 bias 127."""
    x = np.asarray(x, np.float32)
    blocks = x.reshape(x.shape[:-1] + (-1, 32))
    amax = np.abs(blocks).max(-1)
    exp = np.where(amax > 0, np.frexp(amax)[1] - 1, -127) - 2
    byte = np.clip(exp + 127, 0, 254).astype(np.uint8)
    codes = e2m1_encode(blocks / np.exp2(byte.astype(np.float32) - 127)[..., None])
    packed = pack_low_first(codes)  # (..., G, 16)
    return packed, byte


def gptoss_decode(blocks, scales):
    """gpt-oss's _get_mxfp4_tensor in NumPy float32: nibble table lookup, ldexp by byte - 127.

    torch.ldexp(x, e) is x * 2.0**e: 2^128 (byte 255) is inf, and 0 * inf is NaN.
    """
    out = np.empty(blocks.shape[:-1] + (32,), np.float32)
    out[..., 0::2] = e2m1_value(blocks & 0x0F)
    out[..., 1::2] = e2m1_value(blocks >> 4)
    with np.errstate(all="ignore"):
        power = np.ldexp(np.float32(1), scales.astype(np.int32) - 127)
        out = out * power[..., None]
    return out.reshape(blocks.shape[:-2] + (-1,))


def nvfp4_encode(x, tensor_decode_scale):
    """NVFP4 blocks of 16: s8 = e4m3(block_amax / 6 / d), code = e2m1(x / (s8 * d))."""
    x = np.asarray(x, np.float32)
    d = np.float32(tensor_decode_scale)
    blocks = x.reshape(x.shape[:-1] + (-1, 16))
    s8 = (np.abs(blocks).max(-1) / np.float32(6) / d).astype(E4M3)
    with np.errstate(all="ignore"):
        scaled = blocks / (s8.astype(np.float32) * d)[..., None]
    codes = e2m1_encode(np.nan_to_num(scaled)).reshape(x.shape)
    return pack_low_first(codes), s8


def unpack_low_first(packed) -> np.ndarray:
    out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 15, packed >> 4
    return out


def ct_decode(packed, s8, global_scale):
    """compressed-tensors' decompress in float32: e2m1 * (s8 / global_scale)."""
    vals = e2m1_value(unpack_low_first(packed))
    with np.errstate(all="ignore"):
        scale = s8.astype(np.float32) / np.float32(global_scale)
    return (vals.reshape(vals.shape[:-1] + (-1, 16)) * scale[..., None]).reshape(vals.shape)


def modelopt_decode(packed, s8, scale_2):
    """ModelOpt's NVFP4QTensor.dequantize in float32: e2m1 * (s8 * weight_scale_2)."""
    vals = e2m1_value(unpack_low_first(packed))
    scale = s8.astype(np.float32) * np.float32(scale_2)
    return (vals.reshape(vals.shape[:-1] + (-1, 16)) * scale[..., None]).reshape(vals.shape)


def bits(a) -> np.ndarray:
    a = np.asarray(a, np.float32)
    return np.where(np.isnan(a), np.uint32(0x7FC00000), a.view(np.uint32))


def codes_of(t: jaxmx.MXTensor) -> np.ndarray:
    return np.asarray(jaxmx.unpack(t).data).astype(np.uint8)


def assert_same_tree(a, b):
    is_mx = lambda x: isinstance(x, jaxmx.MXTensor)  # noqa: E731
    la, ta = jax.tree.flatten(a, is_leaf=is_mx)
    lb, tb = jax.tree.flatten(b, is_leaf=is_mx)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        if is_mx(x):
            assert is_mx(y)
            static = [f.name for f in dataclasses.fields(x) if f.metadata.get("static")]
            assert {k: getattr(x, k) for k in static} == {k: getattr(y, k) for k in static}
            for leaf in ("data", "scale", "tensor_scale", "micro"):
                u, v = getattr(x, leaf), getattr(y, leaf)
                assert (u is None) == (v is None), leaf
                if u is not None:
                    assert np.dtype(u.dtype) == np.dtype(v.dtype), leaf
                    assert np.asarray(u).tobytes() == np.asarray(v).tobytes(), leaf
            assert np.array_equal(bits(x.dequantize(jnp.float32)), bits(y.dequantize(jnp.float32)))
        else:
            assert np.dtype(x.dtype) == np.dtype(y.dtype)
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def weights(shape, seed, amax=None):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * np.exp2(rng.integers(-4, 4, shape))).astype(np.float32)
    if amax is not None:
        x *= np.float32(amax) / np.abs(x).max()
        x.reshape(-1)[0] = amax  # exactly amax, whatever the rounding of the product
    return x


# --------------------------------------------------------------------------
# gpt-oss.
# --------------------------------------------------------------------------


def test_gpt_oss_file_loads_bit_exactly(tmp_path):
    x = weights((2, 3, 96), seed=1)
    blocks, scales = gptoss_encode(x)
    rng = np.random.default_rng(2)
    # every code and the whole scale range, subnormal results (bytes < 103) included
    rblocks = rng.integers(0, 256, (4, 3, 16), dtype=np.uint8)
    rscales = np.array([[0, 1, 100], [126, 127, 128], [200, 253, 254], [5, 50, 150]], np.uint8)
    bias = rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16)
    st_write(
        tmp_path / "experts.safetensors",
        None,
        {
            "model.layers.0.mlp.experts.gate_up_proj_blocks": blocks,
            "model.layers.0.mlp.experts.gate_up_proj_scales": scales,
            "model.layers.0.mlp.experts.gate_up_proj_bias": bias,
            "block.1.mlp.mlp1_weight.blocks": rblocks,  # OpenAI's original names
            "block.1.mlp.mlp1_weight.scales": rscales,
        },
        metadata={"format": "pt"},
    )
    tree = jaxmx.load(tmp_path / "experts.safetensors")  # detected by its tensor names
    for t, b, s in (
        (tree["model"]["layers"]["0"]["mlp"]["experts"]["gate_up_proj"], blocks, scales),
        (tree["block"]["1"]["mlp"]["mlp1_weight"], rblocks, rscales),
    ):
        assert t.format == jaxmx.get_format("mxfp4") and t.block_size == 32 and t.packed
        assert t.shape == b.shape[:-2] + (b.shape[-2] * 32,) and t.block_axis() == -1
        assert np.array_equal(codes_of(t), unpack_low_first(b).reshape(t.shape))
        assert np.array_equal(np.asarray(t.scale).view(np.uint8), s)
        assert np.array_equal(bits(t.dequantize()), bits(gptoss_decode(b, s)))
    got_bias = tree["model"]["layers"]["0"]["mlp"]["experts"]["gate_up_proj_bias"]
    assert got_bias.dtype == jnp.bfloat16 and np.asarray(got_bias).tobytes() == bias.tobytes()


def test_gpt_oss_encoder_matches_jaxmx_quantize(tmp_path):
    # The same OCP rule on both sides: the files jaxmx writes hold the NumPy encoder's bytes.
    x = weights((4, 64), seed=3)
    jaxmx.save(tmp_path / "g", {"w": jaxmx.quantize(x, "mxfp4")}, layout="gpt-oss")
    tensors, meta, _ = st_parts(tmp_path / "g" / "model.safetensors")
    blocks, scales = gptoss_encode(x)
    assert np.array_equal(tensors["w_blocks"], blocks) and np.array_equal(
        tensors["w_scales"], scales
    )
    assert meta["format"] == "pt"
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    assert config == {"quantization_config": {"quant_method": "mxfp4"}}


def test_gpt_oss_nan_scale(tmp_path):
    blocks = np.zeros((2, 1, 16), np.uint8)
    blocks[1, 0, 3] = 0x80  # codes 0 and 8: +0 and -0
    scales = np.array([[255], [255]], np.uint8)
    st_write(tmp_path / "ok.safetensors", None, {"w_blocks": blocks, "w_scales": scales})
    t = jaxmx.load(tmp_path / "ok.safetensors", layout="gpt-oss")["w"]
    assert np.isnan(np.asarray(t.dequantize())).all()
    assert np.isnan(gptoss_decode(blocks, scales)).all()  # 0 * 2^128 = 0 * inf
    blocks[1, 0, 5] = 0x02  # a 1.0 under 2^128: +inf for gpt-oss, NaN for OCP MX
    st_write(tmp_path / "bad.safetensors", None, {"w_blocks": blocks, "w_scales": scales})
    with pytest.raises(ValueError, match=r"block at \(1, 0\) has the scale byte 255 and nonzero"):
        jaxmx.load(tmp_path / "bad.safetensors", layout="gpt-oss")
    # The same block is refused on save.
    t = jaxmx.quantize(jnp.ones((1, 32)), "mxfp4")
    t = dataclasses.replace(t, scale=jnp.full((1, 1), jnp.nan, jnp.float8_e8m0fnu))
    with pytest.raises(ValueError, match=r"tree\['w'\]: the block at \(0, 0\) has the scale byte"):
        jaxmx.save(tmp_path / "n.safetensors", {"w": t}, layout="gpt-oss")


@pytest.mark.parametrize(
    "tensors,match",
    [
        ({"w_blocks": np.zeros((2, 16), np.uint8)}, r"'w_blocks'.* has no tensor 'w_scales'"),
        ({"w.scales": np.zeros((2,), np.uint8)}, r"'w.scales'.* has no tensor 'w.blocks'"),
        (
            {"w_blocks": np.zeros((2, 8), np.uint8), "w_scales": np.zeros((2,), np.uint8)},
            r"is U8\[2, 8\]; gpt-oss blocks are U8 of shape \(\.\.\., blocks, 16\)",
        ),
        (
            {"w_blocks": np.zeros((2, 16), np.uint8), "w_scales": np.zeros((3,), np.uint8)},
            r"'w_scales' is U8\[3\]; the scales of blocks of shape \[2, 16\] are U8 .* \[2\]",
        ),
    ],
)
def test_gpt_oss_load_errors(tmp_path, tensors, match):
    st_write(tmp_path / "w.safetensors", None, tensors)
    with pytest.raises(ValueError, match=match):
        jaxmx.load(tmp_path / "w.safetensors", layout="gpt-oss")


# --------------------------------------------------------------------------
# compressed-tensors.
# --------------------------------------------------------------------------


def ct_file(path, x, global_scale, extra=None):
    packed, s8 = nvfp4_encode(x, np.float32(1) / np.float32(global_scale))
    tensors = {
        "model.q_proj.weight_packed": packed,
        "model.q_proj.weight_scale": s8,
        "model.q_proj.weight_global_scale": np.array([global_scale], np.float32),
        "model.q_proj.input_global_scale": np.array([3.5], np.float32),
        **(extra or {}),
    }
    st_write(path, None, tensors, metadata={"format": "pt"})
    return packed, s8


def test_compressed_tensors_file_loads_bit_exactly(tmp_path):
    x = weights((4, 64), seed=4, amax=10.5)
    gs = np.float32(2688) / np.float32(10.5)  # 256: a power of two
    packed, s8 = ct_file(tmp_path / "ct.safetensors", x, gs)
    tree = jaxmx.load(tmp_path / "ct.safetensors")
    t = tree["model"]["q_proj"]["weight"]
    assert t.format == jaxmx.get_format("nvfp4") and t.block_size == 16 and t.shape == (4, 64)
    assert np.array_equal(codes_of(t), unpack_low_first(packed))
    assert np.asarray(t.scale).tobytes() == s8.tobytes()
    assert float(t.tensor_scale) == 1 / 256
    assert np.array_equal(bits(t.dequantize()), bits(ct_decode(packed, s8, gs)))
    assert np.asarray(tree["model"]["q_proj"]["input_global_scale"]).tolist() == [3.5]


def test_compressed_tensors_reciprocal_rule_and_warning(tmp_path):
    x = weights((16, 64), seed=5, amax=3.3)
    gs = np.float32(2688) / np.float32(3.3)
    packed, s8 = ct_file(tmp_path / "ct.safetensors", x, gs)
    ts = np.float32(1) / gs
    division = ct_decode(packed, s8, gs)
    rule = modelopt_decode(packed, s8, ts)  # e2m1 * (s8 * f32(1 / gs))
    differ = int((bits(s8.astype(np.float32) / gs) != bits(s8.astype(np.float32) * ts)).sum())
    assert differ > 0  # this global scale is one where the two disagree somewhere
    with pytest.warns(UserWarning, match=rf"model.q_proj.weight \({differ} of 64 blocks\)"):
        t = jaxmx.load(tmp_path / "ct.safetensors")["model"]["q_proj"]["weight"]
    assert np.asarray(t.tensor_scale).tobytes() == ts.tobytes()
    assert np.array_equal(bits(t.dequantize()), bits(rule))
    # the scale products differ by one ulp; the products with E2M1 values by at most two
    assert not np.array_equal(bits(division), bits(rule))
    assert (np.abs(division - rule) <= 2 * np.spacing(np.abs(division))).all()


def test_compressed_tensors_inexact_reciprocal_but_exact_blocks_loads_silently(tmp_path):
    gs = np.float32(2688) / np.float32(3.3)
    ts = np.float32(1) / gs
    e4 = np.arange(1, 127, dtype=np.uint8).view(E4M3).astype(np.float32)
    good = np.arange(1, 127, dtype=np.uint8)[bits(e4 / gs) == bits(e4 * ts)]
    packed = np.random.default_rng(6).integers(0, 256, (4, 32), dtype=np.uint8)
    s8 = good[:16].reshape(4, 4).view(E4M3)
    st_write(
        tmp_path / "ct.safetensors",
        None,
        {"l.weight_packed": packed, "l.weight_scale": s8, "l.weight_global_scale": gs.reshape(1)},
    )
    t = jaxmx.load(tmp_path / "ct.safetensors")["l"]["weight"]  # no warning (warnings are errors)
    assert np.array_equal(bits(t.dequantize()), bits(ct_decode(packed, s8, gs)))


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d.pop("l.weight_global_scale"), r"lacks \['l.weight_global_scale'\] beside"),
        (
            lambda d: d.update({"l.weight_scale": d["l.weight_scale"].astype(np.float32)}),
            r"'l.weight_scale' is F32\[4, 4\]; the block scales .* are F8_E4M3 of shape \[4, 4\]",
        ),
        (
            lambda d: d.update({"l.weight_global_scale": np.ones(2, np.float32)}),
            r"is F32\[2\]; the weight's global scale is one float32",
        ),
        (
            lambda d: d.update({"l.weight_zero_point": np.ones((4, 4), np.float32)}),
            r"'l.weight_zero_point' is not all zeros; NVFP4 is symmetric",
        ),
        (
            lambda d: d.update({"l.weight_packed": d["l.weight_packed"].reshape(2, 2, 32)}),
            r"is U8\[2, 2, 32\]; compressed-tensors NVFP4 codes are U8 of shape \(out_features",
        ),
    ],
)
def test_compressed_tensors_load_errors(tmp_path, edit, match):
    packed, s8 = nvfp4_encode(weights((4, 64), seed=7), np.float32(1) / 256)
    d = {
        "l.weight_packed": packed,
        "l.weight_scale": s8,
        "l.weight_global_scale": np.ones(1, np.float32),
    }
    edit(d)
    st_write(tmp_path / "ct.safetensors", None, d)
    with pytest.raises(ValueError, match=match):
        jaxmx.load(tmp_path / "ct.safetensors", layout="compressed-tensors")


def test_compressed_tensors_zero_point_of_zeros_and_int64_tensors(tmp_path):
    x = weights((4, 64), seed=8, amax=10.5)
    extra = {
        "model.q_proj.weight_zero_point": np.zeros((4, 4), E4M3),
        "model.q_proj.weight_shape": np.array([4, 64], np.int64),
    }
    packed, s8 = ct_file(tmp_path / "ct.safetensors", x, 256.0, extra)
    tree = jaxmx.load(tmp_path / "ct.safetensors")["model"]["q_proj"]
    assert np.array_equal(bits(tree["weight"].dequantize()), bits(ct_decode(packed, s8, 256.0)))
    assert "weight_zero_point" not in tree  # checked to be zeros, and dropped
    # int64 stays NumPy while jax_enable_x64 is off, rather than narrowed by JAX
    shape = tree["weight_shape"]
    assert isinstance(shape, np.ndarray) and shape.dtype == np.int64 and shape.tolist() == [4, 64]


# --------------------------------------------------------------------------
# ModelOpt.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (1,)])
def test_modelopt_file_loads_bit_exactly(tmp_path, shape):
    x = weights((4, 64), seed=9)
    scale_2 = np.float32(np.abs(x).max()) / np.float32(2688)  # amax / (6 * 448), not a power of 2
    packed, s8 = nvfp4_encode(x, scale_2)
    st_write(
        tmp_path / "mo.safetensors",
        None,
        {
            "model.o_proj.weight": packed,
            "model.o_proj.weight_scale": s8,
            "model.o_proj.weight_scale_2": scale_2.reshape(shape),
            "model.o_proj.input_scale": np.float32(0.25).reshape(shape),
        },
    )
    tree = jaxmx.load(tmp_path / "mo.safetensors")
    t = tree["model"]["o_proj"]["weight"]
    assert t.format == jaxmx.get_format("nvfp4") and t.shape == (4, 64)
    assert np.array_equal(codes_of(t), unpack_low_first(packed))
    assert np.asarray(t.scale).tobytes() == s8.tobytes()
    assert np.asarray(t.tensor_scale).tobytes() == scale_2.tobytes()
    assert np.array_equal(bits(t.dequantize()), bits(modelopt_decode(packed, s8, scale_2)))
    assert np.asarray(tree["model"]["o_proj"]["input_scale"]).reshape(-1).tolist() == [0.25]


def test_modelopt_load_errors(tmp_path):
    packed, s8 = nvfp4_encode(weights((4, 64), seed=10), np.float32(0.01))
    st_write(
        tmp_path / "mo.safetensors",
        None,
        {"w": packed, "w_scale": s8, "w_scale_2": np.ones(2, np.float32)},
    )
    with pytest.raises(ValueError, match=r"'w_scale_2' is F32\[2\]; the weight's second-level"):
        jaxmx.load(tmp_path / "mo.safetensors")
    st_write(
        tmp_path / "mo2.safetensors", None, {"w_scale": s8, "w_scale_2": np.ones(1, np.float32)}
    )
    with pytest.raises(ValueError, match=r"lacks \['w'\] beside it; ModelOpt stores an NVFP4"):
        jaxmx.load(tmp_path / "mo2.safetensors", layout="modelopt")


# --------------------------------------------------------------------------
# Save, then load: the same tree.
# --------------------------------------------------------------------------


def _nvfp4(shape, seed=15, **kw):
    # tensor_amax 10.5 gives the tensor scale 2^-8: compressed-tensors' division is exact
    return jaxmx.quantize(weights(shape, seed, amax=10.5), "nvfp4", tensor_amax=10.5, **kw)


@pytest.mark.parametrize("directory", [False, True])
@pytest.mark.parametrize(
    "layout,make",
    [
        ("gpt-oss", lambda s, **kw: jaxmx.quantize(weights(s, 11), "mxfp4", **kw)),
        ("compressed-tensors", _nvfp4),
        ("modelopt", _nvfp4),
    ],
)
def test_save_then_load_is_the_same_tree(tmp_path, layout, make, directory):
    shape = (4, 64)
    tree = {
        "model": {
            "layers": [
                {
                    "mlp": {"weight": make(shape, packed=True), "bias": jnp.arange(4.0)},
                    "attn": {"weight": make(shape, packed=False).astype(jnp.bfloat16)},
                }
            ],
            "norm": {"weight": jnp.ones(8, jnp.bfloat16)},
        }
    }
    path = tmp_path / ("ckpt" if directory else "ckpt.safetensors")
    info = jaxmx.save(path, tree, layout=layout)
    assert info.num_mx_tensors == 2 and info.num_arrays == 2 and info.backend == "safetensors"
    assert (path / "config.json").is_file() == directory
    loaded = jaxmx.load(path)
    # lists come back as dicts keyed "0", "1", ...: a layout file has names, not containers
    want = {"model": {"layers": {"0": tree["model"]["layers"][0]}, "norm": tree["model"]["norm"]}}
    assert_same_tree(want, loaded)
    assert_same_tree(want, jaxmx.load(path, layout=layout))


def test_saved_files_follow_the_layouts(tmp_path):
    t = _nvfp4((4, 64), seed=12)
    packed = pack_low_first(codes_of(t))
    jaxmx.save(tmp_path / "ct", {"l": {"weight": t}}, layout="compressed-tensors")
    got, _, _ = st_parts(tmp_path / "ct" / "model.safetensors")
    assert np.array_equal(got["l.weight_packed"], packed)
    assert got["l.weight_scale"].tobytes() == np.asarray(t.scale).tobytes()
    assert got["l.weight_global_scale"].tolist() == [256.0]
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "nvfp4-pack-quantized"
    assert qc["config_groups"]["group_0"]["targets"] == ["l"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 16
    mo = {"l": {"weight": t}, "lm_head": {"weight": jnp.ones((2, 2))}}
    jaxmx.save(tmp_path / "mo", mo, layout="modelopt")
    got, _, _ = st_parts(tmp_path / "mo" / "model.safetensors")
    assert np.array_equal(got["l.weight"], packed) and got["l.weight_scale_2"].shape == ()
    assert got["l.weight_scale_2"].tobytes() == np.asarray(t.tensor_scale).tobytes()
    hf = json.loads((tmp_path / "mo" / "hf_quant_config.json").read_text())["quantization"]
    assert hf["quant_algo"] == "NVFP4" and hf["exclude_modules"] == ["lm_head"]
    qc = json.loads((tmp_path / "mo" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["ignore"] == ["lm_head"]


def test_compressed_tensors_round_trip_with_a_generic_tensor_scale(tmp_path):
    t = jaxmx.quantize(weights((4, 64), seed=13), "nvfp4", packed=True)
    ts = np.asarray(t.tensor_scale)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jaxmx.save(tmp_path / "ct.safetensors", {"w": t}, layout="compressed-tensors")
        back = jaxmx.load(tmp_path / "ct.safetensors")["w"]
    caught = [w for w in caught if issubclass(w.category, UserWarning)]
    got, _, _ = st_parts(tmp_path / "ct.safetensors")
    g = got["w_global_scale"][0]
    assert (np.float32(1) / g).tobytes() == ts.tobytes()  # loads back to the same tensor scale
    assert_same_tree({"w": t}, {"w": back})
    # warned, on both save and load, when the file's division differs somewhere
    s8 = np.asarray(t.scale).astype(np.float32)
    differ = int((bits(s8 / g) != bits(s8 * ts)).sum())
    assert differ > 0  # this seed's tensor scale is one where the two disagree somewhere
    assert len(caught) == 2
    assert all(f"w ({differ} of 16 blocks)" in str(w.message) for w in caught)


def test_compressed_tensors_save_picks_the_global_scale_whose_division_differs_least(tmp_path):
    # Every positive finite E4M3 block scale once, and the first NVFP4 tensor scale
    # amax / 2688 (amax from 1 in steps of 2^-10) for which a float32 one ulp from
    # f32(1 / tensor_scale) also has f32(1 / g) == tensor_scale and its division
    # differs from jaxmx's product for fewer of these block scales.
    s8 = np.arange(1, 127, dtype=np.uint8).view(E4M3).reshape(9, 14)
    f = s8.astype(np.float32)

    def differ(g, ts):
        return int((bits(f / g) != bits(f * ts)).sum())

    for k in range(1024):
        ts = (np.float32(1) + np.float32(k) / np.float32(1024)) / np.float32(2688)
        first = np.float32(1) / ts
        near = (np.nextafter(first, np.float32(0)), np.nextafter(first, np.float32(np.inf)))
        better = [g for g in near if np.float32(1) / g == ts and differ(g, ts) < differ(first, ts)]
        if better:
            break
    assert better, "no tensor scale amax / 2688 with 1 <= amax < 2 has such a global scale"
    t = jaxmx.quantize(jnp.ones((9, 224)), "nvfp4", packed=True)
    t = dataclasses.replace(t, scale=jnp.asarray(s8), tensor_scale=jnp.asarray(ts))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jaxmx.save(tmp_path / "ct.safetensors", {"w": t}, layout="compressed-tensors")
        back = jaxmx.load(tmp_path / "ct.safetensors")["w"]
    caught = [w for w in caught if issubclass(w.category, UserWarning)]
    got, _, _ = st_parts(tmp_path / "ct.safetensors")
    g = got["w_global_scale"][0]
    assert g != first  # not f32(1 / tensor_scale), whose division differs for more blocks
    assert (np.float32(1) / g).tobytes() == ts.tobytes()  # loads back to the same tensor scale
    assert differ(g, ts) <= min(differ(b, ts) for b in better) < differ(first, ts)
    assert_same_tree({"w": t}, {"w": back})
    assert len(caught) == (2 if differ(g, ts) else 0)
    assert all(f"w ({differ(g, ts)} of 126 blocks)" in str(w.message) for w in caught)


# --------------------------------------------------------------------------
# Save errors: what a layout cannot hold.
# --------------------------------------------------------------------------


def _save_error(tmp_path, tree, layout, match, error=ValueError):
    with pytest.raises(error, match=match):
        jaxmx.save(tmp_path / "x.safetensors", tree, layout=layout)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    "fmt,layout,takes",
    [
        ("mxfp8", "gpt-oss", "gpt-oss layout holds mxfp4_e2m1 tensors with blocks of 32"),
        ("nvfp4", "gpt-oss", "gpt-oss layout holds mxfp4_e2m1 tensors"),
        (
            "mxfp4",
            "modelopt",
            "modelopt layout holds nvfp4 tensors with blocks of 16 along the last axis of a 2-D",
        ),
        ("mxfp4", "compressed-tensors", "compressed-tensors layout holds nvfp4 tensors"),
    ],
)
def test_save_refuses_other_formats(tmp_path, fmt, layout, takes):
    t = jaxmx.quantize(jnp.ones((2, 64)), fmt)
    name = t.format.name
    _save_error(
        tmp_path, {"a": {"w": t}}, layout, rf"tree\['a'\]\['w'\] is a {name} MXTensor; the {takes}"
    )


@pytest.mark.parametrize(
    "tree,layout,match",
    [
        (
            {"w": jaxmx.quantize(jnp.ones((64, 2)), "mxfp4", axis=0)},
            "gpt-oss",
            r"tree\['w'\] has its blocks along axis -2 of shape \(64, 2\); .*t.T",
        ),
        (
            {"w": jaxmx.quantize(jnp.ones((2, 48)), "mxfp4")},
            "gpt-oss",
            r"has 48 elements along its block axis, a partial last block",
        ),
        (
            {"w": jaxmx.quantize(jnp.ones((2, 64)), "mxfp4", block_size=16)},
            "gpt-oss",
            r"tree\['w'\] has block_size 16; the gpt-oss layout holds mxfp4_e2m1 tensors "
            r"with blocks of 32",
        ),
        (
            {"w": jaxmx.quantize(jnp.ones((2, 2, 32)), "nvfp4")},
            "modelopt",
            r"tree\['w'\] has shape \(2, 2, 32\); the modelopt layout holds .* 2-D",
        ),
        (
            {"w": jaxmx.quantize(jnp.ones((32, 32)), "nvfp4", block_size=(16, 16))},
            "compressed-tensors",
            r"tree\['w'\] has block_size \(16, 16\)",
        ),
        ({"a.b": jnp.ones(2)}, "modelopt", r"tree has the key 'a.b'; tensor names .* without '.'"),
        (
            {"w": jaxmx.quantize(jnp.ones((2, 64)), "mxfp4"), "w_blocks": jnp.ones(2)},
            "gpt-oss",
            r"tree\['w_blocks'\] is written as the tensor 'w_blocks', which tree\['w'\] is",
        ),
        (
            {"s": jnp.ones(2, jnp.float8_e8m0fnu)},
            "gpt-oss",
            r"tree\['s'\] is a float8_e8m0fnu array; a gpt-oss file holds plain arrays of",
        ),
        ({}, "gpt-oss", "the tree holds no arrays or MXTensors"),
    ],
)
def test_save_refuses_what_the_layout_cannot_hold(tmp_path, tree, layout, match):
    _save_error(tmp_path, tree, layout, match)


def test_save_refuses_other_leaves_and_options(tmp_path):
    _save_error(
        tmp_path, {"w": None}, "gpt-oss", r"tree\['w'\] is a NoneType; a layout file", TypeError
    )
    _save_error(
        tmp_path, {"w": jnp.ones(2)}, "gguf", r"unknown layout 'gguf'; allowed: 'jaxmx', 'gpt-oss'"
    )
    with pytest.raises(ValueError, match=r"backend='orbax' is for layout='jaxmx'"):
        jaxmx.save(tmp_path / "x", {"w": jnp.ones(2)}, layout="modelopt", backend="orbax")
    t = jaxmx.quantize(jnp.ones((2, 64)), "nvfp4")
    vmapped = dataclasses.replace(t, tensor_scale=jnp.ones((2,), jnp.float32))
    with pytest.raises(ValueError, match=r"one tensor scale per item"):
        jaxmx.save(tmp_path / "v.safetensors", {"w": vmapped}, layout="modelopt")
    # A tensor scale that is no float32's reciprocal cannot be a global scale.
    odd = dataclasses.replace(
        t, tensor_scale=jnp.asarray(np.nextafter(np.float32(1), np.float32(0)))
    )
    with pytest.raises(ValueError, match=r"tensor scale 0.99999994.*not the float32 reciprocal"):
        jaxmx.save(tmp_path / "o.safetensors", {"w": odd}, layout="compressed-tensors")
    jaxmx.save(tmp_path / "o.safetensors", {"w": odd}, layout="modelopt")  # ModelOpt holds it


def test_overwrite(tmp_path):
    tree = {"w": jaxmx.quantize(jnp.ones((2, 64)), "mxfp4")}
    jaxmx.save(tmp_path / "g", tree, layout="gpt-oss")
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        jaxmx.save(tmp_path / "g", tree, layout="gpt-oss")
    jaxmx.save(tmp_path / "g", tree, layout="gpt-oss", overwrite=True)
    (tmp_path / "g" / "tokenizer.json").write_text("{}")
    with pytest.raises(FileExistsError, match="is not a layout checkpoint jaxmx.save wrote"):
        jaxmx.save(tmp_path / "g", tree, layout="gpt-oss", overwrite=True)
    st_write(tmp_path / "theirs.safetensors", None, {"w_blocks": np.zeros((1, 16), np.uint8)})
    with pytest.raises(FileExistsError, match="is not a layout checkpoint jaxmx.save wrote"):
        jaxmx.save(tmp_path / "theirs.safetensors", tree, layout="gpt-oss", overwrite=True)


# --------------------------------------------------------------------------
# Detection, and load errors common to the layouts.
# --------------------------------------------------------------------------


def test_directories_are_detected_by_their_config(tmp_path):
    packed, s8 = nvfp4_encode(weights((4, 64), seed=14), np.float32(1) / 256)
    # Names alone would not tell (a weight and its scales): config.json does.
    tensors = {
        "l.weight": packed,
        "l.weight_scale": s8,
        "l.weight_scale_2": np.ones((), np.float32),
    }
    (tmp_path / "mo").mkdir()
    st_write(tmp_path / "mo" / "model-00001-of-00002.safetensors", None, {"l.weight": packed})
    st_write(
        tmp_path / "mo" / "model-00002-of-00002.safetensors",
        None,
        {k: v for k, v in tensors.items() if k != "l.weight"},
    )
    (tmp_path / "mo" / "hf_quant_config.json").write_text(
        json.dumps({"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4"}})
    )
    assert isinstance(jaxmx.load(tmp_path / "mo")["l"]["weight"], jaxmx.MXTensor)
    (tmp_path / "odd").mkdir()
    st_write(tmp_path / "odd" / "model.safetensors", None, {"x": np.ones(2, np.float32)})
    (tmp_path / "odd" / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "gptq"}})
    )
    with pytest.raises(ValueError, match=r"quant_method 'gptq', not a layout jaxmx reads"):
        jaxmx.load(tmp_path / "odd")
    # read as plain arrays when asked
    assert np.asarray(jaxmx.load(tmp_path / "odd", layout="modelopt")["x"]).tolist() == [1.0, 1.0]
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"architectures": ["X"]}))
    with pytest.raises(ValueError, match=r"neither a jaxmx checkpoint .* nor a model directory"):
        jaxmx.load(tmp_path / "odd")


def test_jaxmx_checkpoints_are_still_jaxmx(tmp_path):
    tree = {"w": jaxmx.quantize(jnp.ones((2, 64)), "mxfp4")}
    jaxmx.save(tmp_path / "j.safetensors", tree)
    assert_same_tree(tree, jaxmx.load(tmp_path / "j.safetensors"))
    assert_same_tree(tree, jaxmx.load(tmp_path / "j.safetensors", layout="jaxmx"))
    st_write(
        tmp_path / "plain.safetensors",
        None,
        {"x": np.ones(2, np.float32)},
        metadata={"format": "pt"},
    )
    with pytest.raises(ValueError, match=r"no __metadata__\['jaxmx'\]"):
        jaxmx.load(tmp_path / "plain.safetensors")


def test_load_errors(tmp_path):
    z = np.zeros((1, 16), np.uint8)
    st_write(
        tmp_path / "both.safetensors",
        None,
        {"a_blocks": z, "a_scales": z[:, 0], "b_scale_2": np.ones(1, np.float32)},
    )
    with pytest.raises(
        ValueError, match=r"named as several layouts name theirs \(\['gpt-oss', 'modelopt'\]\)"
    ):
        jaxmx.load(tmp_path / "both.safetensors")
    st_write(
        tmp_path / "nest.safetensors",
        None,
        {"a": np.ones(1, np.float32), "a.b": np.ones(1, np.float32)},
    )
    with pytest.raises(
        ValueError, match=r"the tensor 'a' is also a prefix of 'a.b'; the names cannot"
    ):
        jaxmx.load(tmp_path / "nest.safetensors", layout="gpt-oss")
    with pytest.raises(
        ValueError, match=r"unknown layout 'mxfp4'; allowed: .*\(or None: detect it\)"
    ):
        jaxmx.load(tmp_path / "nest.safetensors", layout="mxfp4")
    with pytest.raises(ValueError, match=r"target= is for layout='jaxmx'"):
        jaxmx.load(tmp_path / "nest.safetensors", layout="gpt-oss", target={})
    st_write(
        tmp_path / "hint.safetensors",
        None,
        {"a": np.ones(1, np.float32)},
        metadata={"jaxmx.layout": "{}"},
    )
    with pytest.raises(ValueError, match=r"__metadata__\['jaxmx.layout'\] is wrong"):
        jaxmx.load(tmp_path / "hint.safetensors", layout="modelopt")
    (tmp_path / "shards").mkdir()
    for i in range(2):
        st_write(tmp_path / "shards" / f"m{i}.safetensors", None, {"a": np.ones(1, np.float32)})
    with pytest.raises(ValueError, match=r"the tensor 'a' is in both .*m0.safetensors and .*m1"):
        jaxmx.load(tmp_path / "shards", layout="gpt-oss")
