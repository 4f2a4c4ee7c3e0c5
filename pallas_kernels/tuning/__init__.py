"""Tuned kernel configs as data: one JSON file per device kind, keyed by op, shape and tokens.

File ``configs/<device slug>.json`` (slug of ``jax.devices()[0].device_kind``, e.g.
``nvidia_h100_80gb_hbm3``)::

    {"nm_matmul_2of4": {"4096x14336": {"1": {"block_n": 32, ...}, "16": {...}},
                        "*": {"1": {...}}},
     ...}

``lookup`` takes the entry of the exact ``KxN`` shape (else the ``"*"`` entry) and, inside
it, the token-count key nearest to the requested count (in log scale); no file, op or
shape -> None, and the caller falls back to its heuristic. The tuner
``examples/tune_sparse_matmul.py`` writes these files from a GPU run.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import re
from typing import Any

CONFIG_DIR = pathlib.Path(__file__).parent / "configs"


def device_slug(device_kind: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia_h100_80gb_hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_")


def config_path(device_kind: str) -> pathlib.Path:
    return CONFIG_DIR / f"{device_slug(device_kind)}.json"


@functools.cache
def _load(path: str) -> dict[str, Any]:
    p = pathlib.Path(path)
    if not p.exists():
        return {}
    with p.open() as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON object at the top, got {type(data).__name__}")
    return data


def shape_key(k: int, n: int) -> str:
    return f"{k}x{n}"


def nearest_tokens(entries: dict[str, Any], tokens: int) -> str:
    """The key of ``entries`` (token counts as strings) nearest to ``tokens`` in log scale."""
    if not entries:
        raise ValueError("no token-count entries to choose from")
    target = math.log2(max(tokens, 1))
    return min(entries, key=lambda key: (abs(math.log2(max(int(key), 1)) - target), int(key)))


def lookup(op: str, device_kind: str, *, k: int, n: int, tokens: int) -> dict[str, Any] | None:
    """Tuned config fields for ``op`` on this device, or None when nothing is stored."""
    data = _load(str(config_path(device_kind)))
    by_shape = data.get(op)
    if not by_shape:
        return None
    entries = by_shape.get(shape_key(k, n)) or by_shape.get("*")
    if not entries:
        return None
    cfg = dict(entries[nearest_tokens(entries, tokens)])
    cfg.pop("_us", None)  # measured time, kept in the file for the record
    return cfg


def clear_cache() -> None:
    """Forget loaded files (after the tuner rewrote them)."""
    _load.cache_clear()
