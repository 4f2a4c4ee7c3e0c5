"""The converted-model format: ``save_converted`` / ``load_converted`` with a manifest, and
the JSON form of a ``ModelConfig`` it stores.

Converted models (``save_converted`` / ``load_converted``, or
``samoyeds_jax.checkpoints.load_or_convert`` for both) are a directory with:

- ``samoyeds_model.safetensors``: every parameter under its module path joined by ``.``; a
  sparse expert stack stores each array field, e.g. ``layers.0.mlp.w1.values`` and
  ``layers.0.mlp.w1.meta``;
- ``samoyeds_config.json``: ``{"format_version", "config" (the ModelConfig), "sparse"
  (path -> format class and static fields), "conversion" (source and pruning settings)}``;
- ``tokenizer.json`` copied from the source when it had one;
- ``samoyeds_manifest.json``, written last: ``{"format": "samoyeds_jax.converted",
  "format_version", "checksum": "crc32", "files"}``, where ``files`` gives each other file's
  byte size and, for the weights, every stored array (each field of each sparse expert stack)
  with its shape, dtype, byte size and CRC-32; the small files have a CRC-32 of the whole file.

CRC-32 (``zlib.crc32``: several GB/s on one core, about twice SHA-256's speed) is there to
catch accidental damage: it detects every burst error up to 32 bits, so any flipped byte, and
truncation is caught by the sizes already. A cryptographic hash would buy nothing against a
deliberate edit, since whoever can rewrite a tensor can rewrite the manifest next to it.

The directory is written as a whole, in a sibling, and swapped in (``samoyeds_jax.atomic``):
readers see the previous model or the new one, never weights of one under the metadata of
the other. ``load_converted`` refuses a directory whose manifest is missing or of another
format, whose files differ from it (size, checksum, tensor list, shape or dtype), or whose
arrays differ from the layout the stored config implies (dense shapes, sparse format and
static fields, every field's shape and dtype).

Errors: a missing directory or listed file raises FileNotFoundError naming it; a missing,
unexpected, mis-shaped or corrupt tensor raises ValueError naming the tensor, its file and
what was expected vs found.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from pallas_kernels.checks import expect_kind
from pallas_kernels.format_registry import FORMATS
from samoyeds_jax import atomic, families
from samoyeds_jax.config import ExpertImplementation, LinearConfig, MoEConfig, SparsityConfig
from samoyeds_jax.expert_store import check_experts_memory, place_experts
from samoyeds_jax.hf_files import ShardReader
from samoyeds_jax.layers import AttentionConfig
from samoyeds_jax.model import ModelConfig, MoETransformer
from samoyeds_jax.param_layout import (_abstract_model, _array_fields, _check_layout, _describe,
                                       _dotted, _fill_non_params, _is_sparse, _static_fields,
                                       _variables, check_unfused)

__all__ = [
    "CONVERTED_CONFIG",
    "CONVERTED_MANIFEST",
    "CONVERTED_WEIGHTS",
    "config_from_dict",
    "config_to_dict",
    "is_converted",
    "load_converted",
    "read_converted_meta",
    "save_converted",
]

CONVERTED_CONFIG = "samoyeds_config.json"
CONVERTED_WEIGHTS = "samoyeds_model.safetensors"
CONVERTED_MANIFEST = "samoyeds_manifest.json"
_CONVERTED_FILES = (CONVERTED_MANIFEST, CONVERTED_CONFIG, CONVERTED_WEIGHTS)
_FORMAT = "samoyeds_jax.converted"
_FORMAT_VERSION = 3


# ----------------------------------------------------------------------------- config I/O


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """A JSON-ready dict of ``config`` (dtypes by name)."""
    d = dataclasses.asdict(config)
    del d["moe"]["implementation"]  # runtime choices, not part of the model
    del d["linear"]["implementation"]
    d["dtype"] = jnp.dtype(config.dtype).name
    d["param_dtype"] = jnp.dtype(config.param_dtype).name
    return d


def config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
    """Inverse of ``config_to_dict`` (validates every nested config again)."""
    d = dict(d)
    moe = dict(d.pop("moe"))
    sparsity = SparsityConfig(**moe.pop("sparsity"))
    linear = dict(d.pop("linear", {}))  # absent: written before linears could be sparse
    linear_sparsity = SparsityConfig(**linear.pop("sparsity", {}))
    return ModelConfig(
        **{k: v for k, v in d.items() if k not in ("attention", "dtype", "param_dtype")},
        attention=AttentionConfig(**d["attention"]),
        moe=MoEConfig(**moe, sparsity=sparsity),
        linear=LinearConfig(**linear, sparsity=linear_sparsity),
        dtype=jnp.dtype(d["dtype"]), param_dtype=jnp.dtype(d["param_dtype"]))


# ----------------------------------------------------------------------------- converted models


def is_converted(directory: str) -> bool:
    """Whether ``directory`` holds a model written by ``save_converted``, or part of one (any of
    its manifest, metadata or weights files); ``load_converted`` checks that it is complete."""
    return any(os.path.isfile(os.path.join(directory, name)) for name in _CONVERTED_FILES)


def _crc32(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=1) + "\n").encode()


def save_converted(model: MoETransformer, directory: str, *, source: str | None = None,
                   conversion: Mapping[str, Any] | None = None) -> None:
    """Write ``model`` (any expert format) to ``directory`` for ``load_converted``, atomically.

    The files (see the module doc) are written to a fresh sibling directory that then takes the
    place of ``directory`` (``samoyeds_jax.atomic``): readers find the previous version or the
    new one, complete, never a mix. ``directory`` must be absent, empty or a converted model
    (replaced as a whole). ``source``: a checkpoint directory whose ``tokenizer.json`` (if any)
    is copied along and which is recorded in the metadata with ``conversion`` (free-form,
    JSON-serializable).

    Raises ValueError for a parameter whose layout is not the one its config implies (shape,
    dtype, sparse format and fields; e.g. experts in a Hopper layout, q/k/v joined by
    ``prepare``), or a ``directory`` that is a file or a non-empty directory of another kind;
    TypeError for a ``model`` that is not a ``MoETransformer``.
    """
    expect_kind("model", model, MoETransformer, "a MoETransformer")
    check_unfused(model, "save_converted")
    directory = atomic.check_path(directory, "directory")
    if source is not None:
        source = atomic.check_path(source, "source")
    config = model.config
    specs = {p: v.get_value() for p, v in _variables(_abstract_model(config)).items()
             if isinstance(v, nnx.Param)}
    params = {p: v.get_value() for p, v in _variables(model).items() if isinstance(v, nnx.Param)}
    if params.keys() != specs.keys():
        raise ValueError(f"the model's parameters differ from those of its config: unexpected "
                         f"{sorted(map(_dotted, params.keys() - specs.keys()))}, missing "
                         f"{sorted(map(_dotted, specs.keys() - params.keys()))}")
    tensors: dict[str, np.ndarray] = {}
    sparse: dict[str, Any] = {}
    for path, value in params.items():
        _check_layout(config, path, specs[path], value, "the model")
        name = _dotted(path)
        if _is_sparse(value):
            sparse[name] = {"class": type(value).__name__, "static": _static_fields(value)}
            for field, array in _array_fields(value).items():
                tensors[f"{name}.{field}"] = np.asarray(array)
        else:
            tensors[name] = np.asarray(value)
    meta = {"format_version": _FORMAT_VERSION, "config": config_to_dict(config),
            "sparse": sparse, "conversion": dict(conversion or {}, source=source)}
    try:
        files = {CONVERTED_CONFIG: _json_bytes(meta)}
    except (TypeError, ValueError) as err:
        raise ValueError(f"conversion settings are not JSON-serializable ({err})") from None
    if source is not None and os.path.isfile(os.path.join(source, "tokenizer.json")):
        with open(os.path.join(source, "tokenizer.json"), "rb") as f:
            files["tokenizer.json"] = f.read()
    entries = {key: {"shape": list(a.shape), "dtype": a.dtype.name, "bytes": int(a.nbytes),
                     "crc32": _crc32(a)} for key, a in tensors.items()}
    listed = {name: {"bytes": len(data), "crc32": zlib.crc32(data)} for name, data in files.items()}
    with atomic.replace_directory(directory, markers=_CONVERTED_FILES,
                                  what="converted model") as staged:
        weights = os.path.join(staged, CONVERTED_WEIGHTS)
        save_file(tensors, weights, metadata={"format": _FORMAT})
        atomic.fsync_file(weights)
        for name, data in files.items():
            atomic.write_file(os.path.join(staged, name), data)
        listed[CONVERTED_WEIGHTS] = {"bytes": os.path.getsize(weights), "tensors": entries}
        manifest = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "checksum": "crc32",
                    "files": listed}
        atomic.write_file(os.path.join(staged, CONVERTED_MANIFEST), _json_bytes(manifest))


def _read_converted(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, manifest) of a converted model, after checking the manifest's format, that
    every file it lists is there with its size, and the checksums of all but the weights."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"converted model directory {directory!r} does not exist")
    path = os.path.join(directory, CONVERTED_MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a complete converted model (save_converted "
            "writes the manifest last; an interrupted save or an older samoyeds-jax leaves none)")
    with open(path, "rb") as f:
        try:
            manifest = json.loads(f.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from None
    found = ((manifest.get("format"), manifest.get("format_version"))
             if isinstance(manifest, dict) else (type(manifest).__name__, None))
    if found != (_FORMAT, _FORMAT_VERSION):
        raise ValueError(f"{path}: expected format {_FORMAT!r} version {_FORMAT_VERSION}, found "
                         f"{found[0]!r} version {found[1]!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files.keys() >= {CONVERTED_CONFIG, CONVERTED_WEIGHTS}:
        raise ValueError(f"{path}: expected 'files' listing {CONVERTED_CONFIG} and "
                         f"{CONVERTED_WEIGHTS}, found {json.dumps(files)[:200]}")
    contents = {}
    for name, entry in files.items():
        key, kind = ("tensors", dict) if name == CONVERTED_WEIGHTS else ("crc32", int)
        if name not in (CONVERTED_CONFIG, CONVERTED_WEIGHTS, "tokenizer.json") or not (
                isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get(key), kind)):
            raise ValueError(f"{path}: expected entries with 'bytes' and 'crc32' ('tensors' for "
                             f"{CONVERTED_WEIGHTS}) for {CONVERTED_CONFIG}, {CONVERTED_WEIGHTS} "
                             f"and tokenizer.json, found {name!r}: {json.dumps(entry)[:200]}")
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} not found (listed by {path})")
        if os.path.getsize(file) != entry["bytes"]:
            raise ValueError(f"{file}: expected {entry['bytes']} bytes (listed by {path}), found "
                             f"{os.path.getsize(file)}: the file is truncated or was replaced")
        if name != CONVERTED_WEIGHTS:
            with open(file, "rb") as f:
                contents[name] = f.read()
            if zlib.crc32(contents[name]) != entry["crc32"]:
                raise ValueError(f"{file}: expected crc32 {entry['crc32']:08x} (listed by {path}), "
                                 f"found {zlib.crc32(contents[name]):08x}: the file is corrupt or "
                                 "from another save")
    meta_path = os.path.join(directory, CONVERTED_CONFIG)
    try:
        meta = json.loads(contents[CONVERTED_CONFIG])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_path} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{meta_path}: expected an object with format_version {_FORMAT_VERSION}, "
                         f"found {json.dumps(meta)[:100]}")
    return meta, manifest


def read_converted_meta(directory: str) -> dict[str, Any]:
    """The metadata of a converted model (``samoyeds_config.json``: format version, config,
    sparse fields, conversion settings), after checking the manifest (format, file sizes,
    checksums of all but the weights); FileNotFoundError / ValueError naming the file."""
    return _read_converted(directory)[0]


def _stored_layouts(meta: Mapping[str, Any], entries: Mapping[str, Any], meta_path: str,
                    manifest_path: str, weights_path: str) -> dict[str, Any]:
    """Every stored parameter as the manifest and metadata describe it: a ShapeDtypeStruct,
    or a sparse-format value of them."""

    def spec(key: str) -> jax.ShapeDtypeStruct:
        entry = entries[key]
        try:
            if not isinstance(entry["bytes"], int) or not isinstance(entry["crc32"], int):
                raise TypeError("'bytes' and 'crc32' must be integers")
            return jax.ShapeDtypeStruct(tuple(entry["shape"]), jnp.dtype(entry["dtype"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{manifest_path}: expected shape, dtype, bytes and crc32 for tensor "
                             f"{key!r}, found {entry!r} ({type(err).__name__}: {err})") from None

    out: dict[str, Any] = {}
    fields: set[str] = set()
    for name, info in meta.get("sparse", {}).items():
        stored_classes = {f.classes[0].__name__: f.classes[0] for f in FORMATS.values()
                          if f.classes}
        cls = stored_classes.get(info.get("class"))
        if cls is None:
            raise ValueError(f"{meta_path}: sparse parameter {name} has class "
                             f"{info.get('class')!r}; expected one of {sorted(stored_classes)}")
        arrays = {}
        for field in (f.name for f in dataclasses.fields(cls) if not f.metadata.get("static")):
            key = f"{name}.{field}"
            if key not in entries:
                raise ValueError(f"tensor {key!r} of sparse parameter {name} ({cls.__name__}) is "
                                 f"not listed by {manifest_path}")
            arrays[field] = spec(key)
            fields.add(key)
        try:
            out[name] = cls(**arrays, **info.get("static", {}))
        except (TypeError, ValueError) as err:
            raise ValueError(f"parameter {name} in {weights_path}: its stored fields "
                             f"{ {k: _describe(v) for k, v in arrays.items()} } with "
                             f"{info.get('static')} (from {meta_path}) do not make a "
                             f"{cls.__name__} ({err})") from None
    for key in entries:
        if key not in fields:
            if key in out:
                raise ValueError(f"{manifest_path}: {key!r} is listed both as a tensor and as a "
                                 "sparse parameter")
            out[key] = spec(key)
    return out


def _read_tensor(reader: ShardReader, key: str, entry: Mapping[str, Any], path: str
                 ) -> jax.Array:
    """Tensor ``key`` after checking its shape, dtype, size and crc32 against the manifest."""
    array = reader.get(key, tuple(entry["shape"]))
    if (array.dtype.name, array.nbytes) != (entry["dtype"], entry["bytes"]):
        raise ValueError(f"tensor {key!r} in {path}: expected {entry['dtype']} ({entry['bytes']} "
                         f"bytes) as listed by {CONVERTED_MANIFEST}, found {array.dtype.name} "
                         f"({array.nbytes} bytes)")
    if _crc32(array) != entry["crc32"]:
        raise ValueError(f"tensor {key!r} in {path}: expected crc32 {entry['crc32']:08x} (listed "
                         f"by {CONVERTED_MANIFEST}), found {_crc32(array):08x}: the file is "
                         "corrupt")
    return jnp.asarray(array)


def load_converted(directory: str, *, implementation: ExpertImplementation = None,
                   experts_memory: str = "device") -> tuple[MoETransformer, ModelConfig]:
    """Load a model written by ``save_converted``: ``(model, config)``.

    ``implementation``: the expert implementation (``MoEConfig.implementation``; not stored).
    ``experts_memory``: "device", or "pinned_host" (the routed experts, block by block, for
    ``OffloadGenerator``: ``expert_store.place_experts``). Every file is checked against the manifest
    (size; crc32 of each tensor and of the small files), and every stored array, sparse-format
    fields included, against the layout the stored config implies (shape, dtype, format and its
    static fields). Raises FileNotFoundError for a missing directory or file and ValueError for
    anything else that does not match, naming the file and tensor, what was expected and what
    was found.
    """
    check_experts_memory(experts_memory)  # before any work
    meta, manifest = _read_converted(directory)
    meta_path = os.path.join(directory, CONVERTED_CONFIG)
    try:
        config = config_from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{meta_path}: the stored config is not a valid ModelConfig "
                         f"({type(err).__name__}: {err})") from None
    if implementation is not None:
        config = config.replace(moe=dict(implementation=implementation))
    model = _abstract_model(config)
    variables = _variables(model)
    weights = os.path.join(directory, CONVERTED_WEIGHTS)
    entries = manifest["files"][CONVERTED_WEIGHTS]["tensors"]
    stored = _stored_layouts(meta, entries, meta_path, os.path.join(directory, CONVERTED_MANIFEST),
                             weights)
    with ShardReader(directory, files=[CONVERTED_WEIGHTS], finite=False) as reader:
        unlisted = sorted(set(reader.keys()) - set(entries))
        absent = sorted(set(entries) - set(reader.keys()))
        if unlisted or absent:
            raise ValueError(f"{weights} does not hold the tensors {CONVERTED_MANIFEST} lists: "
                             f"not listed {unlisted[:3]}, absent {absent[:3]}")
        for path, var in variables.items():
            if not isinstance(var, nnx.Param):
                continue
            name, dense = _dotted(path), var.get_value()
            if name not in stored:
                raise ValueError(f"parameter {name} ({_describe(dense)} dense) is missing from "
                                 f"{weights}")
            expected = _check_layout(config, path, dense, stored.pop(name),
                                     f"{weights} (as listed by {CONVERTED_MANIFEST})")
            if _is_sparse(expected):
                value = type(expected)(**{f: _read_tensor(reader, f"{name}.{f}",
                                                          entries[f"{name}.{f}"], weights)
                                          for f in _array_fields(expected)},
                                       **_static_fields(expected))
            else:
                value = _read_tensor(reader, name, entries[name], weights)
            var.set_value(place_experts(value, experts_memory) if families.routed(path)
                          else value)
        if stored:
            raise ValueError(f"{weights} holds tensors the model has no parameter for: "
                             f"{sorted(stored)[:3]}")
    _fill_non_params(variables)
    return model, config
