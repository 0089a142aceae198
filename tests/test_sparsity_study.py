"""examples/sparsity_study.py without the downloaded models: a tiny Llama and made-up results."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmx
from examples import sparsity_study as S
from models.llama import Llama, LlamaConfig

CFG = LlamaConfig(vocab_size=96, width=64, depth=1, heads=4, kv_heads=2, mlp_width=160)


@pytest.fixture(scope="module")
def tiny():
    model = Llama(CFG)
    tokens = jax.random.randint(jax.random.key(0), (1, 16), 0, CFG.vocab_size)
    return model, jax.jit(model.init)(jax.random.key(1), tokens), tokens


def test_flop_fractions_from_the_shapes():
    params = jax.eval_shape(Llama(CFG).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    w, kv, f = CFG.width, CFG.kv_heads * CFG.head_dim, CFG.mlp_width
    # Per layer and token, written out from the architecture: q, k, v, o, gate, up, down.
    per_role = {"q": w * w, "k": w * kv, "v": w * kv, "o": w * w,
                "gate": w * f, "up": w * f, "down": f * w}  # fmt: skip
    total = CFG.depth * 2 * sum(per_role.values())
    sparse = CFG.depth * 2 * sum(per_role[r] for r in S.DEFAULT_LAYERS)
    head = 2 * CFG.vocab_size * w
    got = S.flop_fractions(params, S.ROLES["smollm2"], S.DEFAULT_LAYERS, S.HEADS["smollm2"])
    assert got["blocks"] == pytest.approx(sparse / total, rel=1e-12)
    assert got["with_head"] == pytest.approx(sparse / (total + head), rel=1e-12)
    assert got["flops_per_token"] == total + head
    every = S.flop_fractions(params, S.ROLES["smollm2"], S.ALL_ROLES)
    assert every["blocks"] == every["with_head"] == 1.0


def test_smollm2_shapes_give_the_documented_fraction():
    # SmolLM2-135M's shapes (the LlamaConfig defaults): q, k, v, gate and up hold
    # 65.6% of the decoder projections' FLOPs, above the paper's 55%.
    params = jax.eval_shape(Llama(LlamaConfig()).init, jax.random.key(0), jnp.zeros((1, 8), int))
    got = S.flop_fractions(params, S.ROLES["smollm2"], S.DEFAULT_LAYERS, S.HEADS["smollm2"])
    assert round(100 * got["blocks"], 1) == 65.6


def test_rules_make_only_the_chosen_layers_activations_sparse(tiny):
    model, params, tokens = tiny
    config = S.Config(quant="mxfp8", pattern=(8, 16), score="amber")
    q = S.apply_config(model, params, config, S.ROLES["smollm2"])
    sites = q.apply_fn.coverage_for(params, tokens).sites
    sparse = {s.operands[1].split("/")[-2] for s in sites if s.config and s.config.lhs_sparsity}
    assert sparse == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    for s in sites:
        if s.operands[1].endswith("_proj/kernel"):  # every projection in MXFP8, W and A
            assert s.mx and s.config.rhs_sparsity is None
            sp = s.config.lhs_sparsity
            if s.operands[1].split("/")[-2] in sparse:
                # Amber's weight factors precomputed, for this very weight.
                assert sp.replace(factor=None) == jaxmx.NMSparsity(8, 16, score="amber")
                assert sp.factor.source == s.operands[1]
            else:
                assert sp is None
        else:  # attention's two einsums and the tied head stay in high precision
            assert not s.mx


def test_fp32_sparse_layers_are_sparse_and_the_rest_high_precision(tiny):
    model, params, tokens = tiny
    config = S.Config(pattern=(2, 4), layers=("down",))
    q = S.apply_config(model, params, config, S.ROLES["smollm2"])
    sites = q.apply_fn.coverage_for(params, tokens).sites
    mx = [s for s in sites if s.mx]
    assert [s.operands[1] for s in mx] == [
        f"params/layers_{i}/mlp/down_proj/kernel" for i in range(CFG.depth)
    ]
    assert all(s.config.lhs_sparsity == jaxmx.NMSparsity(2, 4) for s in mx)
    assert all(s.config.lhs is None and s.config.rhs is None for s in mx)  # FP32 values
    # The sparsity did something: the logits differ from the dense model's.
    assert not np.allclose(jax.jit(q.apply_fn)(params, tokens), model.apply(params, tokens))
    assert S.apply_config(model, params, S.Config(), S.ROLES["smollm2"]).apply_fn == model.apply


def test_grid_keys_and_resume():
    configs = S.grid(["fp32", "mxfp8"], [(2, 4), (8, 16)], ["magnitude", "amber"])
    keys = [c.key for c in configs]
    assert len(keys) == len(set(keys)) == 2 * (1 + 2 * 2)
    assert keys[:2] == ["fp32/dense", "fp32/2:4/magnitude/q,k,v,gate,up"]
    entry = {"runs": {"fp32/dense": {}, "mxfp8/8:16/amber/q,k,v,gate,up": {}}}
    left = S.todo(entry, configs)
    assert [c.key for c in left] == [k for k in keys if k not in entry["runs"]]
    with pytest.raises(ValueError, match="Config.layers"):
        S.Config(pattern=(2, 4), layers=("qkv",))
    with pytest.raises(ValueError, match="pattern is n:m"):
        S.parse_patterns("2-4")
    assert S.parse_layers("q,up") == ("q", "up")


def _run(config: S.Config, **metrics) -> dict:
    import dataclasses

    frac = {"blocks": 0.0, "with_head": 0.0} if config.pattern is None else {
        "blocks": 0.656, "with_head": 0.52}  # fmt: skip
    return {"config": dataclasses.asdict(config), **metrics, "sparse_flops": frac,
            "seconds": 10.0, "load_avg_1min": [1.0, 2.0], "jaxmx_commit": "abc"}  # fmt: skip


def test_table_from_results(tmp_path):
    lm_spec = {"windows": 2, "length": 128, "text": "WEB Acts", "predictions": 254,
               "baseline_note": "dequantized Q4_1"}  # fmt: skip
    sp = S.Config(quant="mxfp8", pattern=(8, 16), score="amber")
    results = {
        "models": {
            "smollm2": {
                "spec": lm_spec,
                "runs": {
                    "fp32/dense": _run(S.Config(), ppl=20.0),
                    "mxfp8/dense": _run(S.Config(quant="mxfp8"), ppl=21.0),
                    sp.key: _run(sp, ppl=23.1),
                },
            },
            "minilm": {"spec": {"pairs": 4}, "runs": {sp.key: _run(sp, cos_mean=0.99)}},
        }
    }
    rows = {r["key"]: r for r in S.table_rows(results)}
    assert rows[sp.key]["vs_fp32"] == pytest.approx(15.5)
    assert rows[sp.key]["vs_dense"] == pytest.approx(10.0)
    assert rows[sp.key]["cos"] == 0.99 and rows["fp32/dense"]["cos"] is None
    text = S.report(results, tmp_path / "t.md", None)
    assert "| mxfp8 | 8:16 | amber | q,k,v,gate,up | 65.6% (52.0%) | 23.100 | +15.5% | +10.0% " \
        "| 0.99000 |" in text  # fmt: skip
    assert "| fp32 | dense | - | - | 0% | 20.000 | +0.0% | +0.0% | - |" in text
    assert (tmp_path / "t.md").read_text() == text
