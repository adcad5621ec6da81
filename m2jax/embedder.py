"""Text embeddings from M2-BERT retrieval checkpoints: strings in, float32 (N, H) out.

The released long-context retrieval models (`m2-bert-80M-{2k,8k,32k}-retrieval`) embed a text as
the pooler output (dense + tanh of the first token's final state) of the text tokenised as
`[CLS] text [SEP]` and padded to the model's full length. The encoder has no attention mask, so
padding changes the result; `padding="max_length"` (the default) reproduces the reference exactly,
and `padding="bucket"` trades that for speed on short texts (see `Embedder`).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2jax import filter_cache
from m2jax.model import M2BertForTextEncoding, lowering_platform

Padding = Literal["max_length", "bucket"]
# Texts tokenised per step: bounds host memory ((chunk, L) int32 ids) on long lists.
_TOKENIZE_CHUNK = 4096
# Lists needing more batches than this get a progress bar when `progress` is None.
_PROGRESS_MIN_BATCHES = 8


def length_buckets(max_len: int, min_bucket: int = 128) -> list[int]:
    """Padded lengths for `padding="bucket"`: powers of two from `min_bucket`, then `max_len`."""
    buckets, b = [], min(min_bucket, max_len)
    while b < max_len:
        buckets.append(b)
        b *= 2
    return buckets + [max_len]


class Embedder:
    """Embeds lists of strings with an `M2BertForTextEncoding` (encoder + pooler).

    Args:
      model: the text encoder, e.g. `m2jax.from_pretrained(path, task="embedding")`.
      tokenizer: bert-base-uncased WordPiece (`m2jax.data.load_tokenizer()` when None).
      batch_size: rows per forward call. The last batch is padded with empty rows, so every
        padded length compiles once (`compiled_shapes` lists them).
      normalize: L2-normalise each embedding (for cosine similarity by dot product).
      max_seq_len: truncation and padding length; default the model's `max_position_embeddings`.
      padding: "max_length" pads every text to `max_seq_len`, as the reference does (one
        compiled shape). "bucket" pads each text to the smallest of `length_buckets(max_seq_len)`
        that holds it; faster for short texts on long-context models, but the embeddings differ
        from full-length ones because the bidirectional convolutions see the padding (for
        a unidirectional model they would not).
      progress: show a progress bar (tqdm, on stderr); None shows one for long lists.
    """

    def __init__(
        self,
        model: M2BertForTextEncoding,
        tokenizer: Any = None,
        *,
        batch_size: int = 16,
        normalize: bool = False,
        max_seq_len: int | None = None,
        padding: Padding = "max_length",
        progress: bool | None = None,
    ):
        if not isinstance(model, M2BertForTextEncoding):
            raise TypeError(
                f"Embedder needs an M2BertForTextEncoding (encoder + pooler), got "
                f"{type(model).__name__}; load retrieval checkpoints with "
                "m2jax.from_pretrained(path, task='embedding')"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if padding not in ("max_length", "bucket"):
            raise ValueError(f"padding must be 'max_length' or 'bucket', got {padding!r}")
        full = model.config.max_position_embeddings
        self.max_seq_len = full if max_seq_len is None else int(max_seq_len)
        if not 2 <= self.max_seq_len <= full:
            raise ValueError(
                f"max_seq_len must lie in [2, {full}] (the model's max_position_embeddings), "
                f"got {self.max_seq_len}"
            )
        if tokenizer is None:
            from m2jax.data import load_tokenizer

            tokenizer = load_tokenizer()
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding table "
                f"only {model.config.vocab_size} rows"
            )
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        self.batch_size, self.normalize = batch_size, normalize
        self.padding, self.progress = padding, progress
        self.buckets = (
            length_buckets(self.max_seq_len) if padding == "bucket" else [self.max_seq_len]
        )
        if self.buckets[0] < full:
            warnings.warn(
                f"Embedder pads to {self.buckets} < max_position_embeddings {full}: embeddings "
                "will differ from the reference's full-length ones",
                stacklevel=2,
            )
        self.compiled_shapes: list[tuple[int, int]] = []
        graphdef, state = nnx.split(model)

        def pooled(state, ids_BxL, mask_BxL, filters):
            self.compiled_shapes.append(tuple(ids_BxL.shape))  # runs once per traced shape
            encoder = nnx.merge(graphdef, state)
            # The ids come from our tokenizer (checked there); `filters` as in `_filters_at`.
            return encoder.apply(ids_BxL, jnp.zeros_like(ids_BxL), mask_BxL, None, filters)

        def filters(state, length, platform):
            return nnx.merge(graphdef, state).bert.reusable_filters(length, platform)

        self._state = state
        self._platform = lowering_platform(jax.tree.leaves(state)[0])
        self._pooled = jax.jit(pooled)
        self._compute_filters = jax.jit(filters, static_argnums=(1, 2))
        self._filters: dict[int, Any] = {}

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        dtype: str | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> "Embedder":
        """An Embedder for a retrieval (or sequence-classification) checkpoint at `path`.

        `path` is a local checkpoint or a Hugging Face Hub id (e.g.
        "togethercomputer/m2-bert-80M-2k-retrieval"), with `revision`, `cache_dir` and
        `local_files_only` as in `m2jax.from_pretrained`. `dtype` is the compute dtype
        ("float32" or "bfloat16"); other keyword arguments go to `Embedder(...)`. The
        checkpoint's classifier, if any, is not used.
        """
        from m2jax.pretrained import from_pretrained

        model = from_pretrained(
            path,
            task="embedding",
            dtype=dtype,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
        return cls(model, **kwargs)

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """`[CLS] text [SEP] [PAD]...` ids and their attention mask, int32 (N, max_seq_len)."""
        ids_NxL = np.asarray(self.tokenizer.encode_rows(list(texts), self.max_seq_len), np.int32)
        real_NxL = ids_NxL != self.tokenizer.pad_id
        # Everything up to the last non-pad token is text ([CLS] and [SEP] included).
        lengths_N = np.where(
            real_NxL.any(axis=1), self.max_seq_len - np.argmax(real_NxL[:, ::-1], axis=1), 0
        )
        mask_NxL = (np.arange(self.max_seq_len)[None] < lengths_N[:, None]).astype(np.int32)
        return ids_NxL, mask_NxL

    def embed(
        self,
        texts: Sequence[str],
        *,
        normalize: bool | None = None,
        progress: bool | None = None,
    ) -> np.ndarray:
        """Embeddings of `texts`, float32 (N, H), row i for texts[i]."""
        texts = _check_texts(texts)
        normalize = self.normalize if normalize is None else normalize
        progress = self.progress if progress is None else progress
        out_NxH = np.zeros((len(texts), self.dim), np.float32)
        n_batches = -(-len(texts) // self.batch_size)
        show = progress if progress is not None else n_batches > _PROGRESS_MIN_BATCHES
        with _progress_bar(len(texts), show) as bar:
            for start in range(0, len(texts), _TOKENIZE_CHUNK):
                chunk = texts[start : start + _TOKENIZE_CHUNK]
                ids_NxL, mask_NxL = self.tokenize(chunk)
                for rows, length in self._batches(mask_NxL.sum(axis=1)):
                    out_NxH[start + rows] = self._run(
                        ids_NxL[rows, :length], mask_NxL[rows, :length]
                    )
                    bar.update(len(rows))
        if normalize:
            norms = np.linalg.norm(out_NxH, axis=1, keepdims=True)
            out_NxH /= np.maximum(norms, 1e-12)
        return out_NxH

    __call__ = embed

    def _batches(self, lengths_N: np.ndarray) -> Iterator[tuple[np.ndarray, int]]:
        """(row indices, padded length) per batch; rows grouped by bucket, in input order."""
        bucket_N = np.searchsorted(np.asarray(self.buckets), lengths_N)
        for b, length in enumerate(self.buckets):
            rows = np.flatnonzero(bucket_N == b)
            for i in range(0, len(rows), self.batch_size):
                yield rows[i : i + self.batch_size], length

    def _run(self, ids_BxL: np.ndarray, mask_BxL: np.ndarray) -> np.ndarray:
        n = len(ids_BxL)
        fill = self.batch_size - n
        if fill:  # one compiled shape per length: pad with empty rows (rows never interact)
            pad_rows = np.full((fill, ids_BxL.shape[1]), self.tokenizer.pad_id, np.int32)
            ids_BxL = np.concatenate([ids_BxL, pad_rows])
            mask_BxL = np.concatenate([mask_BxL, np.zeros_like(pad_rows)])
        pooled_BxH = self._pooled(
            self._state, jnp.asarray(ids_BxL), jnp.asarray(mask_BxL),
            self._filters_at(ids_BxL.shape[1]),
        )
        return np.asarray(pooled_BxH, np.float32)[:n]

    def _filters_at(self, length: int) -> Any:
        """The encoder's long-convolution filters for this padded length, computed once: the
        embedder holds a snapshot of the weights, so they never change (`m2jax.filter_cache`
        explains the saving). None, computed in every batch instead, once the filters of the
        lengths seen would take more than `filter_cache.MAX_BYTES`."""
        if length not in self._filters:
            if not filter_cache.within_limit(self.config, [*self._filters, length]):
                return None
            self._filters[length] = self._compute_filters(self._state, length, self._platform)
        return self._filters[length]


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError("embed() takes a list of strings; wrap a single text as [text]")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is a {type(t).__name__}, not a str")
    return texts


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _progress_bar(total: int, show: bool):
    if not show:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional (absent on some accelerator images)
        return _NoBar()
    return tqdm(total=total, unit="text", desc="embedding", file=sys.stderr)


def cosine_top_k(
    queries_QxH: np.ndarray, corpus_NxH: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The `k` corpus rows most cosine-similar to each query, best first.

    Returns (scores float32 (Q, k'), row indices int64 (Q, k')), k' = min(k, N).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q_QxH, c_NxH = (np.asarray(a, np.float32) for a in (queries_QxH, corpus_NxH))
    if q_QxH.ndim != 2 or c_NxH.ndim != 2 or q_QxH.shape[1] != c_NxH.shape[1]:
        raise ValueError(
            f"queries {q_QxH.shape} and corpus {c_NxH.shape} must be (Q, H) and (N, H)"
        )
    if not len(c_NxH):
        raise ValueError("the corpus is empty")
    q_QxH, c_NxH = (
        a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), np.float32(1e-12))
        for a in (q_QxH, c_NxH)
    )
    scores_QxN = q_QxH @ c_NxH.T
    k = min(k, scores_QxN.shape[1])
    top_QxK = np.argpartition(-scores_QxN, k - 1, axis=1)[:, :k]
    order_QxK = np.argsort(-np.take_along_axis(scores_QxN, top_QxK, axis=1), axis=1, kind="stable")
    top_QxK = np.take_along_axis(top_QxK, order_QxK, axis=1)
    return np.take_along_axis(scores_QxN, top_QxK, axis=1), top_QxK.astype(np.int64)
