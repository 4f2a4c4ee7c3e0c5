"""The files of a Hugging Face model directory: ``config.json`` (``read_hf_config``) and the
safetensors weights, read lazily and checked tensor by tensor (``ShardReader``).

Errors: a missing directory, ``config.json``, shard or listed file raises FileNotFoundError
naming it; an unreadable (e.g. truncated) shard, a missing, unexpected, mis-shaped or
non-finite tensor raises ValueError naming the tensor, its file and what was expected vs found.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from samoyeds_jax.families.base import check_flags

__all__ = ["ShardReader", "read_hf_config"]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class ShardReader:
    """Lazy tensor access over the safetensors files of one directory.

    The files are ``files`` when given, else ``model.safetensors.index.json``'s ``weight_map``
    when the index exists, else ``model.safetensors``, else every ``*.safetensors`` in the
    directory. Missing shards raise FileNotFoundError on construction; unreadable ones
    ValueError. With ``finite`` (the default), ``get`` refuses floating-point tensors holding
    NaN or Inf; with ``floating``, any tensor of a non-floating dtype. Use as a context manager.
    """

    def __init__(self, directory: str, files: list[str] | None = None, *, finite: bool = True,
                 floating: bool = False):
        self.directory = directory
        self.finite = finite
        self.floating = floating
        index = os.path.join(directory, _INDEX)
        self._where: dict[str, str] = {}
        if files is not None:
            for name in files:
                if not os.path.isfile(os.path.join(directory, name)):
                    raise FileNotFoundError(f"{os.path.join(directory, name)} not found")
            weight_map = None
        elif os.path.isfile(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{index}: expected JSON with a 'weight_map' object ({err})"
                                     ) from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index}: expected 'weight_map' to be an object mapping tensor "
                                 f"names to shard file names, found {type(weight_map).__name__}")
            files = sorted(set(weight_map.values()))
            for name in files:
                if not os.path.isfile(os.path.join(directory, name)):
                    raise FileNotFoundError(
                        f"shard {name!r} listed in {index} is missing from {directory}")
        else:
            files = ([_SINGLE] if os.path.isfile(os.path.join(directory, _SINGLE)) else
                     sorted(os.path.basename(p)
                            for p in glob.glob(os.path.join(directory, "*.safetensors"))))
            if not files:
                raise FileNotFoundError(
                    f"no weights in {directory}: expected {_SINGLE}, {_INDEX} with its shards, "
                    "or *.safetensors files")
            weight_map = None
        self._handles: dict[str, Any] = {}
        for name in files:
            handle = self._open(name)
            for key in handle.keys():
                if weight_map is None or weight_map.get(key) == name:
                    if key in self._where and weight_map is None:
                        raise ValueError(f"tensor {key!r} is in both {self._where[key]} and {name} "
                                         f"of {directory}")
                    self._where[key] = name
        if weight_map is not None:
            absent = sorted(k for k, name in weight_map.items() if self._where.get(k) != name)
            if absent:
                raise ValueError(f"{index} lists {len(absent)} tensors that their shards do not "
                                 f"hold, e.g. {absent[0]!r} in {weight_map[absent[0]]}")
        self._used: set[str] = set()

    def _open(self, name: str):
        path = os.path.join(self.directory, name)
        try:
            handle = safe_open(path, framework="numpy")
            handle.__enter__()
        except (SafetensorError, OSError) as err:  # OSError: e.g. a directory of that name
            raise ValueError(f"cannot read safetensors shard {path} ({err}); the file may be "
                             "truncated or not a safetensors file") from None
        self._handles[name] = handle
        return handle

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def mark_used(self, key: str) -> None:
        """Count ``key`` as consumed without reading it (deliberately ignored tensors)."""
        self._used.add(key)

    def unused(self) -> list[str]:
        """Tensors never read by ``get``."""
        return sorted(set(self._where) - self._used)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def get(self, key: str, shape: tuple[int, ...], *, finite: bool | None = None) -> np.ndarray:
        """Tensor ``key`` as a numpy array, after checking it has ``shape`` (and, with
        ``finite``, no NaN or Inf; None: the reader's ``finite``).

        Raises ValueError naming the tensor and its file when it is missing, mis-shaped,
        unreadable or not finite.
        """
        if key not in self._where:
            raise ValueError(f"tensor {key!r} (expected shape {shape}) is missing from the "
                             f"checkpoint in {self.directory}")
        path = os.path.join(self.directory, self._where[key])
        found = self.shape(key)
        if found != tuple(shape):
            raise ValueError(f"tensor {key!r} in {path}: expected shape {tuple(shape)}, found "
                             f"{found}")
        try:
            array = self._handles[self._where[key]].get_tensor(key)
        except SafetensorError as err:
            raise ValueError(f"cannot read tensor {key!r} from {path} ({err})") from None
        if self.floating and not jnp.issubdtype(array.dtype, jnp.floating):
            raise ValueError(f"tensor {key!r} in {path}: expected a floating dtype, found "
                             f"{array.dtype}")
        if (self.finite if finite is None else finite) and jnp.issubdtype(array.dtype,
                                                                           jnp.floating):
            bad = ~np.isfinite(array)
            if bad.any():
                index = tuple(int(i) for i in np.argwhere(bad)[0])
                raise ValueError(f"tensor {key!r} in {path}: expected finite weights, found "
                                 f"{int(bad.sum())} NaN/Inf values (the first, {array[index]}, at "
                                 f"index {index})")
        self._used.add(key)
        return array


def read_hf_config(directory: str) -> dict[str, Any]:
    """``directory/config.json`` as a dict (FileNotFoundError / ValueError naming the file)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: a Hugging Face checkpoint directory needs "
                                "config.json next to its *.safetensors")
    with open(path) as f:
        try:
            hf = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid UTF-8 JSON ({err})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(hf).__name__}")
    check_flags(hf, path)
    return hf
