"""Token windows for ``samoyeds_jax.train``: random training windows, evenly spaced validation
windows, and the check of a token stream."""

from __future__ import annotations

from typing import Any

import numpy as np


def sample_windows(tokens: np.ndarray, *, batch: int, length: int, seed: int, step: int
                   ) -> np.ndarray:
    """``batch`` random windows of ``length`` tokens from ``tokens`` [n] (int32 [batch, length]),
    a pure function of ``(seed, step)`` so a resumed run sees the same data."""
    n = len(tokens)
    if n < length:
        raise ValueError(f"the token stream has {n} tokens; a window needs {length} "
                         "(seq_len + 1): use more text or a smaller seq_len")
    rng = np.random.default_rng((seed, step))
    starts = rng.integers(0, n - length + 1, size=batch)
    return np.stack([tokens[s:s + length] for s in starts]).astype(np.int32)


def eval_windows(tokens: np.ndarray, *, count: int, length: int) -> np.ndarray:
    """Up to ``count`` evenly spaced, non-overlapping windows [count, length] of ``tokens``."""
    n = len(tokens)
    if n < length:
        raise ValueError(f"validation stream has {n} tokens; need at least {length}")
    count = min(count, n // length)
    starts = np.linspace(0, n - length, count).astype(np.int64)
    return np.stack([tokens[s:s + length] for s in starts]).astype(np.int32)


def check_tokens(tokens: Any, vocab_size: int, what: str) -> np.ndarray:
    """A 1-D int32 token stream with ids in ``[0, vocab_size)`` (ValueError otherwise)."""
    arr = np.asarray(tokens)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must be a 1-D integer token array, got dtype={arr.dtype}, "
                         f"shape={arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"{what} holds token ids in [{arr.min()}, {arr.max()}]; the model's "
                         f"vocabulary is [0, {vocab_size})")
    return arr.astype(np.int32)
