"""Cutting token streams into the evaluation windows of ``samoyeds_jax.evaluate`` (its module
doc draws them): ``Stream``, ``_Windows`` and ``_make_windows`` with its per-stream checks."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pallas_kernels.checks import expect_kind

if TYPE_CHECKING:
    from samoyeds_jax.evaluate import EvalConfig

_PAD_ID = 0  # any valid id works: padded positions are masked and never seen by real ones

Stream = tuple[Any, Any]
"""``(ids [n] int, nbytes [n] int)``: token ids and the bytes of text each token stands for."""


@dataclasses.dataclass(frozen=True, eq=False)
class _Windows:
    """w windows of L positions, host arrays.

    inputs, targets: [w, L] int32 (target = next token; padding holds ``_PAD_ID``);
    valid: [w, L] bool (a real prediction); nbytes: [w] int64 bytes of the predicted tokens;
    names: [w] stream name of each window; starts: [w] stream offset of each window's first input.
    """

    inputs: np.ndarray
    targets: np.ndarray
    valid: np.ndarray
    nbytes: np.ndarray
    names: tuple[str, ...]
    starts: np.ndarray

    @property
    def count(self) -> int:
        return self.inputs.shape[0]

    @property
    def seq_len(self) -> int:
        return self.inputs.shape[1]

    def describe(self, w: int) -> str:
        """Where window ``w`` lies: its stream and predicted token range."""
        start, stop = int(self.starts[w]), int(self.starts[w]) + int(self.valid[w].sum())
        return f"window {w} (stream {self.names[w]!r}, predicting tokens {start + 1}..{stop})"

    def digest(self) -> str:
        """A fingerprint of the windows' tokens, masks and bytes (equal iff the same windows)."""
        h = hashlib.sha256()
        for a in (self.inputs, self.targets, self.valid, self.nbytes):
            h.update(np.ascontiguousarray(a).tobytes())
            h.update(str(a.shape).encode())
        return h.hexdigest()[:16]

    def batches(self, batch_size: int
                ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """``(first window, inputs, targets, valid)`` of each batch, the last one filled up with
        masked windows so every batch has the shape [batch_size, L]."""
        for lo in range(0, self.count, batch_size):
            hi = min(lo + batch_size, self.count)
            fill = batch_size - (hi - lo)
            pad = ((0, fill), (0, 0))
            yield (lo, np.pad(self.inputs[lo:hi], pad, constant_values=_PAD_ID),
                   np.pad(self.targets[lo:hi], pad, constant_values=_PAD_ID),
                   np.pad(self.valid[lo:hi], pad, constant_values=False))


def _check_stream(name: str, ids: Any, nbytes: Any, vocab_size: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    ids, nbytes = np.asarray(ids), np.asarray(nbytes)
    if ids.ndim != 1 or nbytes.shape != ids.shape:
        raise ValueError(f"stream {name!r}: ids and nbytes must both be [n], got shapes "
                         f"{ids.shape} and {nbytes.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"stream {name!r}: token ids must be integers, got dtype {ids.dtype}")
    if ids.size < 2:
        raise ValueError(f"stream {name!r}: need at least 2 tokens (the first is context only), "
                         f"got {ids.size} token{'' if ids.size == 1 else 's'}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"stream {name!r}: token ids must be in [0, {vocab_size}) for the "
                         f"model's vocab_size={vocab_size}, got ids in [{lo}, {hi}] (a tokenizer "
                         f"with a vocabulary of at least {hi + 1} tokens?)")
    if nbytes.size and (not np.issubdtype(nbytes.dtype, np.integer) or int(nbytes.min()) < 0):
        raise ValueError(f"stream {name!r}: nbytes must be non-negative integers, got dtype "
                         f"{nbytes.dtype} with minimum {nbytes.min()}")
    return ids.astype(np.int32), nbytes.astype(np.int64)


def _make_windows(streams: Mapping[str, Stream], config: EvalConfig, vocab_size: int) -> _Windows:
    """Cut every stream into windows (see the module doc); TypeError / ValueError for bad
    streams or config."""
    from samoyeds_jax.evaluate import EvalConfig  # a cycle at import time

    expect_kind("config", config, EvalConfig, "an EvalConfig (e.g. EvalConfig(seq_len=256))")
    expect_kind("streams", streams, Mapping, "a mapping name -> (ids, nbytes)")
    if not streams:
        raise ValueError("no token streams to evaluate (got an empty mapping)")
    for name, stream in streams.items():
        if not (isinstance(stream, (tuple, list)) and len(stream) == 2):
            size = f" of {len(stream)} items" if isinstance(stream, (tuple, list)) else ""
            raise TypeError(f"stream {name!r} must be a pair (ids [n], nbytes [n]), got "
                            f"{type(stream).__name__}{size}")
    checked = {name: _check_stream(name, ids, nb, vocab_size)
               for name, (ids, nb) in streams.items()}
    # Short streams only: one window of the longest stream's length instead of seq_len.
    length = min(config.seq_len, max(ids.size - 1 for ids, _ in checked.values()))
    inputs, targets, valid, nbytes, names, starts = [], [], [], [], [], []
    limit = config.max_windows
    for name, (ids, nb) in checked.items():
        n = ids.size
        for start in range(0, n - 1, length):
            if limit is not None and len(names) == limit:
                break
            stop = min(start + length, n - 1)  # inputs ids[start:stop], targets one later
            m = stop - start
            row_in = np.full(length, _PAD_ID, np.int32)
            row_tg = np.full(length, _PAD_ID, np.int32)
            row_in[:m], row_tg[:m] = ids[start:stop], ids[start + 1:stop + 1]
            inputs.append(row_in)
            targets.append(row_tg)
            valid.append(np.arange(length) < m)
            nbytes.append(int(nb[start + 1:stop + 1].sum()))
            names.append(name)
            starts.append(start)
    return _Windows(inputs=np.stack(inputs), targets=np.stack(targets), valid=np.stack(valid),
                    nbytes=np.asarray(nbytes, np.int64), names=tuple(names),
                    starts=np.asarray(starts, np.int64))
