"""Data: the embedded byte corpus (Python's ``pydoc_data`` topics) and grain pipelines.

Both tasks are grain ``DataLoader`` s over random-access sources with ``worker_count=0``,
so the iterator state (``get_state()``, a few bytes of JSON) fully determines the next
batch: it is saved in every checkpoint and a resumed run sees exactly the same batches.
"""
from __future__ import annotations

import hashlib

import numpy as np
import grain.python as grain

from tttla_jax.train.mqar import mqar_batch

HELDOUT_FRACTION = 0.05


def corpus_bytes() -> np.ndarray:
    """The embedded corpus as uint8 bytes (topics joined in sorted-key order)."""
    import pydoc_data.topics
    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    return np.frombuffer(text.encode("utf-8"), np.uint8)


def corpus_split():
    """``(train, heldout)`` bytes: the last 5% of the corpus is the fixed held-out split."""
    data = corpus_bytes()
    cut = int(len(data) * (1 - HELDOUT_FRACTION))
    return data[:cut], data[cut:]


def corpus_doc_starts() -> np.ndarray:
    """Byte offsets in :func:`corpus_bytes` where each document starts: every pydoc topic is
    one document (it owns the blank-line separator after it)."""
    import pydoc_data.topics
    topics = pydoc_data.topics.topics
    lens = [len(topics[k].encode("utf-8")) + 2 for k in sorted(topics)]
    return np.concatenate([[0], np.cumsum(lens[:-1])]).astype(np.int64)


def corpus_split_docs():
    """``((train, train_starts), (heldout, heldout_starts))``: the same byte split as
    :func:`corpus_split`, each with its document start offsets (a document cut by the split
    starts again at offset 0 of the held-out part)."""
    train, held = corpus_split()
    starts = corpus_doc_starts()
    cut = len(train)
    return ((train, starts[starts < cut]),
            (held, np.unique(np.concatenate([[0], starts[starts >= cut] - cut]))))


class PackedDocSource(grain.RandomAccessDataSource):
    """The windows of :class:`WindowSource` with document structure: row ``i`` holds the
    ``seq_len`` input bytes ``[i·L, (i+1)·L)`` and their next bytes, the pieces of the
    documents it overlaps packed one after another (``cu_seqlens``, padded with empty
    sequences at the end to a static ``max_docs + 1`` entries), and the loss mask drops the
    first byte of every document (the prediction across a boundary). The model runs each
    piece as if alone, so no state, attention or conv tap crosses a document boundary.

    ``max_docs``: the most document pieces in any row of ``data`` (computed; a fixed shape
    for ``jit``), or a given bound (at least that).
    """

    def __init__(self, data: np.ndarray, starts: np.ndarray, seq_len: int, max_docs: int = 0):
        self.data, self.seq_len = data, seq_len
        self.n = (len(data) - 1) // seq_len
        if self.n < 1:
            raise ValueError(f"seq_len: corpus split of {len(data)} bytes is too short for seq_len={seq_len}")
        self.starts = np.asarray(starts, np.int64)
        self.is_start = np.zeros(len(data) + 1, bool)
        self.is_start[self.starts] = True
        need = max((self._cuts(i).size + 1 for i in range(self.n)), default=1)
        if max_docs and max_docs < need:
            raise ValueError(f"max_docs: a row of seq_len={seq_len} holds up to {need} document pieces, "
                             f"got max_docs={max_docs}")
        self.max_docs = max(max_docs, need)
        self.sha = hashlib.sha256(data.tobytes() + self.starts.tobytes()).hexdigest()[:16]

    def _cuts(self, i):
        """Offsets inside row ``i`` (1 … L−1) where a document starts."""
        L = self.seq_len
        return np.nonzero(self.is_start[i * L + 1:(i + 1) * L])[0] + 1

    def __repr__(self):  # grain checks the source of a restored iterator state by repr
        return (f"PackedDocSource(bytes={len(self.data)}, docs={len(self.starts)}, sha256={self.sha}, "
                f"seq_len={self.seq_len}, max_docs={self.max_docs})")

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        L = self.seq_len
        w = self.data[i * L: (i + 1) * L + 1].astype(np.int32)
        cuts = self._cuts(i)
        cu = np.full(self.max_docs + 1, L, np.int32)
        cu[0] = 0
        cu[1:1 + cuts.size] = cuts
        mask = ~self.is_start[i * L + 1:(i + 1) * L + 1]   # target t+1 starts a document: masked
        return {"inputs": w[:-1], "targets": w[1:], "mask": mask, "cu_seqlens": cu}


class WindowSource(grain.RandomAccessDataSource):
    """Non-overlapping windows of ``seq_len + 1`` bytes (inputs and next-byte targets)."""

    def __init__(self, data: np.ndarray, seq_len: int):
        self.data, self.seq_len = data, seq_len
        self.n = (len(data) - 1) // seq_len
        if self.n < 1:
            raise ValueError(f"seq_len: corpus split of {len(data)} bytes is too short for seq_len={seq_len}")
        self.sha = hashlib.sha256(data.tobytes()).hexdigest()[:16]

    def __repr__(self):  # grain checks the source of a restored iterator state by repr
        return f"WindowSource(bytes={len(self.data)}, sha256={self.sha}, seq_len={self.seq_len})"

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        w = self.data[i * self.seq_len: (i + 1) * self.seq_len + 1].astype(np.int32)
        return {"inputs": w[:-1], "targets": w[1:], "mask": np.ones(self.seq_len, bool)}


class MQARSource(grain.RandomAccessDataSource):
    """An (effectively infinite) stream of MQAR examples, example ``i`` seeded by ``(seed, i)``."""

    def __init__(self, seed: int, *, seq_len, num_kv, vocab_size, power_a, protocol: str = "ours",
                 size: int = 2 ** 30):
        self.seed, self.size = seed, size
        self.kw = dict(seq_len=seq_len, num_kv=num_kv, vocab_size=vocab_size, power_a=power_a)
        if protocol != "ours":  # the repr (checked by grain on restore) of "ours" is unchanged
            self.kw["protocol"] = protocol

    def __len__(self):
        return self.size

    def __repr__(self):
        return f"MQARSource(seed={self.seed}, size={self.size}, {self.kw})"

    def __getitem__(self, i):
        b = mqar_batch(self.seed, [i], **self.kw)
        return {k: v[0] for k, v in b.items()}


def _mqar_kw(cfg):
    return dict(seq_len=cfg.seq_len, num_kv=cfg.mqar_kv, vocab_size=cfg.vocab_size,
                power_a=cfg.mqar_power_a, protocol=cfg.mqar_protocol)


def lm_source(cfg, heldout: bool):
    """The LM task's windows of the train (or held-out) split: :class:`PackedDocSource` with
    ``cfg.pack_documents`` (documents packed, ``cu_seqlens`` per row), else
    :class:`WindowSource` (plain windows across document boundaries)."""
    if getattr(cfg, "pack_documents", False):
        data, starts = corpus_split_docs()[1 if heldout else 0]
        return PackedDocSource(data, starts, cfg.seq_len)
    return WindowSource(corpus_split()[1 if heldout else 0], cfg.seq_len)


def train_loader(cfg, process_index: int = 0, process_count: int = 1) -> grain.DataLoader:
    """The training pipeline: shuffled (LM, reshuffled every epoch) batches, forever.

    With ``process_count > 1`` (multi-host) the reader ``process_index`` reads only its
    ``batch_size / process_count`` rows of every global batch: grain shards the sampler's
    global record sequence (``ShardOptions(i, n)``: records ``i, i+n, ...``), so the union
    of the readers' rows of batch ``b`` is exactly the records of batch ``b`` of a
    single-process run (in another row order). On a mesh the pair is the process's row
    block (``train.distributed.process_row_block``): processes that share rows, e.g. along
    a ``"seq"`` axis spanning processes, pass the same block and read the same rows.
    """
    if cfg.batch_size % process_count:
        raise ValueError(f"batch_size: expected a multiple of the {process_count} row blocks "
                         f"(processes reading distinct rows), got {cfg.batch_size}")
    if process_count > 1:
        shard = grain.ShardOptions(shard_index=process_index, shard_count=process_count,
                                   drop_remainder=True)
    else:
        shard = grain.NoSharding()
    if cfg.task == "lm":
        source = lm_source(cfg, heldout=False)
        sampler = grain.IndexSampler(len(source), shuffle=True, seed=cfg.seed, num_epochs=None,
                                     shard_options=grain.NoSharding())
    elif cfg.task == "vit":  # scikit-learn's 8x8 digits (train/vit.py)
        from tttla_jax.train import vit
        source, sampler = vit.train_source(cfg)
    else:
        source = MQARSource(cfg.seed, **_mqar_kw(cfg))
        sampler = grain.IndexSampler(len(source), shuffle=False, num_epochs=None,
                                     shard_options=grain.NoSharding())
    return grain.DataLoader(data_source=source, sampler=sampler, shard_options=shard,
                            operations=[grain.Batch(cfg.batch_size // process_count,
                                                    drop_remainder=True)],
                            worker_count=0)


def eval_batches(cfg) -> list:
    """The fixed evaluation set as a list of batches (numpy dicts).

    LM: the first ``eval_batches * batch_size`` windows of the held-out split (fewer if it
    is shorter). MQAR: ``mqar_test_examples`` examples from a seed disjoint from training.
    vit: the whole held-out test split of the digits (train/vit.py).
    """
    if cfg.task == "vit":
        from tttla_jax.train import vit
        return vit.eval_batches(cfg)
    if cfg.task == "lm":
        src = lm_source(cfg, heldout=True)
        n = min(len(src), cfg.eval_batches * cfg.batch_size)
        items = [src[i] for i in range(n)]
        out = []
        for s in range(0, n, cfg.batch_size):
            chunk = items[s:s + cfg.batch_size]
            out.append({k: np.stack([c[k] for c in chunk]) for k in chunk[0]})
        return out
    test_seed = cfg.seed + 1_000_003
    n = cfg.mqar_test_examples
    return [mqar_batch(test_seed, range(s, min(s + cfg.batch_size, n)), **_mqar_kw(cfg))
            for s in range(0, n, cfg.batch_size)]


def pad_batch(batch: dict, rows: int) -> dict:
    """``batch`` padded with masked-out rows (token 0, mask False) to ``rows`` rows, so
    every evaluation batch has the sharded batch shape; padded rows add nothing to the
    masked sums."""
    have = len(batch["mask"])
    if have == rows:
        return batch

    def fill(k, v):
        z = np.zeros((rows - have,) + v.shape[1:], v.dtype)
        if k == "cu_seqlens":  # one document holding the whole (masked) row
            z[:, 1:] = batch["inputs"].shape[1]
        return z

    return {k: np.concatenate([v, fill(k, v)]) for k, v in batch.items()}
