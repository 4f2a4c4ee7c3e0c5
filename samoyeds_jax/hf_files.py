"""The files of a Hugging Face model directory: ``config.json`` (``read_hf_config``) and the
safetensors weights, read lazily and checked tensor by tensor (``ShardReader``).

``safe_open`` validates each shard and lists its tensors; the bytes of a tensor are read at
their offset with ``os.preadv`` into the array they fill, which releases the GIL, so
``ShardReader.stack`` reads many tensors at once on several threads.

Errors: a missing directory, ``config.json``, shard or listed file raises FileNotFoundError
naming it; an unreadable (e.g. truncated) shard, a missing, unexpected, mis-shaped or
non-finite tensor raises ValueError naming the tensor, its file and what was expected vs found.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from samoyeds_jax.families.base import check_flags

__all__ = ["ShardReader", "read_hf_config"]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
# safetensors dtype names -> numpy (little-endian, as the format stores them).
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": jnp.bfloat16,
           "F8_E4M3": jnp.float8_e4m3fn, "F8_E5M2": jnp.float8_e5m2,
           "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
           "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
_READERS = min(8, os.cpu_count() or 1)  # threads of ShardReader.stack


def _data_offsets(path: str) -> dict[str, tuple[int, int]]:
    """Tensor name -> (first, last + 1) byte of its data in the file at ``path`` (a shard
    ``safe_open`` has validated: an 8-byte header length, the JSON header, then the data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {key: (8 + n + entry["data_offsets"][0], 8 + n + entry["data_offsets"][1])
            for key, entry in header.items() if key != "__metadata__"}


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
        self._fds: dict[str, int] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        for name in files:
            handle = self._open(name)
            offsets = _data_offsets(os.path.join(directory, name))
            for key in handle.keys():
                if weight_map is None or weight_map.get(key) == name:
                    if key in self._where and weight_map is None:
                        raise ValueError(f"tensor {key!r} is in both {self._where[key]} and {name} "
                                         f"of {directory}")
                    self._where[key] = name
                    self._offsets[key] = offsets[key]
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
        self._fds[name] = os.open(path, os.O_RDONLY)
        return handle

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        for fd in self._fds.values():
            os.close(fd)
        self._handles.clear()
        self._fds.clear()

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
        out = np.empty(shape, self._dtype(key, shape))
        self._read_into(key, out, finite)
        return out

    def stack(self, keys: list[str], shape: tuple[int, ...], *, finite: bool | None = None
              ) -> np.ndarray:
        """Tensors ``keys``, each of ``shape``, as one array [len(keys), *shape] in their common
        dtype, read on several threads (checks and errors as ``get``)."""
        dtypes = [self._dtype(key, shape) for key in keys]
        out = np.empty((len(keys), *shape), np.result_type(*dtypes) if keys else np.float32)

        def read(j: int) -> None:
            if dtypes[j] == out.dtype:
                self._read_into(keys[j], out[j], finite)
            else:
                out[j] = self.get(keys[j], shape, finite=finite)

        with ThreadPoolExecutor(_READERS) as pool:
            list(pool.map(read, range(len(keys))))
        return out

    def _dtype(self, key: str, shape: tuple[int, ...]) -> np.dtype:
        """The numpy dtype of ``key`` after checking that it is there with ``shape``."""
        if key not in self._where:
            raise ValueError(f"tensor {key!r} (expected shape {shape}) is missing from the "
                             f"checkpoint in {self.directory}")
        path = os.path.join(self.directory, self._where[key])
        found = self.shape(key)
        if found != tuple(shape):
            raise ValueError(f"tensor {key!r} in {path}: expected shape {tuple(shape)}, found "
                             f"{found}")
        name = self._handles[self._where[key]].get_slice(key).get_dtype()
        if name not in _DTYPES:
            raise ValueError(f"tensor {key!r} in {path}: dtype {name} is not one of "
                             f"{sorted(_DTYPES)}")
        dtype = np.dtype(_DTYPES[name])
        if self.floating and not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"tensor {key!r} in {path}: expected a floating dtype, found "
                             f"{dtype}")
        return dtype

    def _read_into(self, key: str, out: np.ndarray, finite: bool | None) -> None:
        """Fill ``out`` (C-contiguous, of ``key``'s shape and dtype) with tensor ``key``."""
        path = os.path.join(self.directory, self._where[key])
        start, end = self._offsets[key]
        view = memoryview(out.reshape(-1).view(np.uint8))  # bfloat16 exports no buffer
        if end - start != view.nbytes:
            raise ValueError(f"tensor {key!r} in {path}: its header gives {end - start} bytes "
                             f"for {view.nbytes} bytes of data")
        done = 0
        while done < view.nbytes:
            n = os.preadv(self._fds[self._where[key]], [view[done:]], start + done)
            if n <= 0:
                raise ValueError(f"cannot read tensor {key!r} from {path}: the file ends at "
                                 f"byte {start + done}, before its data does ({end}); it may "
                                 "be truncated")
            done += n
        if (self.finite if finite is None else finite) and jnp.issubdtype(out.dtype,
                                                                           jnp.floating):
            bad = ~np.isfinite(out)
            if bad.any():
                index = tuple(int(i) for i in np.argwhere(bad)[0])
                raise ValueError(f"tensor {key!r} in {path}: expected finite weights, found "
                                 f"{int(bad.sum())} NaN/Inf values (the first, {out[index]}, at "
                                 f"index {index})")
        self._used.add(key)


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
