"""Tests for the training loop, checkpoint resume, metrics, plots and data samplers.

Everything runs on tiny synthetic data made here; nothing is downloaded.
"""

import gzip
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from examples import data, study, train_lm, training
from models import CNN, GPT, GPTConfig, GPTnnx

VOCAB, CONTEXT, BATCH = 8, 16, 16


def counting_batch(step, seed=0):
    """Sequences that count modulo VOCAB from a random start: learnable in a few steps."""
    start = np.random.default_rng([seed, step]).integers(0, VOCAB, size=(BATCH, 1))
    seq = (start + np.arange(CONTEXT + 1)) % VOCAB
    return seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32)


def counting_eval():
    return [counting_batch(i, seed=1) for i in range(2)]


def tiny_gpt_config(dropout=0.0):
    return GPTConfig(vocab_size=VOCAB, context=CONTEXT, depth=1, width=32, heads=2, dropout=dropout)


def blob_images(step, batch=32, seed=0):
    """Class k is a bright 6x6 square at one of 10 fixed places, plus noise."""
    rng = np.random.default_rng([seed, step])
    labels = rng.integers(0, 10, size=batch)
    images = rng.normal(0.0, 0.1, size=(batch, 28, 28, 1)).astype(np.float32)
    for i, k in enumerate(labels):
        r, c = 2 + 9 * (k // 4), 1 + 7 * (k % 4)
        images[i, r : r + 6, c : c + 6] += 1.0
    return images, labels.astype(np.int32)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_gpt_loss_goes_down(api):
    cfg = tiny_gpt_config()
    if api == "linen":
        model = GPT(cfg)
        params = training.init_linen_params(model, counting_batch(0)[0], seed=0)
    else:
        model = GPTnnx(cfg, rngs=nnx.Rngs(0))
        params = training.nnx_params(model)
    config = training.TrainConfig(steps=60, learning_rate=1e-2, warmup_steps=5, eval_every=60)
    result = training.train(
        study.fp32(model), params, counting_batch, counting_eval, config, progress=False
    )
    first, last = result.metrics["eval"][0], result.metrics["eval"][-1]
    assert first["step"] == 0 and last["step"] == 60
    assert last["loss"] < 0.3 * first["loss"], result.metrics["eval"]
    assert last["accuracy"] > 0.8


def test_cnn_loss_goes_down():
    model = CNN()
    params = training.init_linen_params(model, blob_images(0)[0], seed=0)
    config = training.TrainConfig(steps=30, learning_rate=3e-3, warmup_steps=3, eval_every=30)
    result = training.train(
        study.fp32(model),
        params,
        blob_images,
        lambda: [blob_images(i, seed=1) for i in range(2)],
        config,
        progress=False,
    )
    first, last = result.metrics["eval"][0], result.metrics["eval"][-1]
    assert last["loss"] < 0.5 * first["loss"], result.metrics["eval"]
    assert last["accuracy"] > 0.9


class Interrupt(Exception):
    pass


def test_resume_after_interruption_is_bit_identical(tmp_path):
    # Dropout makes the test also cover the per-step rng derivation.
    model = GPT(tiny_gpt_config(dropout=0.1))
    params = training.init_linen_params(model, counting_batch(0)[0], seed=0)
    config = training.TrainConfig(
        steps=12, warmup_steps=2, eval_every=3, log_every=2, checkpoint_every=4
    )
    apply_fn = study.fp32(model)

    def run(out, on_step=None):
        return training.train(
            apply_fn,
            params,
            counting_batch,
            counting_eval,
            config,
            out_dir=out,
            progress=False,
            on_step=on_step,
        )

    reference = run(tmp_path / "uninterrupted")

    def crash(step, loss):
        if step == 7:  # after the checkpoint at 4; steps 5-7 are lost and redone
            raise Interrupt

    with pytest.raises(Interrupt):
        run(tmp_path / "resumed", on_step=crash)
    seen = []
    resumed = run(tmp_path / "resumed", on_step=lambda step, loss: seen.append(step))
    assert seen == list(range(5, 13))  # it really restarted from the step-4 checkpoint

    jax.tree.map(np.testing.assert_array_equal, reference.params, resumed.params)
    jax.tree.map(np.testing.assert_array_equal, reference.opt_state, resumed.opt_state)
    assert resumed.metrics["train"] == reference.metrics["train"]
    assert resumed.metrics["eval"] == reference.metrics["eval"]
    assert [e["step"] for e in resumed.metrics["eval"]] == [0, 3, 6, 9, 12]

    # A finished run is loaded, not retrained; a changed config is refused.
    again = run(tmp_path / "resumed", on_step=lambda step, loss: seen.append(-1))
    assert -1 not in seen and again.metrics["train"] == reference.metrics["train"]
    other = training.TrainConfig(steps=13, warmup_steps=2, checkpoint_every=4)
    with pytest.raises(ValueError, match=r"train\.steps: 12 -> 13"):
        training.train(
            apply_fn,
            params,
            counting_batch,
            counting_eval,
            other,
            out_dir=tmp_path / "resumed",
            progress=False,
        )


def test_metrics_json_table_and_plot_through_the_cli_path(tmp_path):
    args = train_lm.parse_args(["--quick", "--steps", "6", "--out", str(tmp_path)])
    assert (args.steps, args.width, args.eval_every) == (6, train_lm.QUICK["width"], 20)
    text = "".join(chr(ord("a") + i % 7) for i in range(3000))
    model, params, train_batch, eval_batches, run_info = train_lm.build(
        args, data.CharDataset.from_text(text)
    )
    config = study.train_config_from_args(args)
    results = study.run_recipes(
        ["fp32"],
        model,
        params,
        train_batch,
        eval_batches,
        config,
        tmp_path,
        run_info=run_info,
        progress=False,
    )
    metrics = json.loads((tmp_path / "fp32" / "metrics.json").read_text())
    assert metrics["name"] == "fp32" and metrics["config"]["recipe"] == "fp32"
    assert metrics["config"]["train"]["steps"] == 6
    assert [e["step"] for e in metrics["train"]] == [5, 6]
    assert metrics["final_eval"]["step"] == 6
    assert metrics["step_time_ms_median"] > 0 and metrics["steps_timed"] == 5
    assert metrics == json.loads(json.dumps(results[0]))
    summary = study.report_study(results, tmp_path, "loss")
    assert summary.splitlines()[1].split()[:1] == ["fp32"] and "+0.00" in summary
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown recipe 'mxfp9'; known recipes: fp32"):
        study.parse_recipes("fp32,mxfp9")
    with pytest.raises(ValueError, match="unknown recipe"):
        train_lm.main(["--recipes", "nope"])


def test_master_params_must_be_float32():
    model = GPT(tiny_gpt_config())
    params = training.init_linen_params(model, counting_batch(0)[0], seed=0)
    half = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    config = training.TrainConfig(steps=2, warmup_steps=0)
    with pytest.raises(TypeError, match="float32"):
        training.train(study.fp32(model), half, counting_batch, counting_eval, config)


def test_char_batches_depend_only_on_seed_and_index():
    ds = data.CharDataset.from_text("the quick brown fox jumps over the lazy dog. " * 50)
    x, y = ds.batch("train", 3, batch_size=4, context=10, seed=7)
    x2, y2 = next(ds.batches("train", batch_size=4, context=10, seed=7, start=3))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    assert not np.array_equal(x, ds.batch("train", 4, batch_size=4, context=10, seed=7)[0])
    assert not np.array_equal(x, ds.batch("train", 3, batch_size=4, context=10, seed=8)[0])
    assert len(ds.val) == len(ds.train) // 9 + (len(ds.train) % 9 > 0) or len(ds.val) > 0
    with pytest.raises(ValueError, match="split must be one of"):
        ds.batch("test", 0, batch_size=1, context=4, seed=0)


def test_classification_batches_cover_each_epoch_once():
    n, batch = 50, 8
    idx = np.arange(n)
    epoch = [data.classification_batch(idx, idx, i, batch_size=batch, seed=3)[0] for i in range(6)]
    seen = np.concatenate(epoch)
    assert len(np.unique(seen)) == len(seen) == 48  # 6 full batches, last 2 dropped
    again = data.classification_batch(idx, idx, 2, batch_size=batch, seed=3)[0]
    np.testing.assert_array_equal(again, epoch[2])


def test_fashion_mnist_idx_parser(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28) % 256
    labels = np.array([4, 0, 9], np.uint8)
    for prefix in ("train", "t10k"):
        header = np.array([0x0803, 3, 28, 28], ">i4").tobytes()
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(header + images.astype(np.uint8).tobytes())
        )
        header = np.array([0x0801, 3], ">i4").tobytes()
        (tmp_path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(header + labels.tobytes())
        )
    loaded = data.load_fashion_mnist(tmp_path)
    x, y = loaded["test"]
    assert x.shape == (3, 28, 28, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(x[..., 0] * 255.0, images.astype(np.float32))
    np.testing.assert_array_equal(y, labels)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        data.load_fashion_mnist(tmp_path)


def test_vector_op_recipes_round_the_models_vector_ops():
    model = GPT(tiny_gpt_config())
    x, _ = counting_batch(0)
    params = training.init_linen_params(model, x, 0)
    fp32 = study.get_recipe("fp32")(model)(params, x)
    near_fn = study.get_recipe("fp32_bfloat16_ops")(model)
    near = jax.jit(near_fn)
    # Every vector op's output is rounded, the output head's included: the
    # logits lie on the bfloat16 grid, which FP32's do not (a recipe that did
    # nothing would give FP32's logits).
    logits = np.asarray(near(params, x), np.float32)
    np.testing.assert_array_equal(logits, logits.astype(jnp.bfloat16).astype(np.float32))
    assert not np.array_equal(logits, np.asarray(fp32))
    # Stochastic rounding draws from the step's key: the same key, the same
    # logits; another key, others.
    sr_fn = study.get_recipe("fp32_bfloat16_ops_sr")(model)
    sr = jax.jit(lambda p, x, rng: sr_fn(p, x, train=True, rng=rng))
    a, again, b = (np.asarray(sr(params, x, jax.random.key(k))) for k in (1, 1, 2))
    np.testing.assert_array_equal(a, again)
    assert not np.array_equal(a, b)
    assert near_fn.mx_recipe["vector_ops"] == {"format": "bfloat16", "rounding": "nearest_even"}
