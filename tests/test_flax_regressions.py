"""Regression tests for bugs found in jaxmx.flax and the training loop, one per bug.

Every test that involves quantization also checks that the MX result differs
from the high-precision one, so it would fail if substitution did nothing.
"""

import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmx
import jaxmx.flax as jf
from examples import training
from jaxmx.flax import linen as mxnn
from jaxmx.flax import nnx as mxnnx

X = jax.random.normal(jax.random.key(1), (4, 64))


def _differs(a, b) -> bool:
    return not np.array_equal(np.asarray(a), np.asarray(b))


def _same(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class MLP(nn.Module):
    """Two Dense layers; one named like MXLinen's field, which must not clash."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        h = nn.relu(nn.Dense(64, name="model")(x))
        return nn.Dense(8, name="head")(h)


class EncoderDecoder(nn.Module):
    """setup-style model with a second public method."""

    def setup(self):
        self.enc = nn.Dense(64)
        self.dec = nn.Dense(8)

    def __call__(self, x):
        return self.dec(nn.relu(self.encode(x)))

    def encode(self, x):
        return self.enc(x)


# ----------------------------------------------------------------------- bug 1


def test_nnx_record_says_what_runs_after_a_none_rule_on_an_mx_model():
    """A None rule undoes jaxmx's earlier config; the record is read off the modules."""
    model = nnx.Sequential(
        nnx.Linear(64, 64, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(64, 8, rngs=nnx.Rngs(1))
    )
    y_hp = model(X)
    jf.quantize_model(model, "mxfp8")
    y_mx = model(X)
    assert _differs(y_mx, y_hp)

    jf.quantize_model(model, [(".*", None)])
    _same(model(X), y_hp)  # high precision again ...
    assert model.layers[0].dot_general is jax.lax.dot_general
    sub = jf.substitution_of(model)  # ... and the record says so
    assert sub.substituted == []
    assert [(p, r) for p, _, r in sub.kept] == [
        ("layers/0", "rule '.*' keeps it"),
        ("layers/2", "rule '.*' keeps it"),
    ]
    assert sub.summary().splitlines()[0] == "0 matmul modules in MX, 2 kept in high precision"

    # Modules no rule matches keep what they hold, and the record says so.
    jf.quantize_model(model, "mxfp8")
    jf.quantize_model(model, [("layers/0", None)])
    sub = jf.substitution_of(model)
    assert [p for p, *_ in sub.substituted] == ["layers/2"]
    assert [p for p, *_ in sub.kept] == ["layers/0"]
    assert _differs(model(X), y_hp)

    # An mx= layer is jaxmx-configured too: a None rule turns it off.
    layer = mxnnx.Linear(64, 8, mx="mxfp8", rngs=nnx.Rngs(0))
    y_layer = layer(X)
    jf.quantize_model(layer, [("^$", None)])
    assert jf.substitution_of(layer).kept == [("", "Linear", "rule '^$' keeps it")]
    assert _differs(layer(X), y_layer)
    _same(layer(X), nnx.Linear(64, 8, rngs=nnx.Rngs(0))(X))

    # linen: re-substituting an MXLinen tries the new rules first.
    params = MLP().init(jax.random.key(0), X)
    mx = jf.quantize_model(MLP(), "mxfp8")
    assert _differs(mx.apply(params, X), MLP().apply(params, X))
    off = jf.quantize_model(mx, [(".*", None)])
    _same(off.apply(params, X), MLP().apply(params, X))
    assert jf.substitution_of(off).substituted == []


# ----------------------------------------------------------------------- bug 2


@pytest.mark.parametrize("falsy", [0, "", False, 0.0])
def test_falsy_rule_configs_are_errors_not_high_precision(falsy):
    error = ValueError if isinstance(falsy, str) else TypeError
    match = "unknown config ''" if isinstance(falsy, str) else "must be a DotConfig"
    with pytest.raises(error, match=match) as info:
        jf.quantize_model(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), [("hidden", falsy)])
    assert "rule 'hidden'" in str(info.value)
    if not isinstance(falsy, str):
        assert repr(falsy) in str(info.value)  # names what was given
    with pytest.raises(error, match=match):
        jf.quantize_model(MLP(), [(".*", falsy)])
    with pytest.raises(error, match=match):
        jf.Rule(".*", falsy)
    with pytest.raises(error, match=match):
        mxnn.Dense(4, mx=falsy)
    with pytest.raises(error, match=match):
        mxnn.Einsum((64, 4), "bk,kn->bn", mx=falsy)
    with pytest.raises(error, match=match):
        mxnnx.Linear(4, 4, mx=falsy, rngs=nnx.Rngs(0))
    if not isinstance(falsy, str):
        with pytest.raises(TypeError, match="rules must be a list"):
            jf.quantize_model(MLP(), falsy)
    # None is the one way to say high precision.
    assert jf.Rule("hidden", None).config is None


# ----------------------------------------------------------------------- bug 3


@pytest.mark.parametrize("style", ["attribute", "positional", "keyword"])
def test_substituted_linen_einsum_runs_in_every_call_style(style):
    eq = "bk,kn->bn"
    layer = nn.Einsum((64, 8), eq if style == "attribute" else None)
    args = {
        "attribute": ((X,), {}),
        "positional": ((X, eq), {}),
        "keyword": ((X,), {"einsum_str": eq}),
    }
    a, kw = args[style]
    params = layer.init(jax.random.key(0), *a, **kw)
    cfg = jaxmx.preset("mxfp8")
    y = jf.quantize_model(layer, cfg).apply(params, *a, **kw)
    p = params["params"]
    want = jaxmx.einsum(eq, X, p["kernel"], config=cfg) + p["bias"]
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
    assert _differs(y, layer.apply(params, *a, **kw))


# ----------------------------------------------------------------------- bug 4


def test_layers_without_injection_point_are_listed_as_kept():
    class Decoder(nn.Module):
        @nn.compact
        def __call__(self, ids):
            embed = nn.Embed(16, 32, name="embed")
            h = nn.ConvTranspose(32, (3,), name="up")(embed(ids))
            h = nn.Dense(32, name="proj")(h)
            return embed.attend(h)

    ids = jnp.arange(12).reshape(2, 6) % 16
    params = Decoder().init(jax.random.key(0), ids)
    mx = jf.quantize_model(Decoder(), "mxfp8")
    y = mx.apply(params, ids)
    assert _differs(y, Decoder().apply(params, ids))  # proj runs in MX
    sub = jf.substitution_of(mx)
    assert [p for p, *_ in sub.substituted] == ["proj"]
    kept = {p: (k, r) for p, k, r in sub.kept}
    assert kept == {
        "up": (
            "ConvTranspose",
            "Flax's ConvTranspose calls lax.conv_transpose directly (no injection point)",
        ),
        "embed": (
            "Embed.attend",
            "Flax's Embed.attend calls jnp.dot directly (no injection point)",
        ),
    }
    assert "high  up" in sub.summary() and "high  embed" in sub.summary()

    model = nnx.Sequential(
        nnx.Embed(16, 32, rngs=nnx.Rngs(0)),
        nnx.ConvTranspose(32, 32, (3,), rngs=nnx.Rngs(1)),
        nnx.Linear(32, 32, rngs=nnx.Rngs(2)),
    )
    y_hp = model(ids)
    jf.quantize_model(model, "mxfp8")
    assert _differs(model(ids), y_hp)
    sub = jf.substitution_of(model)
    assert [p for p, *_ in sub.substituted] == ["layers/2"]
    assert {p: k for p, k, _ in sub.kept} == {"layers/0": "Embed", "layers/1": "ConvTranspose"}
    assert all("no injection point" in r for *_, r in sub.kept)


# ----------------------------------------------------------------------- bug 5


def _train(model, out_dir, steps=2):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 64)).astype(np.float32)
    y = (np.arange(8) % 8).astype(np.int32)
    params = MLP().init(jax.random.key(0), X)["params"]
    config = training.TrainConfig(steps=steps, warmup_steps=0, eval_every=steps, log_every=1)
    return training.train(
        training.apply_fn_for(model),
        params,
        lambda step: (x, y),
        lambda: [(x, y)],
        config,
        out_dir=out_dir,
        progress=False,
    )


def test_resume_under_another_mx_recipe_is_refused(tmp_path):
    result = _train(jf.quantize_model(MLP(), "mxfp8"), tmp_path)
    assert result.metrics["config"]["mx"][0][1]["lhs"] == "mxfp8_e4m3"
    with pytest.raises(ValueError, match="trained with .*mxfp8_e4m3.* this run uses .*mxfp6_e3m2"):
        _train(jf.quantize_model(MLP(), "mxfp6"), tmp_path)
    with pytest.raises(ValueError, match=r"this run uses no MX substitution"):
        _train(MLP(), tmp_path)
    rceil = jaxmx.preset("mxfp8", scale_mode="rceil")  # same formats, other scales
    with pytest.raises(ValueError, match="scale_mode=floor.* this run uses .*scale_mode=rceil"):
        _train(jf.quantize_model(MLP(), rceil), tmp_path)
    again = _train(jf.quantize_model(MLP(), "mxfp8"), tmp_path)  # same recipe: resumed
    assert again.metrics["train"] == result.metrics["train"]


def test_recipes_recorded_before_a_dot_config_field_was_renamed_still_resume():
    now = training.mx_recipe_of(jf.quantize_model(MLP(), "mxfp8"))
    fields = dict(now[0][1])
    fields.pop("implementation")
    for added in ("lhs_sparsity", "rhs_sparsity"):  # fields newer than the record
        fields.pop(added)
    for native, implementation in [("auto", None), ("never", "xla"), ("always", "native")]:
        old = [[now[0][0], {**fields, "native": native}]]
        new = [[now[0][0], {**now[0][1], "implementation": implementation}]]
        assert training._current_mx(old) == new
    assert training._current_mx([[now[0][0], {**fields, "native": "auto"}]]) != [
        [now[0][0], {**now[0][1], "implementation": "xla"}]
    ]


def test_resume_from_an_incomplete_step_folder_names_it(tmp_path):
    _train(MLP(), tmp_path)
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "7").mkdir()  # a stray empty step folder
    with pytest.raises(ValueError, match=r"checkpoints/7 lacks the 'state' and 'meta' items"):
        _train(MLP(), tmp_path)
    (checkpoints / "7").rmdir()
    shutil.rmtree(checkpoints / "2" / "meta")
    with pytest.raises(ValueError, match=r"checkpoints/2 lacks the 'meta' item \(it holds .*state"):
        _train(MLP(), tmp_path)


# ----------------------------------------------------------------------- bug 6


def test_mxlinen_is_a_real_module_in_every_linen_entry_point():
    params = MLP().init(jax.random.key(0), X)
    y_hp = MLP().apply(params, X)
    mx = jf.quantize_model(MLP(), "mxfp8")
    assert isinstance(mx, nn.Module) and isinstance(mx, jf.MXLinen)
    y = mx.apply(params, X)
    assert _differs(y, y_hp)
    _same(mx.bind(params)(X), y)
    init_params = mx.init(jax.random.key(0), X)
    _same(init_params, params)  # exactly the original parameter tree
    out, _ = mx.init_with_output(jax.random.key(0), X)
    _same(out, y)
    _same(jax.jit(mx.apply)(params, X), y)
    fresh = jf.quantize_model(MLP(), "mxfp8")
    assert "head" in fresh.tabulate(jax.random.key(0), X, console_kwargs={"width": 200})
    assert [p for p, *_ in jf.substitution_of(fresh).substituted] == ["model", "head"]
    # Other methods, by name or as functions of the model class, run in MX too.
    enc = EncoderDecoder()
    p = enc.init(jax.random.key(0), X)
    mxe = jf.quantize_model(enc, "mxfp8")
    y_enc = mxe.apply(p, X, method="encode")
    assert _differs(y_enc, enc.apply(p, X, method="encode"))
    _same(mxe.apply(p, X, method=EncoderDecoder.encode), y_enc)
    _same(mxe.bind(p).encode(X), y_enc)
    # A checkpoint of the MX model loads into the original and back.
    _same(MLP().apply(init_params, X), y_hp)


def test_mxlinen_nests_with_the_original_parameter_tree():
    class Compact(nn.Module):
        quantize: bool

        @nn.compact
        def __call__(self, x):
            body = MLP()
            body = jf.quantize_model(body, "mxfp8") if self.quantize else body
            return body(x) + nn.Dense(8)(x)

    class Field(nn.Module):
        body: nn.Module

        def __call__(self, x):
            return self.body(x)

    class Setup(nn.Module):
        quantize: bool

        def setup(self):
            self.body = jf.quantize_model(MLP(), "mxfp8") if self.quantize else MLP()

        def __call__(self, x):
            return self.body(x)

    mx = jf.quantize_model(MLP(), "mxfp8")
    for plain, quantized in [
        (Compact(False), Compact(True)),
        (Field(MLP()), Field(mx)),
        (Setup(False), Setup(True)),
    ]:
        params = plain.init(jax.random.key(0), X)
        _same(quantized.init(jax.random.key(0), X), params)
        assert _differs(quantized.apply(params, X), plain.apply(params, X))


def test_top_level_module_is_matched_by_the_empty_path():
    dense = nn.Dense(8)
    params = dense.init(jax.random.key(0), X)
    for pattern in ("^$", ".*"):
        mx = jf.quantize_model(dense, [(pattern, "mxfp8")])
        assert _differs(mx.apply(params, X), dense.apply(params, X))
        assert [(p, k) for p, k, _ in jf.substitution_of(mx).substituted] == [("", "Dense")]
    mx = jf.quantize_model(dense, [("Dense", "mxfp8")], warn=False)  # paths, not class names
    _same(mx.apply(params, X), dense.apply(params, X))
    assert jf.substitution_of(mx).kept == [("", "Dense", "no rule matched")]
    assert "(root)" in jf.substitution_of(mx).summary()


def test_unmatched_rule_warnings_point_at_the_callers_line():
    this_file = str(pathlib.Path(__file__))
    mx = jf.quantize_model(MLP(), [("decoder", "mxfp8")])
    with pytest.warns(UserWarning, match="rule 'decoder' matched no matmul module") as seen:
        mx.init(jax.random.key(0), X)
    assert [w.filename for w in seen] == [this_file]
    mx = jf.quantize_model(MLP(), [("decoder", "mxfp8")])
    with pytest.warns(UserWarning, match="decoder") as seen:
        jax.jit(mx.init)(jax.random.key(0), X)
    assert [w.filename for w in seen] == [this_file]
    with pytest.warns(UserWarning, match="decoder") as seen:
        jf.quantize_model(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), [("decoder", "mxfp8")])
    assert [w.filename for w in seen] == [this_file]
