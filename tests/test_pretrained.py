"""Llama and MiniLM ports, their loaders, and the PTQ study's recipe plumbing.

Fast tests use tiny random-weight models and synthetic GGUF / safetensors
files written by the test, checked against float64 NumPy references written
from the formulas (Hugging Face's weight layout, llama.cpp's RoPE layout).
Tests marked ``slow`` load the real weights (``python examples/pretrained.py
--fetch`` downloads them) and skip with the reason when they are missing.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmx
import jaxmx.flax
from examples import pretrained as P
from examples import ptq_study as S
from models.llama import (
    KVCache,
    Llama,
    LlamaConfig,
    apply_rope,
    attention,
    generate,
    init_cache,
    rope_angles,
)
from models.minilm import MiniLM, MiniLMConfig

TINY = LlamaConfig(
    vocab_size=64, width=32, depth=2, heads=4, kv_heads=2, mlp_width=48, max_len=64,
    rope_theta=10000.0,
)  # fmt: skip
# float32 through a few layers against float64: a few ulps of the logits' scale.
F32_TOL = dict(rtol=2e-5, atol=2e-5)
NEEDS = "needs the pretrained-model packages: pip install --no-deps gguf safetensors tokenizers"


def _tokens(n, vocab=TINY.vocab_size, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (1, n)), jnp.int32)


@pytest.fixture(scope="module")
def tiny():
    model = Llama(TINY)
    params = model.init(jax.random.key(0), _tokens(4))
    # Flax initialises RMSNorm scales to 1; random ones test their mapping too.
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype)
            if "scale" in jax.tree_util.keystr(p)
            else x
        ),
        params,
    )
    return model, params


# --- Float64 references -----------------------------------------------------------


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope_half_np(v, positions, theta):
    """Rotate-half RoPE as complex multiplication: z_i = v_i + j v_{i+d/2}."""
    d = v.shape[-1]
    freq = theta ** (-np.arange(0, d, 2) / d)
    rot = np.exp(1j * positions[:, None] * freq)[:, None, :]  # (t, 1, d/2)
    z = (v[..., : d // 2] + 1j * v[..., d // 2 :]) * rot
    return np.concatenate([z.real, z.imag], axis=-1)


def _rope_interleaved_np(v, positions, theta):
    """llama.cpp's (and the paper's) RoPE: adjacent pairs z_i = v_{2i} + j v_{2i+1}."""
    d = v.shape[-1]
    freq = theta ** (-np.arange(0, d, 2) / d)
    rot = np.exp(1j * positions[:, None] * freq)[:, None, :]
    z = (v[..., 0::2] + 1j * v[..., 1::2]) * rot
    out = np.empty_like(v)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def _softmax(s):
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=-1, keepdims=True)


def _llama_np(hf, cfg: LlamaConfig, tokens):
    """Llama forward in float64 from Hugging Face-layout weights ((out, in) matrices)."""
    hf = {k: np.asarray(v, np.float64) for k, v in hf.items()}
    t, hd, rep = len(tokens), cfg.head_dim, cfg.heads // cfg.kv_heads
    pos = np.arange(t, dtype=np.float64)
    x = hf["embed"][tokens]
    causal = np.tril(np.ones((t, t), bool))
    for i in range(cfg.depth):
        w = lambda n: hf[f"{i}.{n}"]  # noqa: B023, E731
        h = _rms(x, w("attn_norm"), cfg.norm_eps)
        q = _rope_half_np((h @ w("q").T).reshape(t, cfg.heads, hd), pos, cfg.rope_theta)
        k = _rope_half_np((h @ w("k").T).reshape(t, cfg.kv_heads, hd), pos, cfg.rope_theta)
        v = (h @ w("v").T).reshape(t, cfg.kv_heads, hd)
        out = np.empty((t, cfg.heads, hd))
        for head in range(cfg.heads):
            s = q[:, head] @ k[:, head // rep].T / math.sqrt(hd)
            out[:, head] = _softmax(np.where(causal, s, -np.inf)) @ v[:, head // rep]
        x = x + out.reshape(t, -1) @ w("o").T
        h = _rms(x, w("ffn_norm"), cfg.norm_eps)
        g = h @ w("gate").T
        x = x + (g / (1 + np.exp(-g)) * (h @ w("up").T)) @ w("down").T
    return _rms(x, hf["out_norm"], cfg.norm_eps) @ hf["embed"].T


def _hf_from_flax(params, cfg):
    p = params["params"]
    hf = {"embed": p["embed_tokens"]["embedding"], "out_norm": p["norm"]["scale"]}
    for i in range(cfg.depth):
        layer = p[f"layers_{i}"]
        hf[f"{i}.attn_norm"] = layer["input_layernorm"]["scale"]
        hf[f"{i}.ffn_norm"] = layer["post_attention_layernorm"]["scale"]
        for n in ("q", "k", "v", "o"):
            hf[f"{i}.{n}"] = np.asarray(layer["self_attn"][f"{n}_proj"]["kernel"]).T
        for n in ("gate", "up", "down"):
            hf[f"{i}.{n}"] = np.asarray(layer["mlp"][f"{n}_proj"]["kernel"]).T
    return hf


# --- Llama: shapes, cache, GQA, RoPE -------------------------------------------------------


def test_llama_param_shapes(tiny):
    _, params = tiny
    p = params["params"]
    attn = p["layers_0"]["self_attn"]
    hd = TINY.head_dim
    assert attn["q_proj"]["kernel"].shape == (TINY.width, TINY.heads * hd)
    assert attn["k_proj"]["kernel"].shape == (TINY.width, TINY.kv_heads * hd)
    assert attn["v_proj"]["kernel"].shape == (TINY.width, TINY.kv_heads * hd)
    assert p["layers_1"]["mlp"]["down_proj"]["kernel"].shape == (TINY.mlp_width, TINY.width)
    assert "lm_head" not in p  # tied head
    assert set(p) == {"embed_tokens", "norm", "layers_0", "layers_1"}


def test_llama_matches_float64_reference(tiny):
    model, params = tiny
    tokens = _tokens(12)
    got = model.apply(params, tokens)[0]
    want = _llama_np(_hf_from_flax(params, TINY), TINY, np.asarray(tokens[0]))
    np.testing.assert_allclose(got, want, **F32_TOL)


def test_llama_is_causal(tiny):
    model, params = tiny
    a, b = _tokens(10, seed=1), _tokens(10, seed=1).at[0, 7].set(3)
    la, lb = model.apply(params, a), model.apply(params, b)
    np.testing.assert_array_equal(la[0, :7], lb[0, :7])
    assert not np.allclose(la[0, 7:], lb[0, 7:])


def test_llama_untied_head():
    cfg = LlamaConfig(
        vocab_size=40, width=16, depth=1, heads=2, kv_heads=1, mlp_width=8, max_len=8,
        tie_embeddings=False,
    )  # fmt: skip
    params = Llama(cfg).init(jax.random.key(0), _tokens(3, 40))
    assert params["params"]["lm_head"]["kernel"].shape == (16, 40)


def test_kv_cache_decode_equals_full_forward(tiny):
    model, params = tiny
    tokens = _tokens(11, seed=2)
    full = model.apply(params, tokens)
    # Prefill 5, then a chunk of 2, then one token at a time.
    cache = init_cache(TINY, 1, 16)
    pieces, start = [], 0
    apply = jax.jit(model.apply)  # one compile per chunk size (3), not op-by-op dispatch
    for size in (5, 2, 1, 1, 1, 1):
        logits, cache = apply(params, tokens[:, start : start + size], cache=cache)
        pieces.append(logits)
        start += size
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, **F32_TOL)
    assert int(cache.length) == 11
    # Slots past the fill level are untouched.
    assert not np.any(np.asarray(cache.keys[0][:, 11:]))


def test_kv_cache_under_jit(tiny):
    model, params = tiny
    tokens = _tokens(6, seed=3)
    step = jax.jit(model.apply)
    logits, cache = step(params, tokens[:, :3], cache=init_cache(TINY, 1, 8))
    for t in range(3, 6):
        logits, cache = step(params, tokens[:, t : t + 1], cache=cache)
    np.testing.assert_allclose(logits[0, -1], model.apply(params, tokens)[0, -1], **F32_TOL)
    assert isinstance(cache, KVCache)


def test_llama_rejects_bad_tokens(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match="shape"):
        model.apply(params, jnp.zeros((4,), jnp.int32))
    with pytest.raises(TypeError, match="integer"):
        model.apply(params, jnp.zeros((1, 4)))


def test_cache_capacity_checked(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match="capacity"):
        model.apply(params, _tokens(9), cache=init_cache(TINY, 1, 8))
    with pytest.raises(ValueError, match="capacity"):
        init_cache(TINY, 1, TINY.max_len + 1)


def test_generate_is_greedy_decoding(tiny):
    model, params = tiny
    prompt = _tokens(4, seed=4)
    got = np.asarray(generate(model.apply, params, prompt, config=TINY, max_new_tokens=5))
    # Reference: re-run the full forward on the growing sequence, no cache.
    seq = np.asarray(prompt[0]).tolist()
    for _ in range(5):
        logits = model.apply(params, jnp.asarray([seq], jnp.int32))
        seq.append(int(jnp.argmax(logits[0, -1])))
    assert got.shape == (1, 5)
    assert got[0].tolist() == seq[4:]


def test_gqa_attention_against_repeated_heads():
    rng = np.random.default_rng(5)
    b, t, s, h, kv, d = 2, 3, 5, 6, 2, 8
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    k = rng.standard_normal((b, s, kv, d)).astype(np.float32)
    v = rng.standard_normal((b, s, kv, d)).astype(np.float32)
    mask = rng.random((b, t, s)) < 0.7
    mask[..., 0] = True
    got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    want = np.empty((b, t, h, d))
    for bi in range(b):
        for head in range(h):
            g = head // (h // kv)  # query heads 0-2 read kv head 0, 3-5 kv head 1
            sc = q[bi, :, head].astype(np.float64) @ k[bi, :, g].T / math.sqrt(d)
            want[bi, :, head] = _softmax(np.where(mask[bi], sc, -np.inf)) @ v[bi, :, g]
    np.testing.assert_allclose(got, want, **F32_TOL)


def test_rope_against_complex_rotation():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 7, 3, 16)).astype(np.float32)
    pos = np.array([0, 1, 2, 5, 100, 1000, 4095])
    cos, sin = rope_angles(jnp.asarray(pos)[None], 16, 10000.0)
    got = apply_rope(jnp.asarray(x), cos, sin)
    want = _rope_half_np(x[0].astype(np.float64), pos.astype(np.float64), 10000.0)
    # float32 angles of up to 4095 rad: |error| <= 4095 * 2^-24 per unit of |x|.
    np.testing.assert_allclose(got[0], want, rtol=0, atol=4e-3)
    np.testing.assert_allclose(got[0, :4], want[:4], **F32_TOL)
    np.testing.assert_array_equal(got[0, 0], x[0, 0])  # position 0: identity


def test_rope_scores_depend_on_relative_position():
    rng = np.random.default_rng(7)
    q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 32)), jnp.float32) for _ in range(2))

    def score(pq, pk):
        cq, sq = rope_angles(jnp.array([[pq]]), 32, 100000.0)
        ck, sk = rope_angles(jnp.array([[pk]]), 32, 100000.0)
        return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

    assert score(9, 4) == pytest.approx(score(105, 100), rel=1e-5)
    assert score(9, 4) != pytest.approx(score(9, 8), rel=1e-3)


# --- GGUF: the q/k permutation, a synthetic file, the tokenizer ---------------------------


def test_unpermute_inverts_permute():
    w = np.random.default_rng(8).standard_normal((3 * 8, 5))
    for heads in (1, 3):
        np.testing.assert_array_equal(P.unpermute_qk(P.permute_qk(w, heads), heads), w)
    assert not np.array_equal(P.permute_qk(w, 3), w)
    with pytest.raises(ValueError, match="heads"):
        P.permute_qk(w, 5)


def test_permuted_rows_with_interleaved_rope_equal_rotate_half():
    # What llama.cpp computes from GGUF rows (adjacent-pair RoPE on permuted
    # projections) is, row for row, the permutation of what Hugging Face
    # computes from its rows (rotate-half RoPE): so unpermuted GGUF weights
    # with rotate-half RoPE give the original model's attention scores.
    rng = np.random.default_rng(9)
    heads, hd, width, t = 3, 8, 12, 6
    w = rng.standard_normal((heads * hd, width))
    x = rng.standard_normal((t, width))
    pos = np.arange(t, dtype=np.float64) * 3
    hf = _rope_half_np((x @ w.T).reshape(t, heads, hd), pos, 10000.0)
    cpp = _rope_interleaved_np((x @ P.permute_qk(w, heads).T).reshape(t, heads, hd), pos, 10000.0)
    perm = P.permute_qk(np.arange(heads * hd), heads).reshape(heads, hd)[0]
    np.testing.assert_allclose(cpp, hf[..., perm], rtol=1e-12, atol=1e-12)


def _tiny_vocab():
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|endoftext|>", *alphabet, "th", "the", "Ġthe"]
    merges = ["t h", "th e", "Ġ the"]
    types = [3] + [1] * (len(tokens) - 1)
    return tokens, merges, types


def _write_gguf(path, cfg: LlamaConfig, hf, quantize: dict):
    import gguf

    tokens, merges, types = _tiny_vocab()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.depth)
    writer.add_context_length(cfg.max_len)
    writer.add_embedding_length(cfg.width)
    writer.add_feed_forward_length(cfg.mlp_width)
    writer.add_head_count(cfg.heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(types)
    writer.add_bos_token_id(0)

    def add(name, w):
        w = np.asarray(w, np.float32)
        qtype = quantize.get(name)
        if qtype is None:
            writer.add_tensor(name, w)
        else:
            kind = getattr(gguf.GGMLQuantizationType, qtype)
            writer.add_tensor(name, gguf.quants.quantize(w, kind), raw_dtype=kind)

    add("token_embd.weight", hf["embed"])
    add("output_norm.weight", hf["out_norm"])
    names = {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "attn_q": "q", "attn_k": "k",
             "attn_v": "v", "attn_output": "o", "ffn_gate": "gate", "ffn_up": "up",
             "ffn_down": "down"}  # fmt: skip
    for i in range(cfg.depth):
        for gname, hname in names.items():
            w = hf[f"{i}.{hname}"]
            if gname in ("attn_q", "attn_k"):
                w = P.permute_qk(np.asarray(w), cfg.heads if gname == "attn_q" else cfg.kv_heads)
            add(f"blk.{i}.{gname}.weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_loader_on_synthetic_file(tiny, tmp_path):
    gguf = pytest.importorskip("gguf", reason=NEEDS)
    pytest.importorskip("tokenizers", reason=NEEDS)

    _, params = tiny
    hf = _hf_from_flax(params, TINY)
    # The real file stores the embedding as Q8_0 and matrices as Q4_1.
    quant = {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q4_1"}
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, TINY, hf, quant)
    g = P.read_gguf(path)
    assert g.config == TINY
    assert g.tensor_types["blk.0.attn_q.weight"] == "Q4_1"
    loaded = P.llama_params_from_gguf(g.tensors, g.config)

    # The reference sees the same rounding: Q8_0 / Q4_1 blocks run along a
    # row, so quantizing permuted rows equals permuting quantized rows.
    def roundtrip(w, qtype):
        kind = getattr(gguf.GGMLQuantizationType, qtype)
        return gguf.quants.dequantize(gguf.quants.quantize(np.asarray(w, np.float32), kind), kind)

    hf_q = dict(hf, embed=roundtrip(hf["embed"], "Q8_0"))
    hf_q["0.q"] = roundtrip(hf["0.q"], "Q4_1")
    assert not np.allclose(hf_q["0.q"], hf["0.q"])  # the rounding is real
    tokens = _tokens(9, seed=10)
    got = Llama(g.config).apply(jax.tree.map(jnp.asarray, loaded), tokens)[0]
    np.testing.assert_allclose(got, _llama_np(hf_q, TINY, np.asarray(tokens[0])), **F32_TOL)

    tok = P.gguf_tokenizer(g.metadata)
    names = tok.encode("the the 12<|endoftext|>").tokens
    assert names == ["the", "Ġthe", "Ġ", "1", "2", "<|endoftext|>"]
    ids = tok.encode("Hello, the world 2025!").ids
    assert tok.decode(ids) == "Hello, the world 2025!"


def test_gguf_loader_rejects_missing_tensors():
    with pytest.raises(ValueError, match="missing"):
        P.llama_params_from_gguf({"token_embd.weight": np.zeros((4, 4))}, TINY)


# --- MiniLM ----------------------------------------------------------------------------

MINI = MiniLMConfig(vocab_size=40, width=16, depth=2, heads=4, mlp_width=32, max_len=16)


def _bert_state_dict(cfg: MiniLMConfig, seed=0):
    rng = np.random.default_rng(seed)
    r = lambda *shape: (0.3 * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    sd = {
        "embeddings.word_embeddings.weight": r(cfg.vocab_size, cfg.width),
        "embeddings.position_embeddings.weight": r(cfg.max_len, cfg.width),
        "embeddings.token_type_embeddings.weight": r(cfg.type_vocab_size, cfg.width),
        "embeddings.LayerNorm.weight": 1 + r(cfg.width),
        "embeddings.LayerNorm.bias": r(cfg.width),
        "embeddings.position_ids": np.arange(cfg.max_len, dtype=np.int64)[None],
        "pooler.dense.weight": r(cfg.width, cfg.width),
        "pooler.dense.bias": r(cfg.width),
    }
    for i in range(cfg.depth):
        b = f"encoder.layer.{i}."
        for name, (o, n) in {
            "attention.self.query": (cfg.width, cfg.width),
            "attention.self.key": (cfg.width, cfg.width),
            "attention.self.value": (cfg.width, cfg.width),
            "attention.output.dense": (cfg.width, cfg.width),
            "intermediate.dense": (cfg.mlp_width, cfg.width),
            "output.dense": (cfg.width, cfg.mlp_width),
        }.items():
            sd[b + name + ".weight"], sd[b + name + ".bias"] = r(o, n), r(o)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[b + name + ".weight"], sd[b + name + ".bias"] = 1 + r(cfg.width), r(cfg.width)
    return sd


def _bert_np(sd, cfg: MiniLMConfig, ids, mask):
    """Sentence embedding in float64 from a Hugging Face BertModel state dict."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    erf = np.vectorize(math.erf)

    def ln(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.norm_eps) * sd[name + ".weight"] + sd[name + ".bias"]

    def lin(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    out = []
    for row, m in zip(ids, mask, strict=True):
        t = len(row)
        x = sd["embeddings.word_embeddings.weight"][row]
        x = x + sd["embeddings.position_embeddings.weight"][:t]
        x = ln(x + sd["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
        for i in range(cfg.depth):
            b = f"encoder.layer.{i}."
            split = lambda y, t=t: y.reshape(t, cfg.heads, cfg.head_dim).transpose(1, 0, 2)  # noqa: E731
            q, k, v = (split(lin(x, b + f"attention.self.{n}")) for n in ("query", "key", "value"))
            s = q @ k.transpose(0, 2, 1) / math.sqrt(cfg.head_dim)
            ctx = _softmax(np.where(m[None, None, :] > 0, s, -np.inf)) @ v
            x = ln(x + lin(ctx.transpose(1, 0, 2).reshape(t, -1), b + "attention.output.dense"),
                   b + "attention.output.LayerNorm")  # fmt: skip
            h = lin(x, b + "intermediate.dense")
            h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
            x = ln(x + lin(h, b + "output.dense"), b + "output.LayerNorm")
        pooled = (x * m[:, None]).sum(0) / m.sum()
        out.append(pooled / np.linalg.norm(pooled))
    return np.stack(out)


def _write_minilm_dir(path, cfg: MiniLMConfig, sd):
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(
        json.dumps({
            "hidden_act": "gelu", "vocab_size": cfg.vocab_size, "hidden_size": cfg.width,
            "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads,
            "intermediate_size": cfg.mlp_width, "max_position_embeddings": cfg.max_len,
            "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.norm_eps,
        })
    )  # fmt: skip
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "a", "dog",
             "##s", "ran", ".", ","]  # fmt: skip
    words += [f"w{i}" for i in range(cfg.vocab_size - len(words))]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.save(str(path / "tokenizer.json"))


def test_minilm_shapes_and_padding_invariance():
    model = MiniLM(MINI)
    ids = jnp.array([[2, 5, 6, 3, 0, 0, 0, 0]])
    params = model.init(jax.random.key(0), ids, ids > 0)
    emb = model.apply(params, ids, ids > 0)
    assert emb.shape == (1, MINI.width)
    np.testing.assert_allclose(jnp.linalg.norm(emb, axis=-1), 1.0, rtol=1e-6)
    shorter = model.apply(params, ids[:, :4], ids[:, :4] > 0)
    np.testing.assert_allclose(emb, shorter, **F32_TOL)  # padding neither attended nor pooled
    hidden = model.apply(params, ids, ids > 0, pool=False)
    assert hidden.shape == (1, 8, MINI.width)
    with pytest.raises(ValueError, match="attention_mask"):
        model.apply(params, ids, ids[:, :4] > 0)


def test_minilm_loader_on_synthetic_safetensors(tmp_path):
    pytest.importorskip("safetensors", reason=NEEDS)
    pytest.importorskip("tokenizers", reason=NEEDS)
    sd = _bert_state_dict(MINI)
    _write_minilm_dir(tmp_path, MINI, sd)
    pre = P.load_minilm(tmp_path)
    assert pre.config == MINI
    sentences = ["The cat sat on the mat.", "A dog ran", "cats, dogs"]
    got = P.embed_sentences(
        pre.model.apply, pre.params, pre.tokenizer, sentences, batch_size=2, max_len=MINI.max_len
    )
    ids, mask = P.tokenize_batch(pre.tokenizer, sentences, bucket=8)
    assert ids.shape[1] % 8 == 0 and ids[0, 0] == 2  # [CLS] first
    capped, _ = P.tokenize_batch(pre.tokenizer, sentences, bucket=32, max_len=MINI.max_len)
    assert capped.shape[1] == MINI.max_len
    with pytest.raises(ValueError, match="max_len"):
        P.tokenize_batch(pre.tokenizer, sentences, max_len=4)
    want = _bert_np(sd, MINI, ids, mask)
    np.testing.assert_allclose(got, want, **F32_TOL)


def test_minilm_loader_names_missing_weight():
    sd = _bert_state_dict(MINI)
    del sd["encoder.layer.1.output.dense.bias"]
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.output\.dense\.bias"):
        P.minilm_params_from_state_dict(sd, MINI)


# --- Text and metrics -------------------------------------------------------------------------


def test_osis_to_text():
    raw = (
        '<title type="psalm">A Psalm.</title><w lemma="H1">In</w> the <w>beginning</w>,'
        '<note placement="foot">a note</note> <q who="Jesus">¶ God<note>n</note><w>created</w></q>.'
    )
    assert P.osis_to_text(raw) == "In the beginning, God created."


def test_recall_at_1():
    keys = np.eye(4)
    assert P.retrieval_recall_at_1(keys + 0.1, keys) == 1.0
    assert P.retrieval_recall_at_1(keys[[1, 0, 2, 3]], keys) == 0.5


# --- The study's recipes -------------------------------------------------------------------


def test_recipe_keys_and_validation():
    assert S.Recipe(fmt="mxint8", scale_mode="rceil").key == "dense/direct/mxint8/wa/rceil"
    assert S.Recipe(fmt="mxfp8_e4m3", mode="w").weight_config().lhs is None
    assert S.Recipe(fmt="mxfp8_e4m3", mode="w").activation_config() is None
    assert S.Recipe(fmt="mxfp8_e4m3").activation_config().rhs.name == "mxfp8_e4m3"
    with pytest.raises(ValueError, match="mode"):
        S.Recipe(fmt="mxint8", mode="a")
    with pytest.raises(ValueError, match="method"):
        S.Recipe(fmt="mxint8", method="no_such_method")
    known, unknown = S.available_formats(["mxfp8_e4m3", "no_such_format"])
    assert known == ["mxfp8_e4m3"] and unknown == ["no_such_format"]


def test_weight_only_recipe_is_the_model_with_cast_weights(tiny):
    # Direct cast of weights only == the FP32 model run with every Dense kernel
    # fake-quantized along its contraction axis (axis 0 of Flax's (in, out)).
    model, params = tiny
    tokens = _tokens(8, seed=11)
    q = S.apply_recipe(model, params, S.Recipe(fmt="mxfp4_e2m1", mode="w", scale_mode="rceil"))
    cast = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            jaxmx.fake_quantize(x, "mxfp4_e2m1", axis=0, scale_mode="rceil")
            if "kernel" in jax.tree_util.keystr(p)
            else x
        ),
        params,
    )
    got, fp32 = q.apply_fn(q.params, tokens), model.apply(params, tokens)
    np.testing.assert_allclose(got, model.apply(cast, tokens), rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, fp32, rtol=1e-2, atol=1e-2)
    wa = S.apply_recipe(model, params, S.Recipe(fmt="mxfp4_e2m1", mode="wa", scale_mode="rceil"))
    assert not np.allclose(wa.apply_fn(params, tokens), got, rtol=1e-3, atol=1e-3)
    assert S.apply_recipe(model, params, S.Recipe(fmt=None)).apply_fn == model.apply


def test_dense_scope_leaves_attention_and_head_in_fp32(tiny):
    model, params = tiny
    q = S.apply_recipe(model, params, S.Recipe(fmt="mxfp8_e4m3"))
    q.apply_fn(params, _tokens(4))
    sub = jaxmx.flax.substitution_of(q.apply_fn.__self__)
    mx = {path for path, *_ in sub.substituted}
    assert len(mx) == 7 * TINY.depth  # q, k, v, o, gate, up, down per layer
    assert "embed_tokens" in sub.summary()  # Embed.attend listed as kept


def test_all_scope_quantizes_einsums_and_head(tiny):
    if S._intercept_fn() is None:
        pytest.skip("this jaxmx has no jaxpr-level interception (jaxmx.intercept)")
    model, params = tiny
    tokens = _tokens(8, seed=12)
    dense = S.apply_recipe(model, params, S.Recipe(fmt="mxfp4_e2m1"))
    every = S.apply_recipe(model, params, S.Recipe(fmt="mxfp4_e2m1", scope="all"))
    assert not np.allclose(every.apply_fn(params, tokens), dense.apply_fn(params, tokens))
    # Weights only: the matmuls without a weight operand (q.k, p.v) stay FP32.
    w_only = S.apply_recipe(model, params, S.Recipe(fmt="mxfp4_e2m1", mode="w", scope="all"))
    w_only.apply_fn(params, tokens)
    coverage = w_only.apply_fn.coverage
    assert len(coverage.sites) == 9 * TINY.depth + 1  # 7 projections, 2 einsums a layer; head
    in_mx = coverage.in_mx
    assert len(in_mx) == 7 * TINY.depth + 1  # every projection and the tied head
    assert all(any(o.startswith("params/") for o in s.operands) for s in in_mx)
    assert all(s.config.lhs is None and s.config.rhs is not None for s in in_mx)


# --- Real weights (slow) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    try:
        P.smollm2_gguf_path(fetch=False)
        return P.load_smollm2(fetch=False)
    except (P.MissingData, ImportError) as err:
        pytest.skip(f"SmolLM2 weights or packages missing ({err})")


@pytest.fixture(scope="module")
def minilm():
    try:
        return P.load_minilm()
    except (P.MissingData, ImportError) as err:
        pytest.skip(str(err))


@pytest.mark.slow
def test_smollm2_perplexity_and_continuation(smollm2):
    try:
        text = P.lm_text("eval")
    except P.MissingData as err:
        pytest.skip(str(err))
    windows = P.token_windows(smollm2.tokenizer, text, windows=2, length=256)
    nll, n = P.lm_nll(smollm2.model.apply, smollm2.params, windows)
    assert 5 < math.exp(nll / n) < 30  # ordinary modern English
    prompt = np.asarray([smollm2.tokenizer.encode(P.PROMPT).ids], np.int32)
    new = generate(smollm2.model.apply, smollm2.params, prompt, config=smollm2.config,
                   max_new_tokens=4)  # fmt: skip
    assert smollm2.tokenizer.decode(np.asarray(new[0]).tolist()).startswith(" Paris")


@pytest.mark.slow
def test_smollm2_tokenizer_round_trip(smollm2):
    tok = smollm2.tokenizer
    text = "In 2024, SmolLM2 said: «héllo»\n\tworld!  <|im_start|>user"
    enc = tok.encode(text)
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    assert enc.tokens[-2:] == ["<|im_start|>", "user"]  # one special token, never split
    assert enc.ids[-2] == 1
    digits = [c for c in text if c.isdigit()]
    assert [t for t in enc.tokens if t.isdigit()] == digits  # every digit its own token


@pytest.mark.slow
def test_minilm_matches_float64_reference_and_ranks_paraphrases(minilm):
    from safetensors.numpy import load_file

    sd = load_file(P.minilm_path() / "model.safetensors")
    sentences = ["A man is playing a guitar.", "Someone is strumming a guitar.",
                 "The stock market fell sharply today."]  # fmt: skip
    got = P.embed_sentences(minilm.model.apply, minilm.params, minilm.tokenizer, sentences)
    ids, mask = P.tokenize_batch(minilm.tokenizer, sentences)
    np.testing.assert_allclose(got, _bert_np(sd, minilm.config, ids, mask), atol=1e-5)
    sim = got @ got.T
    assert sim[0, 1] > 0.5 > max(sim[0, 2], sim[1, 2])


def test_report_tables_and_plot(tmp_path):
    def run(fmt, mode, scale, scope="dense", **metrics):
        r = S.Recipe(fmt=fmt, mode=mode, scale_mode=scale, scope=scope)
        return r.key, {"recipe": {"fmt": fmt, "scope": scope, "method": "direct"}, **metrics}

    lm = dict([run("mxint8", "wa", "floor", ppl=11.0), run("mxfp4_e2m1", "w", "rceil", ppl=30.0),
               run("mxint8", "wa", "floor", scope="all", ppl=12.0)])  # fmt: skip
    emb = dict([run("mxint8", "w", "floor", cos_mean=0.999, recall1_kjv_to_web=0.9,
                    recall1_web_to_kjv=0.8)])  # fmt: skip
    spec_lm = {"model": "LM", "text": "T", "windows": 1, "length": 2, "selection": "s",
               "predictions": 1, "baseline_note": "note"}  # fmt: skip
    spec_emb = {"model": "E", "pairs": 3, "selection": "s"}
    results = {"models": {
        "smollm2": {"spec": spec_lm, "runs": {"fp32": {"ppl": 10.0}, **lm}},
        "minilm": {"spec": spec_emb, "runs": {
            "fp32": {"cos_mean": 1.0, "recall1_kjv_to_web": 1.0, "recall1_web_to_kjv": 1.0},
            **emb}},
    }}  # fmt: skip
    md = S.report(results, tmp_path / "r.md", tmp_path / "r.png", "r.json")
    assert "| mxint8 | - | - | 11.00 (+10.0%) | - |" in md
    assert "| mxfp4_e2m1 | - | 30.00 (+200.0%) | - | - |" in md
    assert "Scope / method `all/direct`" in md and "12.00 (+20.0%)" in md
    assert "| mxint8 | 0.9990 / 85.0% | - | - | - |" in md
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_generate_with_mx_recipe_matches_its_full_forward(tiny):
    # The serving path: a substituted model decodes through the KV cache, and
    # (activations quantized per token, along the contraction axis) greedily
    # picks what its own full forward picks.
    model, params = tiny
    q = S.apply_recipe(model, params, S.Recipe(fmt="mxfp6_e2m3", scale_mode="rceil"))
    prompt = _tokens(5, seed=13)
    got = np.asarray(generate(q.apply_fn, q.params, prompt, config=TINY, max_new_tokens=4))
    seq = np.asarray(prompt[0]).tolist()
    for _ in range(4):
        seq.append(int(jnp.argmax(q.apply_fn(q.params, jnp.asarray([seq], jnp.int32))[0, -1])))
    assert got[0].tolist() == seq[5:]
